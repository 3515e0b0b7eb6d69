"""The native TensorRT backend's control flow, against recording stand-ins of ``tensorrt``
and ``cupy`` (NOT TensorRT or CuPy: they check p3dmm's calls and bookkeeping). The real
thing is marked ``trt`` and skips without TensorRT and a GPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from p3dmm.fitting.base.errors import EngineError, InputError
from p3dmm.runtime.backends import TensorRTBackend, load_backend
from p3dmm.runtime.manifest import Manifest, ModelEntry, TensorSpec, read_manifest, sha256_file

VERSION = "10.13.0.35"


class FakeCupy:
    """Device arrays are NumPy arrays with a fake pointer; every transfer is recorded."""

    def __init__(self, cc: str = "90") -> None:
        self.log: list[str] = []
        self.memory: dict[int, np.ndarray] = {}
        fake = self

        class ndarray(np.ndarray):  # noqa: N801 - mirrors cupy.ndarray
            @property
            def data(self):
                ptr = id(self)
                fake.memory[ptr] = self
                return SimpleNamespace(ptr=ptr)

            def set(self, host, stream=None):
                fake.log.append("set:" + ("pinned" if getattr(host, "base", None) is not None else "pageable"))
                np.copyto(np.asarray(self), host)

            def get(self):
                fake.log.append("get")
                return np.asarray(self).copy()

        self.ndarray = ndarray
        self.float32 = np.float32

        class Stream:
            def __init__(self, non_blocking=False):
                self.ptr = 1234
                fake.log.append(f"stream(non_blocking={non_blocking})")

            def synchronize(self):
                fake.log.append("synchronize")

        def alloc_pinned_memory(n):
            fake.log.append(f"pinned:{n}")
            return bytearray(n)

        self.cuda = SimpleNamespace(Stream=Stream, alloc_pinned_memory=alloc_pinned_memory,
                                    Device=lambda: SimpleNamespace(compute_capability=cc))  # fmt: skip

    def empty(self, shape, dtype=np.float32):
        return np.zeros(shape, dtype).view(self.ndarray)

    def asarray(self, a, dtype=np.float32):
        return np.asarray(a, dtype).view(self.ndarray)

    def ascontiguousarray(self, a, dtype=np.float32):
        return np.ascontiguousarray(a, dtype).view(self.ndarray)


class FakeTRT:
    """Plans are JSON: {"io": [[name, mode, shape]], "max_batch": n}. ``execute_async_v3``
    writes, for each output, the mean of the input image into every element."""

    __version__ = VERSION

    def __init__(self, cupy: FakeCupy, fail: str | None = None) -> None:
        self.fail, self.calls = fail, []
        rec = self
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, s=None: None})
        self.TensorIOMode = SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")

        class Context:
            def __init__(self, plan):
                self.plan, self.shapes, self.addr = plan, {}, {}

            def set_input_shape(self, name, shape):
                rec.calls.append(("set_input_shape", name, tuple(shape)))
                if shape[0] > self.plan["max_batch"]:
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def get_tensor_shape(self, name):
                b = self.shapes["image"][0]
                return next((b, *s[1:]) for n, _, s in self.plan["io"] if n == name)

            def set_tensor_address(self, name, ptr):
                rec.calls.append(("set_tensor_address", name))
                self.addr[name] = ptr
                return True

            def execute_async_v3(self, stream):
                rec.calls.append(("execute_async_v3", stream))
                if rec.fail == "execute":
                    return False
                x = cupy.memory[self.addr["image"]]
                for n, mode, _ in self.plan["io"]:
                    if mode == "OUTPUT":
                        cupy.memory[self.addr[n]][...] = x.reshape(x.shape[0], -1).mean(1)[:, None, None, None]
                return True

        class Engine:
            def __init__(self, plan):
                self.plan = plan
                self.num_io_tensors = len(plan["io"])

            def get_tensor_name(self, i):
                return self.plan["io"][i][0]

            def get_tensor_mode(self, name):
                return next(m for n, m, _ in self.plan["io"] if n == name)

            def get_tensor_shape(self, name):
                return next(tuple(s) for n, _, s in self.plan["io"] if n == name)

            def create_execution_context(self):
                return Context(self.plan)

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                try:
                    return Engine(json.loads(bytes(data)))
                except ValueError:
                    return None  # what TensorRT does for a bad plan

        self.Runtime = Runtime


def _engines(tmp_path, cc="9.0", version=VERSION, plan_text=None):
    io = [["image", "INPUT", [-1, 3, 512, 512]], ["uv", "OUTPUT", [-1, 2, 512, 512]]]
    plan = tmp_path / "uv.plan"
    plan.write_text(plan_text if plan_text is not None else json.dumps({"io": io, "max_batch": 4}))
    entry = ModelEntry(
        name="uv.trt", file="uv.plan", task="uv", kind="tensorrt", precision="fp32",
        inputs=(TensorSpec("image", ("batch", 3, 512, 512), "float32"),),
        outputs=(TensorSpec("uv", ("batch", 2, 512, 512), "float32"),), sha256=sha256_file(plan),
        uv_layout="uv-x", source={"path": "uv.pt"},
        tensorrt={"version": version, "compute_capability": cc, "batch": [1, 2, 4]},
    )  # fmt: skip
    Manifest(models=[entry]).write(tmp_path)
    return read_manifest(tmp_path), entry


def test_host_input_is_staged_through_pinned_memory_and_outputs_stay_on_the_device(tmp_path):
    cp = FakeCupy()
    trt = FakeTRT(cp)
    man, entry = _engines(tmp_path)
    with TensorRTBackend(tmp_path, entry, man, trt=trt, cupy=cp) as b:
        x = np.random.default_rng(0).random((2, 3, 512, 512), dtype=np.float32)
        out = b.infer({"image": x})
        assert isinstance(out["uv"], cp.ndarray) and out["uv"].shape == (2, 2, 512, 512)
        np.testing.assert_allclose(np.asarray(out["uv"])[:, 0, 0, 0], x.reshape(2, -1).mean(1), rtol=1e-6)
        assert "set:pinned" in cp.log and "get" not in cp.log  # no device -> host copy
        assert cp.log.index("synchronize") > cp.log.index("set:pinned")
        names = [c[0] for c in trt.calls]
        assert names.index("set_input_shape") < names.index("execute_async_v3")
        assert ("execute_async_v3", 1234) in trt.calls  # the backend's stream
        # a device input is used in place: no staging
        cp.log.clear()
        b.infer({"image": cp.asarray(x)})
        assert not any(s.startswith("set:") for s in cp.log)


def test_version_and_compute_capability_mismatches_name_the_rebuild(tmp_path):
    cp = FakeCupy(cc="89")
    man, entry = _engines(tmp_path)
    with pytest.raises(EngineError, match=r"compute capability 9.0, this GPU is 8.9; rebuild with: export-engines uv.pt"):
        TensorRTBackend(tmp_path, entry, man, trt=FakeTRT(cp), cupy=cp)
    man, entry = _engines(tmp_path, version="10.8.0.1")
    with pytest.raises(EngineError, match=r"built with TensorRT 10.8.0.1, this is TensorRT 10.13.0.35.*--tensorrt"):
        TensorRTBackend(tmp_path, entry, man, trt=FakeTRT(cp), cupy=cp)


def test_a_corrupt_plan_is_an_engine_error(tmp_path):
    cp = FakeCupy()
    man, entry = _engines(tmp_path, plan_text="garbage")
    with pytest.raises(EngineError, match="uv.plan: TensorRT cannot deserialise it"):
        TensorRTBackend(tmp_path, entry, man, trt=FakeTRT(cp), cupy=cp)


def test_run_time_failures(tmp_path):
    cp = FakeCupy()
    man, entry = _engines(tmp_path)
    b = TensorRTBackend(tmp_path, entry, man, trt=FakeTRT(cp, fail="execute"), cupy=cp)
    with pytest.raises(EngineError, match="execute_async_v3 failed"):
        b.infer({"image": np.zeros((1, 3, 512, 512), np.float32)})
    b = TensorRTBackend(tmp_path, entry, man, trt=FakeTRT(cp), cupy=cp)
    with pytest.raises(EngineError, match="outside the engine's profile"):
        b.infer({"image": np.zeros((5, 3, 512, 512), np.float32)})
    with pytest.raises(InputError, match="dtype float64"):
        b.infer({"image": np.zeros((1, 3, 512, 512))})
    b.close()
    with pytest.raises(EngineError, match="closed"):
        b.infer({"image": np.zeros((1, 3, 512, 512), np.float32)})


def test_auto_skips_tensorrt_without_it(tmp_path, caplog, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    _engines(tmp_path)
    with pytest.raises(Exception, match="tensorrt: tensorrt backend needs tensorrt and cupy"):
        load_backend(tmp_path, "uv", "auto")  # only a plan here: nothing else to fall back to

