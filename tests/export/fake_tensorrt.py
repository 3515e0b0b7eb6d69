"""A recording stand-in for the ``tensorrt`` module (NOT TensorRT).

It checks p3dmm's calls, not TensorRT: every call is appended to ``calls`` as
``(name, args)``, the objects return what the TensorRT API documents (None / False on
failure), and ``fail`` makes one step fail the documented way. The "plan" it builds is a
JSON description of the parsed network's io, so the deserialised engine reports the io
that the ONNX file has (read with onnx) unless ``engine_io`` overrides it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any


class FakeTensorRT:
    """Attributes mirror the ``tensorrt`` module names p3dmm uses."""

    __version__ = "10.13.0.35-fake"

    def __init__(self, fail: str | None = None, engine_io: list[tuple[str, str, tuple]] | None = None) -> None:
        self.calls: list[tuple[str, tuple]] = []
        self.fail = fail
        self.engine_io = engine_io
        rec = self

        class Severity:
            def __init__(self, name: str) -> None:
                self.name = name

        class Logger:
            WARNING = Severity("WARNING")
            ERROR = Severity("ERROR")

            def __init__(self, severity: Any = None) -> None:
                rec.calls.append(("Logger", (getattr(severity, "name", severity),)))

        class Flag:
            def __init__(self, value: int, name: str) -> None:
                self.value, self.name = value, name

            def __int__(self) -> int:
                return self.value

        self.Logger = Logger
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=Flag(1, "STRONGLY_TYPED"))
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="WORKSPACE")
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

        class Network:
            def __init__(self) -> None:
                self.io: list[tuple[str, str, tuple]] = []

        class ParserError:
            def node(self) -> int:
                return 7

            def node_name(self) -> str:
                return "node_Gelu_7"

            def node_operator(self) -> str:
                return "Gelu"

            def desc(self) -> str:
                return "No importer registered for op: Gelu"

        class OnnxParser:
            def __init__(self, network: Network, logger: Any) -> None:
                self.network = network
                self.num_errors = 0

            def parse_from_file(self, path: str) -> bool:
                rec.calls.append(("parse_from_file", (path,)))
                if rec.fail == "parse":
                    self.num_errors = 1
                    return False
                import onnx

                m = onnx.load(path)
                inits = {i.name for i in m.graph.initializer}

                def dims(v: Any) -> tuple:
                    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)

                self.network.io = [(v.name, "INPUT", dims(v)) for v in m.graph.input if v.name not in inits]
                self.network.io += [(v.name, "OUTPUT", dims(v)) for v in m.graph.output]
                return True

            def get_error(self, i: int) -> ParserError:
                return ParserError()

        class HostMemory(bytes):
            """IHostMemory supports the buffer protocol (a bytes subclass here: Python
            classes cannot implement it before 3.12)."""

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> HostMemory:
                return HostMemory(self.data + b"+timed")

        class Profile:
            def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
                rec.calls.append(("set_shape", (name, tuple(lo), tuple(opt), tuple(hi))))

        class Config:
            def __init__(self) -> None:
                self._level = 3
                self.cache: TimingCache | None = None

            @property
            def builder_optimization_level(self) -> int:
                return self._level

            @builder_optimization_level.setter
            def builder_optimization_level(self, v: int) -> None:
                rec.calls.append(("builder_optimization_level", (v,)))
                self._level = v

            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                rec.calls.append(("set_memory_pool_limit", (pool, size)))

            def create_timing_cache(self, data: bytes) -> TimingCache:
                rec.calls.append(("create_timing_cache", (bytes(data),)))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                rec.calls.append(("set_timing_cache", (cache.data, ignore_mismatch)))
                if rec.fail == "cache" and cache.data:
                    return False
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

            def add_optimization_profile(self, profile: Profile) -> int:
                rec.calls.append(("add_optimization_profile", ()))
                return -1 if rec.fail == "profile" else 0

        class Builder:
            def __init__(self, logger: Any) -> None:
                rec.calls.append(("Builder", ()))

            def create_network(self, flags: int) -> Network:
                rec.calls.append(("create_network", (flags,)))
                return Network()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> HostMemory | None:
                rec.calls.append(("build_serialized_network", ()))
                if rec.fail == "build":
                    return None
                io = rec.engine_io if rec.engine_io is not None else network.io
                return HostMemory(json.dumps({"fake_plan": io}).encode())

        class Engine:
            def __init__(self, io: list) -> None:
                self.io = io
                self.num_io_tensors = len(io)

            def get_tensor_name(self, i: int) -> str:
                return self.io[i][0]

            def get_tensor_mode(self, name: str) -> str:
                return next(m for n, m, _ in self.io if n == name)

            def get_tensor_shape(self, name: str) -> tuple:
                return tuple(next(s for n, _, s in self.io if n == name))

        class Runtime:
            def __init__(self, logger: Any) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
                rec.calls.append(("deserialize_cuda_engine", ()))
                if rec.fail == "deserialize":
                    return None
                return Engine(json.loads(bytes(data))["fake_plan"])

        self.Builder = Builder
        self.OnnxParser = OnnxParser
        self.Runtime = Runtime

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def args(self, name: str) -> list[tuple]:
        return [a for n, a in self.calls if n == name]
