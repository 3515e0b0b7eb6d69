"""Array-module dispatch: one code path for NumPy (CPU) and CuPy (GPU).

Functions in :mod:`p3dmm.fitting` take their arrays as arguments and call
``xp = get_array_module(x)`` instead of importing numpy directly on the hot path,
so the same code runs on CuPy arrays without host round-trips.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from .errors import BackendUnavailableError

__all__ = ["get_array_module", "cupy_or_raise", "to_numpy", "device_of", "asarray_on"]


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


def device_of(device: str) -> ModuleType:
    """Array module for a device name: ``"cpu"`` -> numpy, ``"cuda"`` -> cupy."""
    if device == "cpu":
        return np
    if device in ("cuda", "gpu"):
        return cupy_or_raise()
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


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
