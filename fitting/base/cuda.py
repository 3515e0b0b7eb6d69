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
import re
import threading
from importlib import resources
from typing import Any, Mapping, Sequence

from .errors import InputError
from .xp import cupy_or_raise

__all__ = ["DEFAULT_OPTIONS", "KERNEL_PACKAGES", "define_preamble", "kernel_source", "load_module", "read_kernel_file"]

#: NVRTC options every module is compiled with unless the caller passes its own.
DEFAULT_OPTIONS: tuple[str, ...] = ("--std=c++17",)

#: The packages that ship ``.cu`` sources (the compile tests check every file in them).
KERNEL_PACKAGES = ("p3dmm.fitting.render", "p3dmm.fitting.fitter")
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
