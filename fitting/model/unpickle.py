"""Restricted readers for FLAME's pickles and ``.npy`` / ``.npz`` files, without chumpy and torch.

FLAME ships its model as Python pickles: FLAME 2020 ``generic_model.pkl`` and FLAME 2023
``flame2023.pkl`` / ``flame2023_no_jaw.pkl`` hold chumpy objects (written by Python 2,
so they need ``encoding='latin1'``), FLAME 2023 Open ``flame2023_Open.pkl`` holds plain
arrays. The landmark embedding that DECA and MICA use (``landmark_embedding.npy``) is an
``.npy`` file whose object payload contains pickled torch tensors. Unpickling any of
these with :mod:`pickle` as is would import chumpy / torch and would run whatever
callable the file names, so every pickle here goes through :class:`FlameUnpickler`: its
``find_class`` hands out only numpy array reconstruction, scipy sparse matrices (as
inert state holders), inert stubs for chumpy classes and numpy re-implementations of the
few torch functions a plain-pickled CPU tensor references. Everything else is refused
with :class:`~p3dmm.fitting.base.errors.ModelFileError` before it can run.

Public: :class:`FlameUnpickler`, :func:`load_pickle`, :func:`read_npy`,
:func:`read_mapping` (pickle / ``.npz`` -> dict), the stubs :class:`ChumpyStub` and
:class:`SparseMatrixStub`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import io
import os
import pickle
import types
import zipfile
from os import PathLike
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import numpy.lib.format as npy_format

from ..base.errors import ModelFileError

__all__ = ["ChumpyStub", "FlameUnpickler", "SparseMatrixStub", "load_pickle", "read_mapping", "read_npy"]

# ======================================================================================
# Restricted unpickling
# ======================================================================================


class _InertObject:
    """Base of the stand-ins the unpickler builds instead of foreign classes.

    Accepts any constructor arguments and any pickled state and does nothing with
    them, so building one can never run code from the file.
    """

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_args"] = args
        self.__dict__["_state"] = kwargs or None

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_state")


class ChumpyStub(_InertObject):
    """Stand-in for a chumpy object; exposes the array chumpy keeps under ``'x'``."""

    @property
    def x(self) -> Any:
        state = self.state
        if isinstance(state, dict):
            return state.get("x")
        return None


class SparseMatrixStub(_InertObject):
    """Stand-in for a pickled scipy csc/csr matrix; converted to dense by :meth:`to_dense`."""

    sparse_format = "csc"

    def to_dense(self, source: str, key: str) -> np.ndarray:
        """Dense ``(rows, cols) float64`` matrix from the pickled ``data/indices/indptr``.

        Raises:
            ModelFileError: the pickled state is not a consistent csc/csr matrix.
        """
        state = self.state if isinstance(self.state, dict) else {}
        shape: Any = state.get("_shape", state.get("shape"))
        try:
            data = np.asarray(state["data"], dtype=np.float64).reshape(-1)
            indices = np.asarray(state["indices"]).reshape(-1).astype(np.int64)
            indptr = np.asarray(state["indptr"]).reshape(-1).astype(np.int64)
            rows, cols = (int(s) for s in shape)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(
                f"{source}: key '{key}' is a scipy {self.sparse_format} matrix without usable "
                f"data/indices/indptr/_shape state ({type(e).__name__}: {e})"
            ) from e
        outer, inner = (cols, rows) if self.sparse_format == "csc" else (rows, cols)
        ok = (
            rows >= 0
            and cols >= 0
            and len(indptr) == outer + 1
            and indptr[0] == 0
            and np.all(np.diff(indptr) >= 0)
            and indptr[-1] == len(indices) == len(data)
            and (len(indices) == 0 or (indices.min() >= 0 and indices.max() < inner))
        )
        if not ok:
            raise ModelFileError(
                f"{source}: key '{key}' is an inconsistent scipy {self.sparse_format} matrix of "
                f"shape ({rows}, {cols}) (indptr {len(indptr)} entries, {len(indices)} indices, {len(data)} values)"
            )
        dense = np.zeros((rows, cols), dtype=np.float64)
        outer_ids = np.repeat(np.arange(outer), np.diff(indptr))
        if self.sparse_format == "csc":
            # dense[indices[k], col(k)] += data[k]
            np.add.at(dense, (indices, outer_ids), data)
        else:
            np.add.at(dense, (outer_ids, indices), data)
        return dense


class _CscStub(SparseMatrixStub):
    sparse_format = "csc"


class _CsrStub(SparseMatrixStub):
    sparse_format = "csr"


class _TorchTypeStub(_InertObject):
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` classes named by a pickle."""


class _TorchStorage:
    """A torch storage rebuilt as a flat numpy array (``array`` is None until read)."""

    def __init__(self, dtype: np.dtype, numel: int, key: str, array: np.ndarray | None = None) -> None:
        self.dtype = dtype
        self.numel = numel
        self.key = key
        self.array = array


@dataclasses.dataclass(frozen=True)
class _TorchStorageType:
    """What a pickled ``torch.FloatStorage`` (etc.) global stands for: its element dtype."""

    name: str
    dtype: np.dtype


@dataclasses.dataclass
class _PendingTensor:
    """A tensor whose storage bytes come after the pickle (legacy ``torch.save`` layout)."""

    storage: _TorchStorage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


_TORCH_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}

#: ``torch.save`` legacy (non-zip) layout: magic number and protocol version pickles.
_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001

_MODULE_ALIASES = {"copy_reg": "copyreg", "__builtin__": "builtins"}


def _numpy_core_module(name: str) -> Any:
    """``numpy._core.<name>`` on numpy 2, ``numpy.core.<name>`` on numpy 1."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:  # numpy 1.x
        return importlib.import_module(f"numpy.core.{name}")


def _canonical_module(module: str) -> str:
    """Map Python 2 and numpy 1 module names onto one spelling (``numpy._core``)."""
    module = _MODULE_ALIASES.get(module, module)
    if module == "numpy.core" or module.startswith("numpy.core."):
        module = "numpy._core" + module[len("numpy.core") :]
    return module


def _frombuffer_copy(buffer: Any, dtype: Any, shape: Any, order: str = "C") -> np.ndarray:
    """numpy's protocol-5 array rebuild (``numpy._core.numeric._frombuffer``), as a copy."""
    arr = np.frombuffer(bytes(buffer), dtype=np.dtype(dtype))
    return arr.reshape(tuple(shape), order="F" if order == "F" else "C").copy()


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it to store ``bytes``: latin-1 only."""
    if not isinstance(text, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as encode(str, 'latin1'), got {encoding!r}")
    return text.encode("latin1")


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` restricted to the inert stand-ins (protocol 0/1 pickles)."""
    if not (isinstance(cls, type) and issubclass(cls, _InertObject) and base is object):
        raise pickle.UnpicklingError(f"copyreg._reconstructor is only allowed for stand-in classes, got {cls!r}")
    return cls.__new__(cls)


@functools.lru_cache(maxsize=1)
def _allowed_callables() -> dict[tuple[str, str], Any]:
    multiarray = _numpy_core_module("multiarray")
    return {
        ("numpy._core.multiarray", "_reconstruct"): multiarray._reconstruct,
        ("numpy._core.multiarray", "scalar"): multiarray.scalar,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer_copy,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "object"): object,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
    }


@functools.lru_cache(maxsize=256)
def _chumpy_stub_class(qualified_name: str) -> type:
    """One ChumpyStub subclass per chumpy class name (so messages can name it)."""
    return type(qualified_name.rsplit(".", 1)[-1], (ChumpyStub,), {"qualified_name": qualified_name})


_SPARSE_CLASSES = {"csc_matrix": _CscStub, "csc_array": _CscStub, "csr_matrix": _CsrStub, "csr_array": _CsrStub}


class FlameUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a FLAME-family file needs.

    Allowed: numpy array/dtype/scalar reconstruction (``numpy.core`` and ``numpy._core``
    spellings alike), scipy csc/csr matrices (rebuilt as :class:`SparseMatrixStub`),
    any ``chumpy.*`` class (rebuilt as :class:`ChumpyStub`), ``collections.OrderedDict``,
    a few inert builtins, ``_codecs.encode`` for latin-1 only, and the torch functions a
    plain-pickled CPU tensor references (``torch._utils._rebuild_tensor_v2``,
    ``torch.storage._load_from_bytes``, ``torch.<Type>Storage``), re-implemented on numpy.
    torch itself is never imported. Anything else raises :class:`ModelFileError`
    naming the file and the refused ``module.name``, before it is called.

    Args:
        file: binary file object positioned at a pickle.
        source: file path (or description) used in error messages.
        persistent_load: optional handler for persistent ids (torch.save payloads).
    """

    def __init__(
        self, file: BinaryIO, source: str, persistent_load: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(file, encoding="latin1")
        self._source = source
        self._persistent_load = persistent_load

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102 - documented on the class
        if self._persistent_load is None:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.60} outside a torch.save payload")
        return self._persistent_load(pid)

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - documented on the class
        canonical = _canonical_module(module)
        found = _allowed_callables().get((canonical, name))
        if found is not None:
            # a fresh partial per lookup, so a BUILD opcode aimed at the returned object can
            # at most change this file's copy, never this module's functions
            return functools.partial(found) if isinstance(found, types.FunctionType) else found
        if canonical == "chumpy" or canonical.startswith("chumpy."):
            return _chumpy_stub_class(f"{canonical}.{name}")
        if canonical.startswith("scipy.sparse") and name in _SPARSE_CLASSES:
            return _SPARSE_CLASSES[name]
        if canonical == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TorchStorageType(name, np.dtype(_TORCH_STORAGE_DTYPES[name]))
        if (canonical, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return _TorchTypeStub
        if (canonical, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return functools.partial(_rebuild_tensor, source=self._source)
        if (canonical, name) == ("torch._utils", "_rebuild_tensor"):
            return functools.partial(_rebuild_tensor, source=self._source)
        if (canonical, name) == ("torch._utils", "_rebuild_parameter"):
            return functools.partial(_rebuild_parameter)
        if (canonical, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return functools.partial(_rebuild_from_type_v2)
        if (canonical, name) == ("torch.storage", "_load_from_bytes"):
            return functools.partial(_load_torch_payload, source=self._source)
        raise ModelFileError(
            f"{self._source}: refused to unpickle {module}.{name}; a FLAME file may only reference "
            "numpy arrays, scipy sparse matrices, chumpy arrays and torch CPU tensors"
        )


# ------------------------------------------------------------------ torch tensors


def _rebuild_tensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
    *,
    source: str,
) -> np.ndarray | _PendingTensor:
    """numpy version of ``torch._utils._rebuild_tensor_v2``: a strided view, copied."""
    if not isinstance(storage, _TorchStorage):
        raise ModelFileError(f"{source}: a pickled tensor refers to {type(storage).__name__}, expected a storage")
    try:
        offset = int(storage_offset)
        size_t = tuple(int(s) for s in size)
        stride_t = tuple(int(s) for s in stride)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: a pickled tensor has a malformed size/stride ({e})") from e
    if len(size_t) != len(stride_t) or offset < 0 or min(size_t + stride_t, default=0) < 0:
        raise ModelFileError(f"{source}: a pickled tensor has size {size_t}, stride {stride_t}, offset {offset}")
    if storage.array is None:
        return _PendingTensor(storage, offset, size_t, stride_t)
    return _tensor_from_storage(storage.array, offset, size_t, stride_t, source)


def _tensor_from_storage(
    flat: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...], source: str
) -> np.ndarray:
    """Copy of ``flat[offset + sum_d i_d * stride_d]`` over the index grid ``size``."""
    if any(s == 0 for s in size):
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= len(flat):
        raise ModelFileError(
            f"{source}: a pickled tensor of size {size}, stride {stride}, offset {offset} reaches element "
            f"{last} of a storage with {len(flat)} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * flat.itemsize for st in stride), writeable=False
    )
    return np.array(view, copy=True)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    """``torch._utils._rebuild_parameter``: a parameter is its data."""
    return data


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: Any, state: Any) -> Any:
    """``torch._tensor._rebuild_from_type_v2``: rebuild with ``func`` (already restricted), drop the type."""
    return func(*args)


def _resolve_pending(obj: Any, source: str) -> Any:
    """Replace :class:`_PendingTensor` placeholders inside containers by arrays."""
    if isinstance(obj, _PendingTensor):
        if obj.storage.array is None:
            raise ModelFileError(f"{source}: torch payload lacks the data of storage {obj.storage.key!r}")
        return _tensor_from_storage(obj.storage.array, obj.offset, obj.size, obj.stride, source)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve_pending(v, source)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_resolve_pending(v, source) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve_pending(v, source) for v in obj)
    return obj


def _load_torch_payload(payload: Any, *, source: str) -> Any:
    """numpy version of ``torch.storage._load_from_bytes``: read a ``torch.save`` byte string.

    Handles both layouts torch writes: the zip archive (``<name>/data.pkl`` plus
    ``<name>/data/<key>`` raw storages) and the legacy stream (magic, protocol and
    system-info pickles, the object pickle, the list of storage keys, then for each key
    an int64 element count and the raw little-endian elements), which is what pickling a
    tensor produces. Storages come back as :class:`_TorchStorage`, tensors as ndarrays.
    """
    if not isinstance(payload, (bytes, bytearray)):
        raise ModelFileError(f"{source}: torch storage payload is {type(payload).__name__}, expected bytes")
    payload = bytes(payload)
    if payload[:4] == b"PK\x03\x04":
        return _load_torch_zip(payload, source)
    return _load_torch_legacy(payload, source)


def _storage_id(pid: Any, source: str, n_fields: int) -> tuple[_TorchStorageType, str, int, tuple]:
    if not (isinstance(pid, tuple) and len(pid) == n_fields and pid[0] in ("storage", b"storage")):
        raise ModelFileError(f"{source}: torch payload has an unsupported persistent id {pid!r:.80}")
    storage_type, key, _location, numel = pid[1:5]
    if not isinstance(storage_type, _TorchStorageType):
        raise ModelFileError(f"{source}: torch payload names storage type {storage_type!r}, expected torch.*Storage")
    key = key.decode("ascii") if isinstance(key, bytes) else str(key)
    return storage_type, key, int(numel), pid[5:]


def _load_torch_zip(payload: bytes, source: str) -> Any:
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as zf:
            names = zf.namelist()
            pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
            if not pickles:
                raise ModelFileError(f"{source}: torch zip payload has no data.pkl (entries: {names[:5]})")
            prefix = pickles[0][: -len("data.pkl")]
            big_endian = prefix + "byteorder" in names and zf.read(prefix + "byteorder").strip() == b"big"
            storages: dict[str, _TorchStorage] = {}

            def persistent_load(pid: Any) -> _TorchStorage:
                storage_type, key, numel, _ = _storage_id(pid, source, 5)
                if key not in storages:
                    try:
                        raw = zf.read(f"{prefix}data/{key}")
                    except KeyError as e:
                        raise ModelFileError(f"{source}: torch zip payload lacks {prefix}data/{key}") from e
                    dtype = storage_type.dtype
                    if len(raw) < numel * dtype.itemsize:
                        raise ModelFileError(
                            f"{source}: torch storage {key} has {len(raw)} bytes, expected {numel * dtype.itemsize}"
                        )
                    arr = np.frombuffer(raw, dtype=dtype.newbyteorder(">" if big_endian else "<"), count=numel).astype(dtype)
                    storages[key] = _TorchStorage(dtype, numel, key, arr)
                return storages[key]

            # storages are read lazily by persistent_load, so unpickle while the archive is open
            return FlameUnpickler(io.BytesIO(zf.read(pickles[0])), source, persistent_load).load()
    except zipfile.BadZipFile as e:
        raise ModelFileError(f"{source}: torch zip payload is corrupt ({e})") from e


def _load_torch_legacy(payload: bytes, source: str) -> Any:
    stream = io.BytesIO(payload)
    try:
        magic = FlameUnpickler(stream, source).load()
        version = FlameUnpickler(stream, source).load()
        FlameUnpickler(stream, source).load()  # system info; torch always writes little-endian data
    except (EOFError, pickle.UnpicklingError) as e:
        raise ModelFileError(f"{source}: torch storage payload is not a torch.save stream ({e})") from e
    if magic != _TORCH_LEGACY_MAGIC or version != _TORCH_LEGACY_PROTOCOL:
        raise ModelFileError(f"{source}: torch storage payload has magic {magic!r} / version {version!r}")
    storages: dict[str, _TorchStorage] = {}

    def persistent_load(pid: Any) -> _TorchStorage:
        storage_type, key, numel, rest = _storage_id(pid, source, 6)
        if rest[0] is not None:
            raise ModelFileError(f"{source}: torch storage views (pre-1.0 torch files) are not supported")
        if key not in storages:
            storages[key] = _TorchStorage(storage_type.dtype, numel, key)
        return storages[key]

    try:
        result = FlameUnpickler(stream, source, persistent_load).load()
        keys = FlameUnpickler(stream, source).load()
    except (EOFError, pickle.UnpicklingError) as e:
        raise ModelFileError(f"{source}: torch storage payload is truncated ({e})") from e
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = storages.get(key)
        if storage is None:
            raise ModelFileError(f"{source}: torch payload lists storage {key!r} that its pickle never used")
        count_bytes = stream.read(8)
        count = int.from_bytes(count_bytes, "little") if len(count_bytes) == 8 else -1
        raw = stream.read(max(count, 0) * storage.dtype.itemsize)
        if count != storage.numel or len(raw) != count * storage.dtype.itemsize:
            raise ModelFileError(
                f"{source}: torch storage {key} is truncated or inconsistent "
                f"(expected {storage.numel} elements of {storage.dtype})"
            )
        storage.array = np.frombuffer(raw, dtype=storage.dtype.newbyteorder("<")).astype(storage.dtype)
    return _resolve_pending(result, source)


# ======================================================================================
# File containers: pickle, .npy, .npz
# ======================================================================================


def _open_binary(path: str, what: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: {what} file not found") from e
    except OSError as e:
        raise ModelFileError(f"{path}: cannot open {what} file ({e.strerror or e})") from e


def _unpickle_stream(fh: BinaryIO, source: str, what: str) -> Any:
    try:
        return FlameUnpickler(fh, source).load()
    except ModelFileError:
        raise
    except (EOFError, pickle.UnpicklingError) as e:
        raise ModelFileError(f"{source}: {what} file is truncated or not a pickle ({type(e).__name__}: {e})") from e
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - any other failure inside a reconstructor means a corrupt file
        raise ModelFileError(f"{source}: {what} file could not be unpickled ({type(e).__name__}: {e})") from e


def load_pickle(path: str | PathLike[str], what: str = "pickle") -> Any:
    """Unpickle a FLAME-family file with :class:`FlameUnpickler` (latin-1, restricted globals).

    Args:
        path: the ``.pkl`` file.
        what: what the file is, for error messages (e.g. ``"FLAME model"``).

    Returns:
        The unpickled object; chumpy objects come back as :class:`ChumpyStub`, scipy
        sparse matrices as :class:`SparseMatrixStub`, torch tensors as ndarrays.

    Raises:
        ModelFileError: missing, unreadable, truncated, or referencing a refused global.
    """
    path = os.fspath(path)
    with _open_binary(path, what) as fh:
        return _unpickle_stream(fh, path, what)


def read_npy(path: str | PathLike[str], what: str = "array") -> np.ndarray:
    """Read an ``.npy`` file; object payloads are unpickled with :class:`FlameUnpickler`.

    This is the torch-free replacement for ``np.load(path, allow_pickle=True)``: the
    header is parsed with ``numpy.lib.format`` and an object array's pickle goes through
    the restricted unpickler, so pickled torch tensors come back as numpy arrays.

    Args:
        path: the ``.npy`` file.
        what: what the file is, for error messages.

    Returns:
        The array (``dtype=object`` for pickled payloads; a saved dict is a 0-d object array).

    Raises:
        ModelFileError: missing, not ``.npy``, truncated, or a refused pickle global.
    """
    path = os.fspath(path)
    with _open_binary(path, what) as fh:
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ModelFileError(f"{path}: {what} file has .npy format version {version}, expected 1.0 or 2.0")
        except (ValueError, EOFError) as e:
            raise ModelFileError(f"{path}: {what} file is not a valid .npy file ({e})") from e
        if dtype.hasobject:
            arr = _unpickle_stream(fh, path, what)
            if not isinstance(arr, np.ndarray) or arr.shape != tuple(shape):
                raise ModelFileError(
                    f"{path}: {what} file's pickle holds {type(arr).__name__}, expected an object array of shape {shape}"
                )
            return arr
        count = int(np.prod(shape, dtype=np.int64))
        raw = fh.read(count * dtype.itemsize)
    if len(raw) != count * dtype.itemsize:
        raise ModelFileError(
            f"{path}: {what} file is truncated: {len(raw)} data bytes, expected {count * dtype.itemsize} "
            f"for shape {tuple(shape)} {dtype}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order="F" if fortran else "C").copy()


def _read_npz(path: str, what: str) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError as e:
        raise ModelFileError(f"{path}: {what} file not found") from e
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ModelFileError(f"{path}: {what} file is not a readable .npz ({type(e).__name__}: {e})") from e


def read_mapping(path: str | PathLike[str], what: str) -> dict[str, Any]:
    """Read a dict from a pickle, an ``.npy`` holding a pickled dict, or an ``.npz``.

    The kind is sniffed from the first bytes, not the file name.
    """
    path = os.fspath(path)
    with _open_binary(path, what) as fh:
        head = fh.read(6)
    if head == b"\x93NUMPY":
        arr = read_npy(path, what)
        obj: Any = arr.item() if arr.dtype.hasobject and arr.shape == () else arr
    elif head[:4] == b"PK\x03\x04":
        obj = _read_npz(path, what)
    else:
        obj = load_pickle(path, what)
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"{path}: {what} file holds {type(obj).__name__}, expected a dict of arrays")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}
