"""ONNX -> TensorRT plan with the TensorRT 10 / 11 Python API (thin by design).

Written from NVIDIA's API documentation and the pybind sources of TensorRT 10.13 and
11.1 (DEPLOY_FACTS.md section 1); TensorRT cannot be installed on the machines this was
developed on, so its control flow is tested against a recording stand-in of the module
(``tests/export/fake_tensorrt.py``) and its types against ``export/stubs/tensorrt.pyi``.

What it does, in order, checking every None / False return:

1. A strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``: required
   for precision from the graph on 10.x, always on and ignored on 11.x; ``EXPLICIT_BATCH``
   is not used, it is gone in 11). Precision therefore comes from the ONNX: the fp16
   plan is built from ``<task>.fp16.onnx`` (TensorRT 11 has no FP16 builder flag).
2. ``OnnxParser.parse_from_file``; on failure every parser error (description, node name,
   operator) goes into the :class:`EngineError`.
3. Builder config: workspace pool limit, builder optimisation level, one optimisation
   profile for the batch range ``(min, opt, max)`` of the ``image`` input, and a timing
   cache read from and written back to a file (reused across builds; a cache from
   another device is rejected by TensorRT and a fresh one is used).
4. ``build_serialized_network``; the plan is deserialised once more with a ``Runtime``
   and its io (names, modes, shapes) is compared with the ONNX before it is written.

The manifest records ``trt.__version__`` and the GPU's compute capability: a plan runs
only with the TensorRT version and GPU generation it was built with, and nothing can read
the version back out of a plan.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import BackendUnavailableError, EngineError
from p3dmm.runtime.backends import compute_capability
from p3dmm.runtime.manifest import IMAGE_INPUT, TensorSpec

if TYPE_CHECKING:  # the project-owned stub, export/stubs/tensorrt.pyi: the calls below are type-checked
    import tensorrt

__all__ = ["BuildOptions", "build_engine", "compute_capability", "tensorrt_module"]

log = logging.getLogger("p3dmm.export")


@dataclass(frozen=True)
class BuildOptions:
    """TensorRT build settings.

    Attributes:
        batch: ``(min, opt, max)`` batch sizes of the optimisation profile.
        workspace_bytes: the workspace memory pool limit.
        optimization_level: ``builder_optimization_level`` (0-5; TensorRT's default 3).
        timing_cache: file the timing cache is read from (when it exists) and written to.
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    workspace_bytes: int = 4 << 30
    optimization_level: int = 3
    timing_cache: Path | None = None


def tensorrt_module() -> ModuleType:
    """``import tensorrt``, or a :class:`BackendUnavailableError` that says what to install."""
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        raise BackendUnavailableError(
            "--tensorrt needs TensorRT 10 or 11 and an NVIDIA GPU: pip install tensorrt "
            f"(NVIDIA's wheels; {type(e).__name__}: {e})"
        ) from e


def _dims(d: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in d)


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    io: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]],
    options: BuildOptions = BuildOptions(),
    trt: Any = None,
    capability: str | None = None,
) -> dict[str, Any]:
    """Build ``plan_path`` from ``onnx_path`` (see the module docstring).

    Args:
        onnx_path: the ONNX file (fp32 or the mixed-precision fp16 graph).
        plan_path: where the plan is written (atomically).
        io: the ONNX's (inputs, outputs) the plan must reproduce.
        options: build settings.
        trt: the ``tensorrt`` module (default: imported; tests pass a stand-in).
        capability: the GPU's compute capability (default: :func:`compute_capability`).

    Returns:
        The manifest's ``tensorrt`` record.

    Raises:
        BackendUnavailableError: TensorRT or a GPU is missing.
        EngineError: any build step failed (with TensorRT's own messages).
    """
    trt = trt if trt is not None else tensorrt_module()
    capability = capability or compute_capability()  # before minutes of building
    lo, opt, hi = options.batch
    if not 1 <= lo <= opt <= hi:
        raise EngineError(f"--batch {lo},{opt},{hi}: need 1 <= MIN <= OPT <= MAX")
    logger = trt.Logger(trt.Logger.WARNING)
    builder: tensorrt.Builder | None = trt.Builder(logger)
    if builder is None:
        raise EngineError("tensorrt.Builder could not be created (is a CUDA device visible?)")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network: tensorrt.INetworkDefinition | None = builder.create_network(flags)
    if network is None:
        raise EngineError("tensorrt: create_network(STRONGLY_TYPED) failed")
    parser: tensorrt.OnnxParser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            err: tensorrt.ParserError = parser.get_error(i)
            errors.append(f"node {err.node_name() or err.node()} ({err.node_operator()}): {err.desc()}")
        raise EngineError(f"{onnx_path}: TensorRT's ONNX parser failed: " + ("; ".join(errors) or "no error reported"))

    config: tensorrt.IBuilderConfig | None = builder.create_builder_config()
    if config is None:
        raise EngineError("tensorrt: create_builder_config failed")
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    config.builder_optimization_level = int(options.optimization_level)
    cache_bytes = b""
    if options.timing_cache is not None and options.timing_cache.is_file():
        cache_bytes = options.timing_cache.read_bytes()
    cache: tensorrt.ITimingCache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        log.warning("[engine] timing cache %s does not match this device/version; starting a new one", options.timing_cache)
        config.set_timing_cache(config.create_timing_cache(b""), False)
    _, c, h, w = io[0][0].shape
    profile: tensorrt.IOptimizationProfile = builder.create_optimization_profile()
    profile.set_shape(IMAGE_INPUT, (lo, c, h, w), (opt, c, h, w), (hi, c, h, w))
    if config.add_optimization_profile(profile) < 0:
        raise EngineError(f"tensorrt: the optimisation profile for batch {options.batch} was rejected")

    log.info("[engine] building %s from %s (batch %d..%d, opt %d; this takes minutes)", plan_path.name, onnx_path.name, lo, hi, opt)
    plan: tensorrt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{onnx_path}: TensorRT build_serialized_network failed (see the TensorRT log above)")
    data = bytes(memoryview(plan))
    runtime: tensorrt.Runtime = trt.Runtime(logger)
    engine: tensorrt.ICudaEngine | None = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise EngineError(f"{plan_path}: the freshly built plan does not deserialise")
    got_in: list[tuple[str, tuple[int | str, ...]]] = []
    got_out: list[tuple[str, tuple[int | str, ...]]] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple("batch" if d == -1 else d for d in _dims(engine.get_tensor_shape(name)))
        (got_in if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else got_out).append((name, shape))
    want_in = [(t.name, t.shape) for t in io[0]]
    want_out = [(t.name, t.shape) for t in io[1]]
    if got_in != want_in or sorted(got_out) != sorted(want_out):
        raise EngineError(f"{plan_path}: engine io {got_in} -> {got_out}, expected {want_in} -> {want_out} (from {onnx_path})")
    atomic_write_bytes(plan_path, data)
    if options.timing_cache is not None:
        used = config.get_timing_cache()
        if used is not None:
            atomic_write_bytes(options.timing_cache, bytes(memoryview(used.serialize())))
    return {
        "version": str(trt.__version__),
        "compute_capability": capability,
        "batch": [lo, opt, hi],
        "workspace_bytes": int(options.workspace_bytes),
        "builder_optimization_level": int(options.optimization_level),
        "strongly_typed": True,
        "from": onnx_path.name,
    }
