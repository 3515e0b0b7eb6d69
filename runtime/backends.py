"""Predictor backends: one class each behind one small interface, and the registry.

Every backend is built from an engine directory's manifest entry, checks the file
against the manifest before loading it (sha256, io names and shapes; for TensorRT also
the TensorRT version and the GPU's compute capability), and offers
``inputs``/``outputs`` (:class:`~p3dmm.runtime.manifest.TensorSpec`), ``infer(feeds)``
(name -> array; float32 ``(B, 3, 512, 512)`` in, ``{output: (B, C, 512, 512)}`` out) and
``close()``; each is a context manager. ``infer`` is safe to call from several threads
(a lock where the engine's own context is not).

* :class:`OrtBackend` (``"ort-cpu"``, ``"ort-cuda"``, ``"ort-tensorrt"``): ONNX Runtime
  with the CPU, CUDA or TensorRT execution provider (engine cache on, in
  ``$P3DMM_CACHE/ort-tensorrt/<model sha256>``, default ``~/.cache/p3dmm``). ONNX Runtime falls back to the CPU with only a warning
  when a provider is unusable, so the provider really in use is checked with
  ``session.get_providers()`` and a fallback is a :class:`BackendUnavailableError`.
* :class:`TensorRTBackend` (``"tensorrt"``): a native TensorRT plan run with
  ``execute_async_v3`` on one CuPy stream, tensor addresses from CuPy arrays. Host
  inputs are staged through pinned memory; device (CuPy) inputs are used in place, and
  the outputs stay on the device (CuPy arrays) for the fitter.

:func:`load_backend` picks ``backend="auto"`` in the order TensorRT > ORT-CUDA > ORT-CPU
and logs which it chose and why each better one was skipped.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from p3dmm.fitting.base.errors import BackendUnavailableError, EngineError, InputError

from .manifest import Manifest, ModelEntry, TensorSpec, read_manifest, rebuild_command

if TYPE_CHECKING:  # the project-owned stub (export/stubs/tensorrt.pyi)
    import tensorrt

__all__ = ["BACKENDS", "Backend", "OrtBackend", "TensorRTBackend", "compute_capability", "load_backend"]

log = logging.getLogger("p3dmm")

#: Backend names, best first (the order ``"auto"`` tries).
BACKENDS = ("tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu")
_ORT_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}


def compute_capability(cupy: Any = None) -> str:
    """The current GPU's compute capability as ``"major.minor"`` (CuPy, else ``nvidia-smi``).

    Raises:
        BackendUnavailableError: neither can tell (no GPU or no driver).
    """
    import shutil
    import subprocess

    try:
        cp = cupy if cupy is not None else importlib.import_module("cupy")
        cc = str(cp.cuda.Device().compute_capability)  # e.g. "90"
        return f"{cc[:-1]}.{cc[-1]}"
    except Exception:  # noqa: BLE001, S110 - no CuPy, no driver or no device: ask nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()  # fmt: skip
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    raise BackendUnavailableError("cannot read the GPU's compute capability (no CuPy device and no nvidia-smi)")


class Backend:
    """The interface (and the shared checks) of every backend."""

    name = "backend"

    def __init__(self, directory: Path, entry: ModelEntry, manifest: Manifest) -> None:
        self.directory = Path(directory)
        self.entry = entry
        self.path = manifest.verify_file(directory, entry, rebuild=rebuild_command(entry, self.directory))
        self._lock = threading.Lock()

    @property
    def max_batch(self) -> int | None:
        """The largest batch the engine takes (a TensorRT plan's profile), None: any."""
        if self.entry.tensorrt and self.entry.tensorrt.get("batch"):
            return int(self.entry.tensorrt["batch"][2])
        return None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.entry.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.entry.outputs

    def _check_io(self, got_in: list[tuple[str, tuple]], got_out: list[tuple[str, tuple]]) -> None:
        want_in = [(t.name, tuple(t.shape)) for t in self.entry.inputs]
        want_out = [(t.name, tuple(t.shape)) for t in self.entry.outputs]
        if got_in != want_in or sorted(got_out) != sorted(want_out):
            raise EngineError(
                f"{self.path}: io {got_in} -> {got_out} differs from the manifest's {want_in} -> {want_out}; "
                f"rebuild with: {rebuild_command(self.entry, self.directory)}"
            )

    def _check_feeds(self, feeds: dict[str, Any]) -> int:
        names = [t.name for t in self.entry.inputs]
        if sorted(feeds) != sorted(names):
            raise InputError(f"{self.name}: inputs {sorted(feeds)}, expected {names}")
        batch = None
        for t in self.entry.inputs:
            a = feeds[t.name]
            shape = tuple(a.shape)
            if len(shape) != len(t.shape) or any(w != "batch" and w != g for w, g in zip(t.shape, shape)):
                raise InputError(f"{self.name}: input {t.name!r} has shape {shape}, expected {tuple(t.shape)}")
            if str(a.dtype) != t.dtype:
                raise InputError(f"{self.name}: input {t.name!r} has dtype {a.dtype}, expected {t.dtype}")
            batch = shape[0]
        return int(batch or 0)

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OrtBackend(Backend):
    """ONNX Runtime with one execution provider (``kind``: ``"ort-cpu"``, ``"ort-cuda"``,
    ``"ort-tensorrt"``)."""

    def __init__(self, directory: Path, entry: ModelEntry, manifest: Manifest, kind: str = "ort-cpu",
                 threads: int = 0, ort: Any = None) -> None:  # fmt: skip
        if entry.kind != "onnx":
            raise EngineError(f"{entry.file}: a {entry.kind} file, ONNX Runtime needs an onnx entry")
        super().__init__(directory, entry, manifest)
        self.name = kind
        try:
            ort = ort if ort is not None else importlib.import_module("onnxruntime")
        except ImportError as e:
            raise BackendUnavailableError(f"{kind} needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from e
        provider = _ORT_PROVIDERS[kind]
        if provider not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"{kind}: this onnxruntime has no {provider} (available: {ort.get_available_providers()}); "
                "install onnxruntime-gpu for CUDA / TensorRT"
            )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = int(threads)
        providers: list[Any] = [provider]
        if kind == "ort-tensorrt":
            # a user cache, not the engine directory (which may be read-only, e.g. installed)
            root = Path(os.environ.get("P3DMM_CACHE", Path.home() / ".cache" / "p3dmm"))
            cache = root / "ort-tensorrt" / entry.sha256[:16]
            cache.mkdir(parents=True, exist_ok=True)
            providers = [(provider, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                                     "trt_timing_cache_enable": True})]  # fmt: skip
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types for a bad model
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e
        used = self._session.get_providers()
        if not used or used[0] != provider:
            raise BackendUnavailableError(f"{kind}: ONNX Runtime fell back to {used} ({provider} is not usable here)")
        self._check_io([(i.name, tuple(i.shape)) for i in self._session.get_inputs()],
                       [(o.name, tuple(o.shape)) for o in self._session.get_outputs()])  # fmt: skip
        self._names = [o.name for o in self._session.get_outputs()]

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self._check_feeds(feeds)
        host = {k: np.ascontiguousarray(v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else v)
                for k, v in feeds.items()}  # fmt: skip
        # InferenceSession.run is thread-safe (ONNX Runtime's documented contract)
        return dict(zip(self._names, self._session.run(self._names, host)))

    def close(self) -> None:
        self._session = None


class TensorRTBackend(Backend):
    """A native TensorRT plan (see the module docstring)."""

    name = "tensorrt"

    def __init__(self, directory: Path, entry: ModelEntry, manifest: Manifest, trt: Any = None, cupy: Any = None,
                 capability: str | None = None) -> None:  # fmt: skip
        if entry.kind != "tensorrt":
            raise EngineError(f"{entry.file}: a {entry.kind} file, the TensorRT backend needs a plan")
        super().__init__(directory, entry, manifest)
        hint = rebuild_command(entry, self.directory)
        try:
            trt = trt if trt is not None else importlib.import_module("tensorrt")
            cupy = cupy if cupy is not None else importlib.import_module("cupy")
        except ImportError as e:
            raise BackendUnavailableError(f"tensorrt backend needs tensorrt and cupy ({e})") from e
        self._trt, self._cp = trt, cupy
        record = entry.tensorrt or {}
        if str(record.get("version")) != str(trt.__version__):
            raise EngineError(f"{self.path}: built with TensorRT {record.get('version')}, this is TensorRT "
                              f"{trt.__version__}: plans only run on the version that built them; rebuild with: {hint}")  # fmt: skip
        capability = capability or compute_capability(cupy)
        if str(record.get("compute_capability")) != capability:
            raise EngineError(f"{self.path}: built for compute capability {record.get('compute_capability')}, this GPU "
                              f"is {capability}; rebuild with: {hint}")  # fmt: skip
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime: tensorrt.Runtime = trt.Runtime(self._logger)
        engine: tensorrt.ICudaEngine | None = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineError(f"{self.path}: TensorRT cannot deserialise it (truncated, corrupt, or from another "
                              f"TensorRT/GPU; see the TensorRT log); rebuild with: {hint}")  # fmt: skip
        self._runtime: tensorrt.Runtime | None = runtime
        self._engine: tensorrt.ICudaEngine | None = engine
        got_in: list[tuple[str, tuple]] = []
        got_out: list[tuple[str, tuple]] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            shape = tuple("batch" if d == -1 else int(d) for d in engine.get_tensor_shape(name))
            (got_in if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else got_out).append((name, shape))
        self._check_io(got_in, got_out)
        context: tensorrt.IExecutionContext | None = engine.create_execution_context()
        if context is None:
            raise EngineError(f"{self.path}: create_execution_context failed (out of device memory?)")
        self._context: tensorrt.IExecutionContext | None = context
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._pinned: dict[str, Any] = {}

    def _device_input(self, name: str, a: Any) -> Any:
        cp = self._cp
        if isinstance(a, cp.ndarray):
            return cp.ascontiguousarray(a, dtype=cp.float32)
        host = np.ascontiguousarray(a, dtype=np.float32)
        buf = self._pinned.get(name)
        if buf is None or buf.nbytes < host.nbytes:  # pinned staging, grown on demand
            mem = cp.cuda.alloc_pinned_memory(host.nbytes)
            buf = np.frombuffer(mem, np.float32, host.size)
            self._pinned[name] = buf
        staged = buf[: host.size].reshape(host.shape)
        staged[...] = host
        d = cp.empty(host.shape, dtype=cp.float32)
        d.set(staged, stream=self._stream)
        return d

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        self._check_feeds(feeds)
        cp = self._cp
        with self._lock:  # one execution context: one inference at a time
            ctx = self._context
            if ctx is None:
                raise EngineError(f"{self.path}: the backend is closed")
            keep = {}
            for t in self.entry.inputs:
                d = self._device_input(t.name, feeds[t.name])
                keep[t.name] = d
                if not ctx.set_input_shape(t.name, tuple(d.shape)):
                    raise EngineError(f"{self.path}: input shape {tuple(d.shape)} outside the engine's profile "
                                      f"(batch {self.entry.tensorrt and self.entry.tensorrt.get('batch')})")  # fmt: skip
                ctx.set_tensor_address(t.name, int(d.data.ptr))
            out = {}
            for t in self.entry.outputs:
                shape = tuple(int(v) for v in ctx.get_tensor_shape(t.name))
                out[t.name] = cp.empty(shape, dtype=cp.float32)
                ctx.set_tensor_address(t.name, int(out[t.name].data.ptr))
            if not ctx.execute_async_v3(self._stream.ptr):
                raise EngineError(f"{self.path}: execute_async_v3 failed (see the TensorRT log)")
            self._stream.synchronize()  # the buffers must outlive the launch; outputs stay on the device
            del keep
        return out

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None


def _choose_entry(manifest: Manifest, task: str, kind: str, precision: str | None) -> ModelEntry | None:
    entries = manifest.find(task, kind, precision)
    if precision is None:  # fp32 first: the validated reference
        entries = sorted(entries, key=lambda m: m.precision != "fp32")
    return entries[0] if entries else None


def load_backend(directory: str | Path, task: str, backend: str = "auto", precision: str | None = None,
                 threads: int = 0) -> Backend:  # fmt: skip
    """Load the ``task`` model of an engine directory on ``backend``.

    Args:
        directory: an ``export-engines`` output directory.
        task: ``"normals"`` or ``"uv"``.
        backend: one of :data:`BACKENDS` or ``"auto"`` (TensorRT > ORT-CUDA > ORT-CPU).
        precision: ``"fp32"`` / ``"fp16"``, or None (fp32 when present).
        threads: ONNX Runtime CPU threads (0: its default).

    Raises:
        InputError: an unknown backend name.
        EngineError: no model for the task, or a file that fails its manifest checks.
        BackendUnavailableError: the named backend (or, for auto, every one) cannot run here.
    """
    directory = Path(directory)
    if backend != "auto" and backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected 'auto' or one of {BACKENDS}")
    manifest = read_manifest(directory)
    if not manifest.find(task):
        raise EngineError(f"{directory}: the manifest has no {task} model (has {sorted({m.task for m in manifest.models})})")
    order = ["tensorrt", "ort-cuda", "ort-cpu"] if backend == "auto" else [backend]
    skipped = []
    for name in order:
        entry = _choose_entry(manifest, task, "tensorrt" if name == "tensorrt" else "onnx", precision)
        if entry is None:
            skipped.append(f"{name}: no {'plan' if name == 'tensorrt' else 'onnx'} file for {task}"
                           + (f" in {precision}" if precision else ""))  # fmt: skip
            continue
        try:
            b: Backend = (TensorRTBackend(directory, entry, manifest) if name == "tensorrt"
                          else OrtBackend(directory, entry, manifest, kind=name, threads=threads))  # fmt: skip
        except BackendUnavailableError as e:
            if backend != "auto":
                raise
            skipped.append(f"{name}: {e}")
            continue
        log.info("%s: %s backend with %s%s", task, name, entry.file, f" (skipped {'; '.join(skipped)})" if skipped else "")
        return b
    raise BackendUnavailableError(f"{directory}: no backend can run the {task} model: " + "; ".join(skipped))
