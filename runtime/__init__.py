"""p3dmm.runtime: the torch-free inference runtime.

``from p3dmm.runtime import Reconstructor`` (see :mod:`p3dmm.runtime.reconstruct`). The
names are loaded on first use, so ``p3dmm --help`` does not import the fitter.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Reconstruction", "Reconstructor", "load_backend", "read_manifest"]

_WHERE = {
    "Reconstruction": "reconstruct",
    "Reconstructor": "reconstruct",
    "load_backend": "backends",
    "read_manifest": "manifest",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
