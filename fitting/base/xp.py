"""Array-module dispatch: one code path for NumPy (CPU) and CuPy (GPU).

Functions in :mod:`p3dmm.fitting` take their arrays as arguments and call
``xp = get_array_module(x)`` instead of importing numpy directly on the hot path,
so the same code runs on CuPy arrays without host round-trips.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, InputError

__all__ = [
    "LaggedFlag",
    "asarray_on",
    "constant",
    "cupy_or_raise",
    "download",
    "download_all",
    "get_array_module",
    "resolve_device",
    "to_numpy",
]


def get_array_module(*arrays: Any) -> ModuleType:
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    CuPy is only imported if it is already loaded (a CuPy array cannot exist
    otherwise), so calling this never pulls in CUDA.
    """
    import sys

    cp = sys.modules.get("cupy")
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def cupy_or_raise() -> ModuleType:
    """Import CuPy and check that a CUDA device is usable.

    Raises:
        BackendUnavailableError: CuPy is missing or no CUDA device/driver is present.
    """
    try:
        import cupy as cp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BackendUnavailableError(
            "device='cuda' needs CuPy: pip install 'p3dmm[gpu]' (cupy-cuda13x)"
        ) from e
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # cupy raises CUDARuntimeError without a driver
        raise BackendUnavailableError(f"device='cuda': CuPy is installed but no CUDA device is usable ({e})") from e
    if n < 1:
        raise BackendUnavailableError("device='cuda': no CUDA device found")
    return cp


def resolve_device(device: str | ModuleType) -> ModuleType:
    """The array module of a device: ``"cpu"`` -> numpy, ``"cuda"`` / ``"gpu"`` -> cupy.

    Resolve the device once at the boundary (e.g. in :func:`~p3dmm.fitting.fit`) and pass
    the returned module down; an array module passed in is returned as it is.

    Raises:
        InputError: an unknown device name.
        BackendUnavailableError: ``"cuda"`` without CuPy or without a usable CUDA device.
    """
    if isinstance(device, ModuleType):
        if device is np or device.__name__ == "cupy":
            return device
        raise InputError(f"device must be 'cpu', 'cuda' or the numpy/cupy module, got module {device.__name__!r}")
    if device == "cpu":
        return np
    if device in ("cuda", "gpu"):
        return cupy_or_raise()
    raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")


def to_numpy(x: Any) -> np.ndarray:
    """Copy a NumPy/CuPy array (or scalar) to a host NumPy array."""
    if hasattr(x, "get") and not isinstance(x, np.ndarray):
        return x.get()
    return np.asarray(x)


def asarray_on(xp: ModuleType, x: Any, dtype: Any = None) -> Any:
    """``xp.asarray`` that also accepts arrays from the other module."""
    if xp is np:
        return np.asarray(to_numpy(x), dtype=dtype)
    return xp.asarray(x, dtype=dtype)


def download(xp: ModuleType, **arrays: Any) -> dict[str, np.ndarray]:
    """Copy several device arrays to the host in one transfer (float64; shapes kept)."""
    return download_all(xp, [arrays])[0]


def download_all(xp: ModuleType, groups: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """:func:`download` of several groups of arrays (one per image of a batch) in one transfer.

    On CuPy the arrays are packed by one ``concatenate`` that also casts them to float64,
    then read back in one blocking copy.
    """
    if xp is np:
        return [{k: np.asarray(v, dtype=np.float64) for k, v in g.items()} for g in groups]
    flat = [xp.asarray(v).reshape(-1) for g in groups for v in g.values()]
    host = xp.concatenate(flat, dtype=xp.float64).get() if flat else np.zeros(0)
    out: list[dict[str, np.ndarray]] = []
    k0 = 0
    for g in groups:
        d = {}
        for k, v in g.items():
            size = int(np.prod(np.shape(v), dtype=np.int64))
            d[k] = host[k0 : k0 + size].reshape(np.shape(v))
            k0 += size
        out.append(d)
    return out


_CONSTANTS: dict[tuple[Any, ...], Any] = {}


def constant(xp: ModuleType, value: Any, dtype: Any) -> Any:
    """``value`` (host numbers) as a read-only-by-convention array on ``xp``'s device, cached.

    Small host constants used in every step (a fixed rotation, per-joint weights) would
    otherwise be copied to the GPU on every call. Callers must not modify the result.
    """
    arr = np.asarray(value, dtype=dtype)
    if xp is np:
        return arr
    key = (xp.__name__, xp.cuda.Device().id, arr.dtype.str, arr.shape, arr.tobytes())
    hit = _CONSTANTS.get(key)
    if hit is None:
        if len(_CONSTANTS) > 256:  # a bounded cache: constants are few and small
            _CONSTANTS.clear()
        hit = _CONSTANTS[key] = xp.asarray(arr)
    return hit


class LaggedFlag:
    """Poll a sticky device boolean (e.g. "converged") without making the host wait.

    On NumPy :meth:`poll` simply reads the flag. On CuPy it starts a non-blocking copy of
    the flag into pinned host memory, records an event after it, and on later calls reads
    the copy only once the event reports completion (``Event.done`` does not block); so
    the answer lags the device by a few calls. The flag must be sticky -- once True it
    stays True and the work queued after it changes nothing -- so acting late is safe.
    """

    def __init__(self, xp: ModuleType) -> None:
        self.xp = xp
        self._host: Any = None
        self._event: Any = None
        self.copies = 0  # device-to-host copies started (CuPy)

    def poll(self, flag: Any) -> bool:
        """True once ``flag`` (a 0-d bool array) is known to be True on the host."""
        if self.xp is np:
            return bool(flag)
        if self._event is not None:
            if not self._event.done:
                return False
            if bool(self._host[0]):
                return True
        if self._host is None:
            import cupyx

            self._host = cupyx.empty_pinned((1,), dtype=np.bool_)
        flag.reshape(1).get(out=self._host, blocking=False)
        self._event = self.xp.cuda.Event(disable_timing=True)
        self._event.record()
        self.copies += 1
        return False
