"""Shared pytest configuration: hardware markers skip with a reason when absent."""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=None)
def cuda_unavailable_reason() -> str | None:
    """None when CuPy can run kernels on a CUDA device, else why not."""
    try:
        import cupy as cp
    except Exception as e:  # noqa: BLE001 - any import failure means no GPU tests
        return f"cupy not importable ({type(e).__name__}: {e})"
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
        cp.zeros(1).sum().item()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError without a driver
        return f"no usable CUDA device ({type(e).__name__})"
    return None


@functools.lru_cache(maxsize=None)
def tensorrt_unavailable_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"tensorrt not importable ({type(e).__name__})"
    return cuda_unavailable_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "gpu" in item.keywords:
            reason = cuda_unavailable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
        if "trt" in item.keywords:
            reason = tensorrt_unavailable_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"trt test: {reason}"))
