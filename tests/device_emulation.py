"""A strict stand-in for CuPy on the CPU: runs the ``device="cuda"`` code paths without a GPU.

CI has no GPU, so the CuPy branches of :mod:`p3dmm.fitting` (``xp is not np``: the CUDA
kernels, device-side validation, dense gathers, cupyx sparse products) would otherwise
never execute before a GPU machine is lent. :func:`emulated_cuda` installs fake
``cupy`` / ``cupyx`` modules whose arrays (:class:`DArray`) hold NumPy data but behave
like device arrays where it matters:

* ``numpy.asarray(device_array)`` raises ``TypeError`` (CuPy refuses implicit host
  conversion), as does mixing a NumPy array into a device operation.
* Every operation that makes CuPy wait for the device and copy to the host is recorded
  as a *sync event* with the p3dmm source line that caused it: ``float()``, ``int()``,
  ``bool()`` (``if`` on an array), ``.item()``, ``.tolist()``, data-dependent shapes
  (``nonzero``, ``flatnonzero``, ``argwhere``, ``unique``, boolean-mask indexing) and
  the library functions whose CuPy implementations synchronise internally
  (``bincount``: ``(x < 0).any()`` and ``int(x.max())``; ``linalg.lstsq``: the rank
  test; building a ``cupyx`` sparse matrix from COO data; sparse fancy indexing).
  Explicit copies (``.get()``, ``cupy.asnumpy``) are counted as downloads.
* Kernels (``load_module``) run the real ``.cu`` sources compiled for the host
  (:mod:`tests.host_cuda`), through the unchanged Python launch code.

Tests then check that the GPU path gives the CPU path's results and list exactly where it
would synchronise. Which CuPy functions synchronise was read from the CuPy 14 sources
(``cupy/_statistics/histogram.py``, ``cupy/linalg/_solve.py``,
``cupy/_manipulation/add_remove.py``); on a real GPU ``cupyx.allow_synchronize(False)``
is the authoritative check (the gpu-marked tests use it).
"""

from __future__ import annotations

import contextlib
import operator
import sys
import traceback
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
from p3dmm.fitting.base import cuda as _cuda

from .host_cuda import HostCuda, host_compiler

__all__ = ["DArray", "Recorder", "emulated_cuda"]


@dataclass
class SyncEvent:
    kind: str
    where: str  # "file.py:line in function" of the innermost p3dmm frame

    def __str__(self) -> str:
        return f"{self.kind} at {self.where}"


@dataclass
class Recorder:
    """What the emulated device saw."""

    syncs: list[SyncEvent] = field(default_factory=list)
    downloads: int = 0  # blocking copies to the host (the host waits for the device)
    async_copies: int = 0  # get(blocking=False) into pinned memory (the host does not wait)
    event_polls: int = 0
    uploads: int = 0
    ops: int = 0  # device operations that launch work (views and transfers excluded)
    graph_launches: int = 0  # CUDA graph launches (each also counts as one op)
    graph_nodes: int = 0  # operations captured into graphs (they run inside the launches)
    captures: int = 0  # stream captures ended
    capture: "_Capture | None" = None  # the stream capture in progress

    def sync(self, kind: str) -> None:
        if self.capture is not None:
            raise CaptureError(f"{kind} at {_caller()} during stream capture (cudaErrorStreamCaptureUnsupported)")
        self.syncs.append(SyncEvent(kind, _caller()))

    def upload(self, what: str = "a host value") -> None:
        if self.capture is not None:
            raise CaptureError(f"a host-to-device copy of {what} at {_caller()} during stream capture")
        self.uploads += 1

    def op(self) -> None:
        """One operation that launches device work (captured into a graph while capturing)."""
        if self.capture is not None:
            self.graph_nodes += 1
        else:
            self.ops += 1

    def since(self, n: int) -> list[SyncEvent]:
        return self.syncs[n:]


_PACKAGE_DIR = str(Path(_cuda.__file__).resolve().parents[1])  # p3dmm.fitting


def _caller() -> str:
    """The innermost stack frame inside p3dmm.fitting (else the innermost outside this file)."""
    fallback = "?"
    for fr in reversed(traceback.extract_stack()[:-2]):
        if fr.filename == __file__:
            continue
        if fr.filename.startswith(_PACKAGE_DIR):
            return f"{Path(fr.filename).name}:{fr.lineno} in {fr.name}"
        if fallback == "?":
            fallback = f"{Path(fr.filename).name}:{fr.lineno} in {fr.name}"
    return fallback


class CaptureError(RuntimeError):
    """What CuPy raises when a stream capture meets an operation it cannot capture."""


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _arrays(y: Any) -> list[np.ndarray]:
    if isinstance(y, DArray):
        return [y._a]
    if isinstance(y, tuple | list):
        return [a for v in y for a in _arrays(v)]
    return []


class _Capture:
    """A stream capture in progress: the tape a :class:`_Graph` replays.

    Like CUDA, a capture executes nothing: the emulation computes as it records (it has
    no other way to learn the shapes), then undoes that. Buffers that existed before the
    capture and were written by it are restored at the end; arrays created during the
    capture are filled with garbage (a real capture leaves them unwritten), so code that
    reads a captured result without launching the graph is caught. A launch replays the
    tape on the same buffers: Python control flow and Python scalars are frozen at
    capture, as in a real graph.
    """

    def __init__(self) -> None:
        self.tape: list[Any] = []
        self.created: dict[int, np.ndarray] = {}
        self.saved: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def new(self, compute: Any, out: Any) -> None:
        inputs = _closure_arrays(compute)
        # an output that shares memory with an input is a view (asarray of the same
        # dtype, ascontiguousarray of a contiguous array): no kernel, nothing to replay
        outs = [a for a in _arrays(out) if not any(np.may_share_memory(a, b) for b in inputs)]
        if not outs:
            return
        for a in outs:
            r = _root(a)
            self.created.setdefault(id(r), r)

        every = _arrays(out)
        keep = [any(a is o for o in outs) for a in every]

        def replay() -> None:
            res = compute()
            vals = [res] if len(every) == 1 and not isinstance(res, tuple | list) else list(_flatten(res))
            for o, v, k in zip(every, vals, keep):
                if k:
                    np.copyto(o, v)

        self.tape.append(replay)

    def write(self, target: np.ndarray, mutate: Any) -> None:
        """Before an in-place write to ``target``: keep a pre-capture buffer's contents."""
        r = _root(target)
        if id(r) not in self.created and id(r) not in self.saved:
            self.saved[id(r)] = (r, r.copy())
        self.tape.append(mutate)

    def finish(self) -> "_Graph":
        for r, copy in self.saved.values():
            np.copyto(r, copy)
        for r in self.created.values():
            if r.flags.c_contiguous and r.size:
                r.reshape(-1).view(np.uint8)[...] = 0x5A
        return _Graph(self.tape, list(self.created.values()))


def _closure_arrays(fn: Any) -> list[np.ndarray]:
    """The NumPy arrays an operation's closure reads (its inputs)."""
    out: list[np.ndarray] = []

    def visit(v: Any, depth: int = 0) -> None:
        if isinstance(v, np.ndarray):
            out.append(v)
        elif depth < 3 and isinstance(v, tuple | list):
            for x in v:
                visit(x, depth + 1)
        elif depth < 3 and isinstance(v, dict):
            for x in v.values():
                visit(x, depth + 1)
        elif hasattr(v, "__self__") and isinstance(v.__self__, np.ndarray):  # a bound method
            out.append(v.__self__)

    for cell in fn.__closure__ or ():
        visit(cell.cell_contents)
    return out


def _flatten(y: Any) -> Iterator[Any]:
    if isinstance(y, tuple | list):
        for v in y:
            yield from _flatten(v)
    else:
        yield y


class _Graph:
    """``cupy.cuda.Graph``: :meth:`launch` replays the captured operations (one launch)."""

    def __init__(self, tape: list[Any], keep: list[np.ndarray]) -> None:
        self._tape, self._keep = tape, keep  # the graph keeps its buffers alive (a private pool)

    def launch(self, stream: Any = None) -> None:
        rec = _rec()
        if rec.capture is not None:
            raise CaptureError("Graph.launch during stream capture")
        rec.graph_launches += 1
        rec.ops += 1
        for step in self._tape:
            step()


class _Stream:
    """``cupy.cuda.Stream``: a context that makes itself current, with stream capture."""

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False) -> None:
        self._capturing = False

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def begin_capture(self, mode: Any = None) -> None:
        rec = _rec()
        if rec.capture is not None:
            raise CaptureError("begin_capture: a capture is already in progress")
        rec.capture = _Capture()
        self._capturing = True

    def end_capture(self) -> _Graph:
        rec = _rec()
        if rec.capture is None or not self._capturing:
            raise CaptureError("end_capture without begin_capture")
        cap, rec.capture = rec.capture, None
        self._capturing = False
        rec.captures += 1
        return cap.finish()

    def is_capturing(self) -> bool:
        return self._capturing

    def synchronize(self) -> None:
        _rec().sync("Stream.synchronize")


def _out(compute: Any) -> Any:
    """Run an out-of-place device operation (counted; recorded while capturing)."""
    rec = _rec()
    rec.op()
    y = _wrap(compute())
    if rec.capture is not None:
        rec.capture.new(compute, y)
    return y


def _inplace(target: np.ndarray, mutate: Any) -> None:
    """Run a device operation that writes ``target`` in place (counted; recorded while capturing)."""
    rec = _rec()
    rec.op()
    if rec.capture is not None:
        rec.capture.write(target, mutate)
    mutate()


def _view(compute: Any, sources: Any) -> Any:
    """An operation that is a view when it can be (reshape & co.): no kernel; a copy is recorded."""
    y = _wrap(compute())
    rec = _rec()
    if rec.capture is not None:
        src = _arrays(list(sources))
        if not all(any(np.shares_memory(a, b) for b in src) for a in _arrays(y)):
            rec.capture.new(compute, y)
    return y


_REC: Recorder | None = None


def _rec() -> Recorder:
    if _REC is None:
        raise RuntimeError("device array used outside emulated_cuda()")
    return _REC


def _unwrap(x: Any, what: str, allow_host: bool = False) -> Any:
    if isinstance(x, DArray):
        return x._a
    if isinstance(x, np.ndarray):
        if allow_host:
            return x
        raise TypeError(f"{what}: a NumPy array of shape {x.shape} was passed to a device operation (CuPy raises here)")
    if isinstance(x, list):
        return [_unwrap(v, what, allow_host) for v in x]
    if isinstance(x, tuple):
        return tuple(_unwrap(v, what, allow_host) for v in x)
    if isinstance(x, scipy.sparse.spmatrix | scipy.sparse.sparray):
        raise TypeError(f"{what}: a scipy.sparse matrix in a device operation")
    return x


def _wrap(y: Any) -> Any:
    if isinstance(y, np.ndarray):
        return DArray(y)
    if isinstance(y, np.generic):
        return DArray(np.asarray(y))  # CuPy reductions return 0-d device arrays
    if isinstance(y, tuple):
        return tuple(_wrap(v) for v in y)
    if isinstance(y, list):
        return [_wrap(v) for v in y]
    return y


def _is_bool_index(k: Any) -> bool:
    if isinstance(k, DArray):
        return k._a.dtype == bool and k._a.ndim > 0
    if isinstance(k, np.ndarray):
        return k.dtype == bool and k.ndim > 0
    if isinstance(k, tuple):
        return any(_is_bool_index(v) for v in k)
    return False


def _index(key: Any) -> Any:
    if _is_bool_index(key):
        _rec().sync("boolean-mask indexing")
    if isinstance(key, tuple):
        return tuple(_index_part(k) for k in key)
    return _index_part(key)


def _index_part(k: Any) -> Any:
    if isinstance(k, DArray):
        return k._a
    if isinstance(k, np.ndarray):
        _rec().upload("a NumPy index array")  # CuPy copies it to the device
        return k
    return k


class DArray:
    """A device array: NumPy data, CuPy's rules (see the module docstring)."""

    __slots__ = ("_a", "__weakref__")
    __array_ufunc__ = None  # numpy_array + DArray -> DArray.__radd__ -> TypeError
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    # -------------------------------------------------------------- host transfers
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    def get(self, stream: Any = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        if _rec().capture is not None:
            raise CaptureError("a device-to-host copy during stream capture")
        if not blocking:
            assert isinstance(out, np.ndarray), "get(blocking=False) needs a pinned `out` array"
            _rec().async_copies += 1
            out[...] = self._a
            return out
        _rec().downloads += 1
        if out is not None:
            out[...] = self._a
            return out
        return self._a.copy()

    def _scalar_read(self, kind: str) -> np.ndarray:
        _rec().sync(kind)
        return self._a

    def __float__(self) -> float:
        return float(self._scalar_read("float()"))

    def __int__(self) -> int:
        return int(self._scalar_read("int()"))

    def __index__(self) -> int:
        return operator.index(self._scalar_read("index()"))

    def __bool__(self) -> bool:
        return bool(self._scalar_read("bool()"))

    def __complex__(self) -> complex:
        return complex(self._scalar_read("complex()"))

    def item(self) -> Any:
        return self._scalar_read(".item()").item()

    def tolist(self) -> Any:
        return self._scalar_read(".tolist()").tolist()

    def nonzero(self) -> Any:
        _rec().sync("nonzero")
        return _wrap(self._a.nonzero())

    # ------------------------------------------------------------------ attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    T = property(lambda self: DArray(self._a.T))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # no __array_interface__ & co.: NumPy must not see the data
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            what = f"ndarray.{name}"
            a = _unwrap(args, what)
            kw = {k: _unwrap(v, what) for k, v in kwargs.items()}
            compute = lambda: attr(*a, **kw)  # noqa: E731
            if name in _VIEW_METHODS:
                return _view(compute, (self, *args))
            if name in _INPLACE_METHODS:
                return _inplace(self._a, compute)
            return _out(compute)

        return method

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator["DArray"]:
        for i in range(len(self._a)):
            yield DArray(self._a[i, ...])  # a view, as on the device

    def __repr__(self) -> str:
        return f"DArray({self._a!r})"

    def __getitem__(self, key: Any) -> Any:
        idx = _index(key)
        a = self._a
        if _is_advanced_index(key):
            return _out(lambda: a[idx])  # a gather
        # basic slicing is a view; the Ellipsis keeps an integer index a 0-d view (NumPy
        # would return a scalar copy, CuPy returns a view)
        parts = idx if isinstance(idx, tuple) else (idx,)
        return _wrap(a[parts if Ellipsis in parts else (*parts, Ellipsis)])

    def __setitem__(self, key: Any, value: Any) -> None:
        idx = _index(key)
        a, v = self._a, _unwrap(value, "ndarray.__setitem__")

        def mutate() -> None:
            a[idx] = v

        _inplace(a, mutate)  # a fill or scatter kernel


def _binary(name: str) -> Any:
    op = getattr(operator, name + "_" if name in ("and", "or") else name)

    iop = getattr(operator, f"i{name}", None)

    def fwd(self: DArray, other: Any) -> Any:
        a, b = self._a, _unwrap(other, f"DArray {name}")
        return _out(lambda: op(a, b))

    def rev(self: DArray, other: Any) -> Any:
        a, b = self._a, _unwrap(other, f"DArray {name}")
        return _out(lambda: op(b, a))

    def inplace(self: DArray, other: Any) -> DArray:
        a, b = self._a, _unwrap(other, f"DArray i{name}")
        _inplace(a, lambda: iop(a, b))
        return self

    return fwd, rev, inplace


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor", "lshift", "rshift"):
    _f, _r, _i = _binary(_name)
    setattr(DArray, f"__{_name}__", _f)
    setattr(DArray, f"__r{_name}__", _r)
    setattr(DArray, f"__i{_name}__", _i)
for _name in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(DArray, f"__{_name}__", _binary(_name)[0])


def _unary(op: Any) -> Any:
    def f(self: DArray) -> Any:
        a = self._a
        return _out(lambda: op(a))

    return f


for _name in ("neg", "pos", "abs", "invert"):
    setattr(DArray, f"__{_name}__", _unary(getattr(operator, _name)))


# ------------------------------------------------------------------ the modules
# functions whose CuPy implementation reads the device (data-dependent output shapes,
# or explicit checks in the CuPy sources)
_SYNC_FUNCS = {"nonzero", "flatnonzero", "argwhere", "unique", "bincount", "compress", "extract"}
_UPLOAD_FUNCS = {"asarray", "array", "asanyarray"}
# no kernel: views, and asarray of a device array of the same dtype
_VIEW_FUNCS = {"reshape", "ravel", "broadcast_to", "transpose", "expand_dims", "squeeze", "swapaxes", "atleast_1d"}
_VIEW_METHODS = {"reshape", "view", "ravel", "transpose", "squeeze", "swapaxes"}
_INPLACE_METHODS = {"fill", "sort", "put"}


def _is_advanced_index(key: Any) -> bool:
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, DArray | np.ndarray | list) for k in parts)


def _function(fn: Any, name: str) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if name in _SYNC_FUNCS or (name == "where" and len(args) + len(kwargs) == 1):
            _rec().sync(name)
        host = name in _UPLOAD_FUNCS
        what = f"cupy.{name}"
        a = _unwrap(args, what, host)
        kw = {k: _unwrap(v, what, host) for k, v in kwargs.items()}
        compute = lambda: fn(*a, **kw)  # noqa: E731
        if host and args and not isinstance(args[0], DArray):
            _rec().upload(f"cupy.{name}")  # a host value (array, list or number) copied to the device
            return _wrap(compute())
        if name in _VIEW_FUNCS or (host and args and kwargs.get("dtype", args[0].dtype) == args[0].dtype):
            return _view(compute, (*args, *kwargs.values()))
        if "out" in kwargs:
            return _inplace(kw["out"], compute)
        if name == "copyto":  # writes its first argument
            return _inplace(a[0], compute)
        return _out(compute)

    call.__name__ = name
    return call


class _Module(types.ModuleType):
    """A module whose unknown attributes come from a NumPy namespace, wrapped."""

    def __init__(self, name: str, source: Any, sync_funcs: frozenset[str] = frozenset()) -> None:
        super().__init__(name)
        self._source = source
        self._sync = sync_funcs

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        obj = getattr(self._source, name)
        if isinstance(obj, type) or not callable(obj):
            return obj  # dtypes (cupy.float32 is numpy.float32) and constants
        f = _function(obj, name)
        if name in self._sync:

            def synced(*args: Any, **kwargs: Any) -> Any:
                _rec().sync(f"{self.__name__}.{name}")
                return f(*args, **kwargs)

            return synced
        return f


def _asnumpy(a: Any, *args: Any, **kwargs: Any) -> np.ndarray:
    if isinstance(a, DArray):
        return a.get()
    return np.asarray(a)


def _scatter_add(a: DArray, slices: Any, value: Any) -> None:
    """``cupyx.scatter_add`` (atomics on a GPU, no synchronisation)."""
    arr, idx, v = a._a, _index(slices), _unwrap(value, "cupyx.scatter_add")
    _inplace(arr, lambda: np.add.at(arr, idx, v))


class _CsrMatrix:
    """``cupyx.scipy.sparse.csr_matrix`` over scipy's, with CuPy's synchronisation points
    (``cupyx/scipy/sparse/_compressed.py``: COO input converts with ``sum_duplicates``,
    ``(data, indices, indptr)`` input reads ``indptr[0]`` and ``indptr[-1]``; a SciPy
    matrix is uploaded as is; products with dense arrays call ``sum_duplicates``, which
    checks ``has_canonical_format`` on the device unless it is known)."""

    def __init__(self, arg: Any, shape: Any = None, dtype: Any = None, _internal: bool = False) -> None:
        self.has_canonical_format = _internal
        if _internal:
            self._m = arg
            return
        if isinstance(arg, scipy.sparse.spmatrix | scipy.sparse.sparray):
            _rec().upload("a SciPy sparse matrix")
            self._m = scipy.sparse.csr_matrix(arg, dtype=dtype)
            return
        if isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[1], tuple):
            _rec().sync("cupyx csr_matrix from COO (sum_duplicates)")
            self.has_canonical_format = True
        elif isinstance(arg, tuple) and len(arg) == 3:
            _rec().sync("cupyx csr_matrix from (data, indices, indptr) (reads indptr[0], indptr[-1])")
        self._m = scipy.sparse.csr_matrix(_unwrap(arg, "csr_matrix"), shape=shape, dtype=dtype)
        _rec().op()

    def _canonical(self) -> None:
        if not self.has_canonical_format:
            _rec().sync("cupyx sparse has_canonical_format check")
            self.has_canonical_format = True

    shape = property(lambda self: self._m.shape)
    dtype = property(lambda self: self._m.dtype)
    nnz = property(lambda self: self._m.nnz)
    indices = property(lambda self: DArray(self._m.indices))
    indptr = property(lambda self: DArray(self._m.indptr))
    data = property(lambda self: DArray(self._m.data))

    def __getitem__(self, key: Any) -> "_CsrMatrix":
        _rec().sync("cupyx sparse fancy indexing (output nnz)")
        return _CsrMatrix(self._m[_index(key)], _internal=True)

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, _CsrMatrix):
            _rec().sync("cupyx sparse @ sparse")
            return _CsrMatrix(self._m @ other._m, _internal=True)
        self._canonical()
        m, b = self._m, _unwrap(other, "csr_matrix @")
        return _out(lambda: np.asarray(m @ b))

    def __rmatmul__(self, other: Any) -> Any:
        self._canonical()
        m, b = self._m, _unwrap(other, "@ csr_matrix")
        return _out(lambda: np.asarray(b @ m))

    def transpose(self) -> "_CsrMatrix":
        return _CsrMatrix(self._m.T.tocsr(), _internal=True)

    T = property(transpose)


class _Event:
    """``cupy.cuda.Event``: ``done`` turns True on the second query after ``record()``, so
    code polling it sees the lag of a real device."""

    LAG = 2

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False) -> None:
        self._queries = -1

    def record(self, stream: Any = None) -> None:
        self._queries = 0

    @property
    def done(self) -> bool:
        assert self._queries >= 0, "Event.done queried before record()"
        _rec().event_polls += 1
        self._queries += 1
        return self._queries >= self.LAG

    def synchronize(self) -> None:
        _rec().sync("Event.synchronize")


class _RecordingModule:
    """A host-compiled module whose kernel launches are device operations (captured into
    graphs like the others: a launch writes its array arguments in place)."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def get_function(self, name: str) -> Any:
        kernel = self._module.get_function(name)

        def launch(grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
            rec = _rec()
            rec.op()
            if rec.capture is not None:
                for a in args:
                    if isinstance(a, DArray):
                        rec.capture.write(a._a, lambda: None)
                rec.capture.tape.append(lambda: kernel(grid, block, args))
            kernel(grid, block, args)

        return launch


def _make_modules(host: HostCuda) -> dict[str, types.ModuleType]:
    cp = _Module("cupy", np, frozenset())
    cp.ndarray = DArray  # type: ignore[attr-defined]
    cp.asnumpy = _asnumpy  # type: ignore[attr-defined]
    cp.linalg = _Module("cupy.linalg", np.linalg, frozenset({"lstsq"}))  # type: ignore[attr-defined]
    device = types.SimpleNamespace(id=0, synchronize=lambda: None)
    null_stream = _Stream(null=True)

    class _MemoryPool:  # a private pool: the emulation has no allocator to replace
        def malloc(self, size: int) -> None:
            raise AssertionError("the emulation does not allocate through memory pools")

    cp.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, streamCaptureModeRelaxed=2),
        Device=lambda *a: device,
        Event=_Event,
        Stream=_Stream,
        Graph=_Graph,
        get_current_stream=lambda: null_stream,
        MemoryPool=_MemoryPool,
        using_allocator=lambda allocator=None: contextlib.nullcontext(),
    )

    def raw_module(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("kernels must be loaded through p3dmm.fitting.base.cuda.load_module")

    cp.RawModule = raw_module  # type: ignore[attr-defined]

    def empty(shape: Any, dtype: Any = float) -> DArray:  # garbage, like uninitialised device memory
        out = np.empty(shape, dtype=dtype)
        out.view(np.uint8)[...] = 0x5A
        return DArray(out)

    cp.empty = empty  # type: ignore[attr-defined]
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = _scatter_add  # type: ignore[attr-defined]
    cupyx.empty_pinned = lambda shape, dtype=float: np.empty(shape, dtype)  # type: ignore[attr-defined]
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    sparse = types.ModuleType("cupyx.scipy.sparse")
    sparse.csr_matrix = _CsrMatrix  # type: ignore[attr-defined]
    cupyx.scipy = cupyx_scipy  # type: ignore[attr-defined]
    cupyx_scipy.sparse = sparse  # type: ignore[attr-defined]
    return {"cupy": cp, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy, "cupyx.scipy.sparse": sparse}


@contextlib.contextmanager
def emulated_cuda(build_dir: Path) -> Iterator[Recorder]:
    """Within the block ``import cupy`` (and ``cupyx``) give the emulation; yields its :class:`Recorder`.

    Per-process caches of device objects (the fitter's model cache, the LM incidence
    matrix) are cleared on entry and exit so no emulated array leaks into other tests.
    """
    import pytest

    global _REC
    cxx = host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to run the CUDA sources on the CPU")
    host = HostCuda(build_dir, cxx, unwrap=lambda a: a._a if isinstance(a, DArray) else a)
    rec = Recorder()
    modules = _make_modules(host)
    _clear_caches()
    prev = _REC
    _REC = rec
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, mod in modules.items():
                mp.setitem(sys.modules, name, mod)
            mp.setattr(_cuda, "load_module", lambda *a, **k: _RecordingModule(host.load_module(*a, **k)))
            rec.host = host  # type: ignore[attr-defined]
            yield rec
    finally:
        _REC = prev
        _clear_caches()


def _clear_caches() -> None:
    from p3dmm.fitting.base import graph, xp
    from p3dmm.fitting.fitter import fast, problem

    problem._MODEL_CACHE.clear()
    fast._INCIDENCE.clear()
    graph._WARM.clear()
    xp._CONSTANTS.clear()
