"""Load CUDA sources shipped beside their launch code into ``cupy.RawModule``.

A kernel lives as a plain ``.cu`` file (package data) in the package of the Python module
that validates its inputs and launches it: ``render/rasterize.cu`` beside
``render/raster.py``, ``fitter/uv_nn.cu`` beside ``fitter/uv_nn.py``; each has a CPU twin
in that module. A kernel is named by its package and file stem. Compile-time
constants are not pasted into the source text by hand: :func:`kernel_source`
prepends a generated ``#define`` preamble, followed by a ``#line 1`` directive so
compiler messages still point at the file's own line numbers. A ``.cu`` file
should give every constant it uses a default with ``#ifndef NAME / #define NAME
... / #endif`` so that it also compiles on its own (the nvcc check in the tests
compiles each file without a preamble).

:func:`load_module` compiles lazily and memoises one module per
``(device id, package, name, defines, options)``; it is thread-safe. Only it imports CuPy.

Example::

    from p3dmm.fitting.base.cuda import load_module
    mod = load_module("p3dmm.fitting.fitter", "uv_nn", defines={"BLOCK": 256, "RADIUS": 0.01})
    kernel = mod.get_function("uv_nn_search")
"""

from __future__ import annotations

import math
import os
import re
import threading
from importlib import resources
from typing import Any, Mapping, Sequence

from .errors import InputError
from .xp import cupy_or_raise

__all__ = [
    "DEFAULT_OPTIONS",
    "KERNEL_PACKAGES",
    "define_preamble",
    "fused_kernels",
    "kernel_array",
    "kernel_scalar",
    "kernel_source",
    "launch",
    "load_module",
    "read_kernel_file",
]

#: NVRTC options every module is compiled with unless the caller passes its own.
DEFAULT_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: The packages that ship ``.cu`` sources (the compile tests check every file in them).
KERNEL_PACKAGES = ("p3dmm.fitting.base", "p3dmm.fitting.model", "p3dmm.fitting.render", "p3dmm.fitting.fitter")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NAME = re.compile(r"^[A-Za-z0-9_]+$")

_modules: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()

Define = int | float | bool


def read_kernel_file(package: str, name: str) -> str:
    """Text of ``<name>.cu`` shipped in ``package``.

    Args:
        package: e.g. ``"p3dmm.fitting.render"``.
        name: file stem, e.g. ``"rasterize"``.

    Raises:
        InputError: ``name`` is not a plain file stem or no such file is shipped.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"kernel name must be a file stem like 'rasterize', got {name!r}")
    res = resources.files(package).joinpath(f"{name}.cu")
    if not res.is_file():
        raise InputError(f"no CUDA source {name}.cu in {package}")
    return res.read_text(encoding="utf-8")


def _literal(name: str, value: Define) -> str:
    """C literal for one define value (bool -> 0/1, int -> decimal, float -> double literal)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"define {name}: got {value!r}, expected a finite number")
        text = repr(value)  # shortest round-trip form: '0.5', '1e-06', '1.0'
        return f"({text})" if text.startswith("-") else text
    # numpy scalars: accept integer and floating kinds by duck typing
    kind = getattr(getattr(value, "dtype", None), "kind", None)
    if kind in ("i", "u"):
        return str(int(value))
    if kind == "f":
        return _literal(name, float(value))
    raise InputError(f"define {name}: got {type(value).__name__} {value!r}, expected int, float or bool")


def define_preamble(defines: Mapping[str, Define] | None) -> str:
    """``#define NAME value`` lines, sorted by name, one per define.

    Args:
        defines: compile-time constants; names must be C identifiers.

    Raises:
        InputError: a name is not an identifier or a value is not a finite int/float/bool.
    """
    lines = []
    for key in sorted(defines or {}):
        if not isinstance(key, str) or not _IDENTIFIER.match(key):
            raise InputError(f"define name must be a C identifier, got {key!r}")
        lines.append(f"#define {key} {_literal(key, defines[key])}\n")  # type: ignore[index]
    return "".join(lines)


def kernel_source(package: str, name: str, defines: Mapping[str, Define] | None = None) -> str:
    """Final source text handed to NVRTC: define preamble, ``#line 1``, the file.

    Pure function (no CuPy, no GPU); :func:`load_module` compiles exactly this text.

    Args:
        package: the package that ships the file.
        name: file stem of ``<name>.cu``.
        defines: compile-time constants prepended as ``#define`` lines.
    """
    body = read_kernel_file(package, name)
    return f"{define_preamble(defines)}#line 1 \"{name}.cu\"\n{body}"


def load_module(
    package: str,
    name: str,
    defines: Mapping[str, Define] | None = None,
    options: Sequence[str] | None = None,
) -> Any:
    """Compiled ``cupy.RawModule`` for ``<name>.cu`` of ``package`` on the current CUDA device (memoised).

    Args:
        package: the package that ships the file.
        name: file stem of ``<name>.cu``.
        defines: compile-time constants prepended as ``#define`` lines.
        options: NVRTC options; default :data:`DEFAULT_OPTIONS`.

    Returns:
        A ``cupy.RawModule``; get kernels with ``.get_function("kernel_name")``
        (kernels should be ``extern "C"`` so their names are not mangled).

    Raises:
        BackendUnavailableError: CuPy is not installed or no CUDA device is usable.
        InputError: bad name or defines.
    """
    cp = cupy_or_raise()
    opts = tuple(DEFAULT_OPTIONS if options is None else options)
    key_defines = tuple(sorted((k, _literal(k, v)) for k, v in (defines or {}).items()))
    device_id = cp.cuda.Device().id
    key = (device_id, package, name, key_defines, opts)
    with _lock:
        module = _modules.get(key)
        if module is None:
            source = kernel_source(package, name, defines)
            module = cp.RawModule(code=source, options=opts)
            module.compile()  # compile now, under the lock, so errors surface here
            _modules[key] = module
    return module


def fused_kernels(xp: Any) -> bool:
    """Whether the fused element-wise kernels run for array module ``xp``.

    True on CuPy unless the environment sets ``P3DMM_FUSED_KERNELS=0`` (which runs the
    same arithmetic as chains of CuPy operations instead: for A/B comparisons and for
    bisecting a kernel bug). NumPy always runs the CPU twins.
    """
    import numpy as np

    return xp is not np and os.environ.get("P3DMM_FUSED_KERNELS", "1") != "0"


def launch(
    package: str,
    name: str,
    function: str,
    n_threads: int,
    args: tuple[Any, ...],
    defines: Mapping[str, Define] | None = None,
    block: int = 128,
) -> None:
    """Run kernel ``function`` of ``<name>.cu`` on ``n_threads`` threads (1-D grid of ``block``).

    Nothing runs for ``n_threads <= 0``. ``args`` are passed as CuPy passes them (arrays
    as pointers: their dtypes must match the C signature; scalars as NumPy scalars).
    """
    if n_threads <= 0:
        return
    mod = load_module(package, name, defines)
    mod.get_function(function)(((n_threads + block - 1) // block,), (block,), args)


def kernel_array(xp: Any, a: Any, dtype: Any) -> Any:
    """``a`` as a C-contiguous array of ``dtype`` for a kernel's pointer argument.

    ``a`` itself when it already is one (no copy and no launch: on CuPy an
    ``ascontiguousarray`` that changes nothing is free, but it is still an operation in
    the op counts of the tests' emulation), else ``xp.ascontiguousarray(a, dtype=dtype)``.
    """
    if a.dtype == dtype and a.flags.c_contiguous:
        return a
    return xp.ascontiguousarray(a, dtype=dtype)


def kernel_scalar(xp: Any, x: Any, dtype: Any) -> Any:
    """A 0-d device array of ``dtype`` holding ``x``, for a kernel's pointer argument, or None.

    ``x`` itself when it already is one (the usual case on the GPU path, where such
    scalars are never read on the host). A Python number is filled on the device
    (``xp.full``: a fill kernel, not a host-to-device copy, so it is also allowed in a
    CUDA-graph capture). None for anything else (an array of another dtype or shape, a
    NumPy scalar): there the op chain's type promotion may differ from the kernel's
    arithmetic in ``dtype``, so the caller runs the chain instead.
    """
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return xp.full((), x, dtype=dtype)
    if isinstance(x, xp.ndarray) and x.dtype == dtype and x.ndim == 0:
        return x
    return None
