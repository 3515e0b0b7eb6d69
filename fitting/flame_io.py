"""Readers and writers for FLAME's files, without chumpy and without torch.

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
with :class:`~p3dmm.fitting.errors.ModelFileError` before it can run.

Public functions:
    * :func:`load_flame_model` -- model pickle / ``.npz`` (+ UV, landmarks, masks) -> FlameModel
    * :func:`read_flame_arrays` -- the validated arrays of a model file
    * :func:`read_obj_with_uv`, :func:`load_uv` -- ``head_template.obj`` -> FlameUV
    * :func:`load_landmark_embedding`, :func:`load_mediapipe_embedding` -> LandmarkEmbedding parts
    * :func:`load_flame_masks` -- ``FLAME_masks.pkl`` -> dict of vertex ids
    * :func:`load_pickle`, :func:`read_npy` -- the restricted readers themselves
    * :func:`write_flame_files`, :func:`write_obj_with_uv` -- FLAME-format writers
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import io
import os
import pickle
import pickletools
import types
import zipfile
from os import PathLike
from typing import Any, BinaryIO, Callable, Mapping, Sequence

import numpy as np
import numpy.lib.format as npy_format

from .atomic_io import atomic_write as _atomic_write
from .errors import InputError, ModelFileError
from .flame_model import N_JOINTS, FlameModel, FlameUV, LandmarkEmbedding
from .xp import to_numpy

__all__ = [
    "FLAME_SHAPE_SPACE",
    "KINTREE_ROOT_SENTINEL",
    "FlameUnpickler",
    "load_flame_masks",
    "load_flame_model",
    "load_landmark_embedding",
    "load_mediapipe_embedding",
    "load_pickle",
    "load_uv",
    "read_flame_arrays",
    "read_npy",
    "read_obj_with_uv",
    "write_flame_files",
    "write_obj_with_uv",
]

#: Identity columns in FLAME's ``shapedirs``; expression columns start here (smplx does
#: the same: ``shapedirs[:, :, 300:300 + n_expr]``).
FLAME_SHAPE_SPACE = 300
#: Parent id FLAME stores for the root joint in ``kintree_table`` (uint32 -1).
KINTREE_ROOT_SENTINEL = 4294967295
#: Pose-corrective columns: 9 per non-root joint.
N_POSE_BASIS = 9 * (N_JOINTS - 1)

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


def _read_mapping(path: str | PathLike[str], what: str) -> dict[str, Any]:
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


# ======================================================================================
# Array conversion and validation
# ======================================================================================


def _fmt_shape(shape: Sequence[Any]) -> str:
    """``(5023, 3)``; ``None`` entries print as ``N``."""
    parts = ["N" if s is None else str(s) for s in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _require(d: Mapping[str, Any], key: str, source: str, expected: Sequence[Any] | str) -> Any:
    if key not in d:
        exp = expected if isinstance(expected, str) else _fmt_shape(expected)
        raise ModelFileError(f"{source}: key '{key}' is missing; expected an array of shape {exp}")
    return d[key]


def _as_array(value: Any, key: str, source: str) -> np.ndarray:
    """Plain ndarray from an ndarray, chumpy stub, scipy sparse stub or nested list."""
    if isinstance(value, ChumpyStub):
        x = value.x
        if x is None:
            raise ModelFileError(
                f"{source}: key '{key}' is a chumpy {value.qualified_name} without an 'x' array; "
                "only plain chumpy arrays can be read without chumpy"
            )
        value = x
    if isinstance(value, SparseMatrixStub):
        return value.to_dense(source, key)
    if hasattr(value, "toarray") and not isinstance(value, np.ndarray):  # a real scipy matrix
        value = value.toarray()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{source}: key '{key}' holds {type(value).__name__}, expected an array") from e
    if arr.dtype.kind not in "biuf":
        raise ModelFileError(f"{source}: key '{key}' has dtype {arr.dtype}, expected a numeric array")
    return arr


def _check_shape(arr: np.ndarray, expected: Sequence[int | None], key: str, source: str) -> None:
    ok = arr.ndim == len(expected) and all(e is None or e == s for s, e in zip(arr.shape, expected))
    if not ok:
        raise ModelFileError(
            f"{source}: key '{key}' has shape {_fmt_shape(arr.shape)}, expected {_fmt_shape(expected)}"
        )


def _float_array(d: Mapping[str, Any], key: str, expected: Sequence[int | None], source: str) -> np.ndarray:
    arr = _as_array(_require(d, key, source, expected), key, source)
    _check_shape(arr, expected, key, source)
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ModelFileError(f"{source}: key '{key}' contains NaN or infinite values")
    return arr


def _index_array(
    value: Any, key: str, source: str, upper: int, upper_name: str, expected: Sequence[int | None]
) -> np.ndarray:
    """int64 indices in ``[0, upper)`` of the expected shape."""
    arr = _as_array(value, key, source)
    _check_shape(arr, expected, key, source)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ModelFileError(f"{source}: key '{key}' holds non-integer values, expected indices")
    idx = arr.astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= upper):
        raise ModelFileError(
            f"{source}: key '{key}' has indices in [{idx.min()}, {idx.max()}], expected 0 <= index < {upper} ({upper_name})"
        )
    return idx


def _parents_from_kintree(table: np.ndarray, source: str) -> np.ndarray:
    """``(5,) int64`` parents from FLAME's ``(2, 5)`` kintree table; root sentinel -> -1."""
    _check_shape(table, (2, N_JOINTS), "kintree_table", source)
    if table.dtype.kind == "f":
        table = table.astype(np.int64)
    ids = table[1].astype(np.int64)
    if not np.array_equal(ids, np.arange(N_JOINTS)):
        raise ModelFileError(f"{source}: key 'kintree_table' row 1 is {ids.tolist()}, expected joint ids [0..4]")
    raw = table[0].astype(np.uint64) if table.dtype.kind == "u" else table[0].astype(np.int64)
    parents = np.full(N_JOINTS, -1, dtype=np.int64)
    for j in range(1, N_JOINTS):
        p = int(raw[j])
        if not 0 <= p < j:
            raise ModelFileError(
                f"{source}: key 'kintree_table' gives joint {j} parent {p}, expected a joint id below {j}"
            )
        parents[j] = p
    root = int(raw[0])
    if 0 <= root < N_JOINTS:
        raise ModelFileError(f"{source}: key 'kintree_table' gives the root joint parent {root}, expected a sentinel")
    return parents


# ======================================================================================
# Model
# ======================================================================================


def read_flame_arrays(path: str | PathLike[str]) -> dict[str, Any]:
    """Read and validate the arrays of a FLAME model file.

    Args:
        path: FLAME 2020 ``generic_model.pkl``, FLAME 2023 ``flame2023.pkl`` /
            ``flame2023_no_jaw.pkl``, FLAME 2023 Open ``flame2023_Open.pkl``, or an
            ``.npz`` with the same keys.

    Returns:
        dict with ``v_template (V, 3) float64``, ``faces (F, 3) int64``,
        ``shapedirs (V, 3, K) float64`` (identity columns first, expression from column
        300 on, as in FLAME), ``posedirs (V, 3, 36) float64``, ``J_regressor (5, V)
        float64`` (dense), ``parents (5,) int64`` and ``lbs_weights (V, 5) float64``.

    Raises:
        ModelFileError: missing/truncated file, not a dict, a missing key, a key of the
            wrong shape or dtype, or an unsupported ``bs_style`` / ``bs_type``.
    """
    source = os.fspath(path)
    d = _read_mapping(source, "FLAME model")
    v_template = _float_array(d, "v_template", (None, 3), source)
    V = v_template.shape[0]
    if V == 0:
        raise ModelFileError(f"{source}: key 'v_template' has shape (0, 3), expected (V, 3) with V > 0")
    faces = _index_array(_require(d, "f", source, (None, 3)), "f", source, V, f"V={V} vertices", (None, 3))
    shapedirs = _float_array(d, "shapedirs", (V, 3, None), source)
    posedirs = _float_array(d, "posedirs", (V, 3, N_POSE_BASIS), source)
    J_regressor = _float_array(d, "J_regressor", (N_JOINTS, V), source)
    weights = _float_array(d, "weights", (V, N_JOINTS), source)
    table = _as_array(_require(d, "kintree_table", source, (2, N_JOINTS)), "kintree_table", source)
    parents = _parents_from_kintree(table, source)
    for key, supported in (("bs_style", "lbs"), ("bs_type", "lrotmin")):
        if key in d:
            value = d[key]
            value = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
            value = value.decode("latin1") if isinstance(value, bytes) else value
            if value != supported:
                raise ModelFileError(f"{source}: key '{key}' is {value!r}, expected {supported!r}")
    return {
        "v_template": v_template,
        "faces": faces,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": J_regressor,
        "parents": parents,
        "lbs_weights": weights,
    }


def _select_blendshapes(shapedirs: np.ndarray, n_shape: int, n_expr: int, source: str) -> np.ndarray:
    """Columns ``[0, n_shape)`` and ``[300, 300 + n_expr)`` of FLAME's shapedirs."""
    K = shapedirs.shape[2]
    have_shape = min(K, FLAME_SHAPE_SPACE)
    have_expr = max(K - FLAME_SHAPE_SPACE, 0)
    if n_shape > have_shape or n_expr > have_expr:
        raise ModelFileError(
            f"{source}: key 'shapedirs' has shape {_fmt_shape(shapedirs.shape)}: {have_shape} identity and "
            f"{have_expr} expression components (expression starts at column {FLAME_SHAPE_SPACE}); "
            f"asked for n_shape={n_shape}, n_expr={n_expr}"
        )
    cols = np.r_[np.arange(n_shape), FLAME_SHAPE_SPACE + np.arange(n_expr)].astype(np.int64)
    return shapedirs[:, :, cols]


def load_flame_model(
    path: str | PathLike[str],
    uv: str | PathLike[str] | np.ndarray | None = None,
    landmarks: str | PathLike[str] | Sequence[str | PathLike[str]] | None = None,
    mediapipe_landmarks: str | PathLike[str] | None = None,
    masks: str | PathLike[str] | None = None,
    n_shape: int = 300,
    n_expr: int = 100,
    dtype: Any = np.float32,
) -> FlameModel:
    """Load real FLAME files into a :class:`FlameModel` (no chumpy, no torch).

    Args:
        path: model file, see :func:`read_flame_arrays`.
        uv: ``head_template.obj`` or a ``(V, 2)`` per-vertex UV array, see :func:`load_uv`.
        landmarks: ``landmark_embedding.npy`` (DECA/MICA), FLAME's
            ``flame_static_embedding.pkl`` or ``flame_dynamic_embedding.npy``, or a list
            of such files (merged), see :func:`load_landmark_embedding`.
        mediapipe_landmarks: ``mediapipe_landmark_embedding.npz``.
        masks: ``FLAME_masks.pkl``.
        n_shape: identity components kept (at most what the file has, 300 for FLAME).
        n_expr: expression components kept (at most what the file has, 100 for FLAME).
        dtype: float dtype of the model's arrays.

    Returns:
        The model; ``name`` is the model file path.

    Raises:
        ModelFileError: a file is missing, truncated, of the wrong kind, lacks a key or
            has a key of the wrong shape, or holds fewer components than asked for.
        InputError: ``n_shape`` / ``n_expr`` negative, ``dtype`` not a float type, or a
            UV array of the wrong shape.
    """
    source = os.fspath(path)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise InputError(f"load_flame_model: dtype must be a float type, got {dtype}")
    if int(n_shape) < 0 or int(n_expr) < 0:
        raise InputError(f"load_flame_model: n_shape={n_shape}, n_expr={n_expr} must be >= 0")
    arrays = read_flame_arrays(source)
    faces = arrays["faces"]
    V, F = arrays["v_template"].shape[0], faces.shape[0]
    shapedirs = _select_blendshapes(arrays["shapedirs"], int(n_shape), int(n_expr), source)

    flame_uv = load_uv(uv, faces, V) if uv is not None else None
    embedding = None
    if landmarks is not None:
        embedding = load_landmark_embedding(landmarks, F)
    if mediapipe_landmarks is not None:
        mp_faces, mp_bary, mp_ids = load_mediapipe_embedding(mediapipe_landmarks, F)
        if embedding is None:
            embedding = LandmarkEmbedding(
                static_faces=np.zeros(0, np.int64), static_bary=np.zeros((0, 3), np.float32)
            )
        embedding = dataclasses.replace(
            embedding, mediapipe_faces=mp_faces, mediapipe_bary=mp_bary, mediapipe_indices=mp_ids
        )
    region_masks = load_flame_masks(masks, V) if masks is not None else {}
    return FlameModel(
        v_template=arrays["v_template"].astype(dtype),
        faces=faces,
        shapedirs=np.ascontiguousarray(shapedirs, dtype=dtype),
        posedirs=arrays["posedirs"].astype(dtype),
        J_regressor=arrays["J_regressor"].astype(dtype),
        parents=arrays["parents"],
        lbs_weights=arrays["lbs_weights"].astype(dtype),
        n_shape=int(n_shape),
        n_expr=int(n_expr),
        uv=flame_uv,
        landmarks=embedding,
        masks=region_masks,
        name=source,
    )


# ======================================================================================
# UV: head_template.obj
# ======================================================================================


def read_obj_with_uv(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse a triangle OBJ with texture coordinates, keeping its vertex order.

    The file is parsed by hand rather than with trimesh: trimesh splits every vertex
    that sits on a UV seam into one copy per texture coordinate (and may merge or drop
    vertices), which renumbers the mesh and would break the correspondence between the
    OBJ's ``v`` lines and FLAME's vertex order. Here ``v`` and ``vt`` are kept as two
    separate lists, exactly as the file has them.

    Args:
        path: OBJ file with ``v``, ``vt`` and ``f a/ta b/tb c/tc`` (``a/ta/na`` is fine).

    Returns:
        ``v (N, 3) float64``, ``vt (T, 2) float64``, ``f (F, 3) int64`` and
        ``ft (F, 3) int64``, indices zero-based.

    Raises:
        ModelFileError: missing file, a malformed line, a non-triangle face, a face
            without texture indices, or an index out of range (message names the line).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except FileNotFoundError as e:
        raise ModelFileError(f"{source}: UV template OBJ file not found") from e
    except OSError as e:
        raise ModelFileError(f"{source}: cannot read UV template OBJ ({e.strerror or e})") from e
    v: list[list[float]] = []
    vt: list[list[float]] = []
    f: list[list[int]] = []
    ft: list[list[int]] = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        tag = parts[0]
        try:
            if tag == "v":
                v.append([float(x) for x in parts[1:4]])
                if len(v[-1]) != 3:
                    raise ValueError("a vertex needs x y z")
            elif tag == "vt":
                vt.append([float(x) for x in parts[1:3]])
                if len(vt[-1]) != 2:
                    raise ValueError("a texture coordinate needs u v")
            elif tag == "f":
                corners = parts[1:]
                if len(corners) != 3:
                    raise ValueError(f"face has {len(corners)} corners, expected a triangle 'f a/ta b/tb c/tc'")
                fv, fu = [], []
                for corner in corners:
                    fields = corner.split("/")
                    if len(fields) < 2 or not fields[1]:
                        raise ValueError(f"corner {corner!r} has no texture index, expected 'a/ta'")
                    a, ta = int(fields[0]), int(fields[1])
                    # OBJ indices are 1-based; negative ones count back from the current end
                    fv.append(a - 1 if a > 0 else len(v) + a)
                    fu.append(ta - 1 if ta > 0 else len(vt) + ta)
                f.append(fv)
                ft.append(fu)
        except ValueError as e:
            raise ModelFileError(f"{source}: line {lineno} ({line.strip()[:60]!r}) is malformed: {e}") from e
    v_arr = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    vt_arr = np.asarray(vt, dtype=np.float64).reshape(-1, 2)
    f_arr = np.asarray(f, dtype=np.int64).reshape(-1, 3)
    ft_arr = np.asarray(ft, dtype=np.int64).reshape(-1, 3)
    for name, idx, n in (("f", f_arr, len(v_arr)), ("ft", ft_arr, len(vt_arr))):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ModelFileError(f"{source}: face indices '{name}' fall outside 1..{n}")
    return v_arr, vt_arr, f_arr, ft_arr


def load_uv(uv: str | PathLike[str] | np.ndarray, faces: np.ndarray, n_vertices: int) -> FlameUV:
    """UV layout for a FLAME-topology mesh from ``head_template.obj`` or a per-vertex array.

    Args:
        uv: path of an OBJ whose faces equal ``faces`` (FLAME's ``head_template.obj``),
            or a ``(V, 2)`` per-vertex UV array (then ``vt`` is that array, ``ft = faces``).
        faces: ``(F, 3) int64`` the model's faces.
        n_vertices: V.

    Raises:
        ModelFileError: the OBJ is unreadable, its vertex count or faces differ from the model's.
        InputError: a UV array of the wrong shape or with non-finite values.
    """
    faces = np.asarray(faces, dtype=np.int64)
    if isinstance(uv, np.ndarray) or (not isinstance(uv, (str, bytes, PathLike)) and hasattr(uv, "shape")):
        arr = np.asarray(to_numpy(uv), dtype=np.float32)
        if arr.shape != (n_vertices, 2) or not np.all(np.isfinite(arr)):
            raise InputError(f"uv array has shape {arr.shape}, expected ({n_vertices}, 2) finite per-vertex UVs")
        return FlameUV.from_faces(arr, faces, faces, n_vertices)
    source = os.fspath(uv)
    v, vt, f, ft = read_obj_with_uv(source)
    if len(v) != n_vertices:
        raise ModelFileError(f"{source}: 'v' has {len(v)} vertices, expected the model's V={n_vertices}")
    if f.shape != faces.shape:
        raise ModelFileError(f"{source}: 'f' has shape {_fmt_shape(f.shape)}, expected the model's {_fmt_shape(faces.shape)}")
    differ = np.nonzero(np.any(f != faces, axis=1))[0]
    if len(differ):
        raise ModelFileError(
            f"{source}: 'f' differs from the model's faces {_fmt_shape(faces.shape)} in {len(differ)} faces "
            f"(first: face {differ[0]} is {f[differ[0]].tolist()}, model has {faces[differ[0]].tolist()})"
        )
    try:
        return FlameUV.from_faces(vt, ft, faces, n_vertices)
    except InputError as e:
        raise ModelFileError(f"{source}: {e}") from e


# ======================================================================================
# Landmark embeddings
# ======================================================================================

_DECA_KEYS = ("static_lmk_faces_idx", "static_lmk_bary_coords", "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords")


def _bary_array(value: Any, key: str, source: str, expected: Sequence[int | None]) -> np.ndarray:
    arr = _as_array(value, key, source)
    _check_shape(arr, expected, key, source)
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise ModelFileError(f"{source}: key '{key}' contains NaN or infinite barycentric coordinates")
    return arr


def _face_bary_pair(
    d: Mapping[str, Any], face_key: str, bary_key: str, source: str, n_faces: int, face_ndim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Face ids ``(..., )`` with ``face_ndim`` dims and their ``(..., 3)`` barycentrics."""
    expected = (None,) * face_ndim
    faces_raw = _as_array(_require(d, face_key, source, expected), face_key, source)
    idx = _index_array(faces_raw, face_key, source, n_faces, f"F={n_faces} faces", expected)
    bary = _bary_array(_require(d, bary_key, source, idx.shape + (3,)), bary_key, source, idx.shape + (3,))
    return idx, bary


def load_landmark_embedding(
    path: str | PathLike[str] | Sequence[str | PathLike[str]], n_faces: int
) -> LandmarkEmbedding:
    """Read landmark embeddings (face index + barycentric coordinates per landmark).

    Accepted files (the kind is recognised from the keys):
        * DECA/MICA ``landmark_embedding.npy``: ``static_lmk_faces_idx (51,)``,
          ``static_lmk_bary_coords (51, 3)``, ``dynamic_lmk_faces_idx (79, 17)``,
          ``dynamic_lmk_bary_coords (79, 17, 3)``, optional ``full_lmk_faces_idx``
          ``(1, 68)`` or ``(68,)`` with ``full_lmk_bary_coords``. The dynamic parts are
          pickled torch tensors in the released file; they are read without torch.
        * FLAME ``flame_static_embedding.pkl``: ``lmk_face_idx (51,)``, ``lmk_b_coords (51, 3)``.
        * FLAME ``flame_dynamic_embedding.npy``: ``lmk_face_idx (79, 17)``, ``lmk_b_coords (79, 17, 3)``.
    Several files can be given as a list; their parts are merged (later files win).
    Without a static part, ``static_faces`` / ``static_bary`` are empty ``(0,)`` / ``(0, 3)``.

    Args:
        path: one file or a list of files.
        n_faces: F, the model's face count; every face index must be below it.

    Raises:
        ModelFileError: unreadable file, unrecognised keys, wrong shapes, face ids >= F.
    """
    paths = [path] if isinstance(path, (str, bytes, PathLike)) else list(path)
    parts: dict[str, np.ndarray] = {}
    for p in paths:
        source = os.fspath(p)
        d = _read_mapping(source, "landmark embedding")
        if "static_lmk_faces_idx" in d or "dynamic_lmk_faces_idx" in d:
            for key in _DECA_KEYS:
                _require(d, key, source, "as in DECA's landmark_embedding.npy")
            parts["static_faces"], parts["static_bary"] = _face_bary_pair(
                d, "static_lmk_faces_idx", "static_lmk_bary_coords", source, n_faces, 1
            )
            parts["dynamic_faces"], parts["dynamic_bary"] = _face_bary_pair(
                d, "dynamic_lmk_faces_idx", "dynamic_lmk_bary_coords", source, n_faces, 2
            )
            if "full_lmk_faces_idx" in d:
                full = dict(d)
                # DECA stores the 68 landmarks with a leading batch axis: (1, 68) and (1, 68, 3)
                for key, batched_ndim in (("full_lmk_faces_idx", 2), ("full_lmk_bary_coords", 3)):
                    if key in full:
                        a = _as_array(full[key], key, source)
                        full[key] = a[0] if a.ndim == batched_ndim and a.shape[0] == 1 else a
                parts["full_faces"], parts["full_bary"] = _face_bary_pair(
                    full, "full_lmk_faces_idx", "full_lmk_bary_coords", source, n_faces, 1
                )
        elif "landmark_indices" in d:
            raise ModelFileError(
                f"{source}: this is a MediaPipe landmark embedding (key 'landmark_indices'); "
                "pass it as mediapipe_landmarks="
            )
        elif "lmk_face_idx" in d:
            ndim = _as_array(d["lmk_face_idx"], "lmk_face_idx", source).ndim
            if ndim == 1:
                parts["static_faces"], parts["static_bary"] = _face_bary_pair(
                    d, "lmk_face_idx", "lmk_b_coords", source, n_faces, 1
                )
            elif ndim == 2:
                parts["dynamic_faces"], parts["dynamic_bary"] = _face_bary_pair(
                    d, "lmk_face_idx", "lmk_b_coords", source, n_faces, 2
                )
            else:
                raise ModelFileError(
                    f"{source}: key 'lmk_face_idx' has {ndim} dims, expected (51,) static or (79, 17) dynamic"
                )
        else:
            raise ModelFileError(
                f"{source}: no landmark keys found (has {sorted(d)[:8]}); expected DECA's "
                "'static_lmk_faces_idx'... or FLAME's 'lmk_face_idx' / 'lmk_b_coords'"
            )
    parts.setdefault("static_faces", np.zeros(0, dtype=np.int64))
    parts.setdefault("static_bary", np.zeros((0, 3), dtype=np.float32))
    return LandmarkEmbedding(**parts)


def load_mediapipe_embedding(path: str | PathLike[str], n_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read ``mediapipe_landmark_embedding.npz``.

    Args:
        path: file with ``lmk_face_idx (105,)``, ``lmk_b_coords (105, 3)`` and
            ``landmark_indices (105,)`` (MediaPipe landmark ids).
        n_faces: F; every face index must be below it.

    Returns:
        ``faces (N,) int64``, ``bary (N, 3) float32``, ``indices (N,) int64``.

    Raises:
        ModelFileError: unreadable file, a missing key, wrong shapes, face ids >= F.
    """
    source = os.fspath(path)
    d = _read_mapping(source, "MediaPipe landmark embedding")
    faces, bary = _face_bary_pair(d, "lmk_face_idx", "lmk_b_coords", source, n_faces, 1)
    ids_raw = _as_array(_require(d, "landmark_indices", source, faces.shape), "landmark_indices", source)
    _check_shape(ids_raw, faces.shape, "landmark_indices", source)
    ids = _index_array(ids_raw, "landmark_indices", source, np.iinfo(np.int32).max, "a MediaPipe id", faces.shape)
    return faces, bary, ids


# ======================================================================================
# Region masks
# ======================================================================================


def load_flame_masks(path: str | PathLike[str], n_vertices: int) -> dict[str, np.ndarray]:
    """Read ``FLAME_masks.pkl``: region name -> vertex ids.

    Args:
        path: pickle of a dict ``name -> (K,) int`` (names such as face, lips, nose,
            eye_region, left_eyeball, scalp, neck, boundary).
        n_vertices: V; every id must be below it.

    Returns:
        dict ``name -> (K,) int64``.

    Raises:
        ModelFileError: unreadable file, not a dict, a mask that is not 1-D integer ids,
            or an id >= V.
    """
    source = os.fspath(path)
    d = _read_mapping(source, "FLAME masks")
    out: dict[str, np.ndarray] = {}
    for name, value in d.items():
        out[name] = _index_array(value, name, source, n_vertices, f"V={n_vertices} vertices", (None,))
    return out


# ======================================================================================
# Writers
# ======================================================================================


class _ChumpyArrayPlaceholder:
    """An array that is to be pickled as a chumpy ``Ch`` object with state ``{'x': array}``.

    chumpy cannot be imported, and :mod:`pickle` only writes a class reference it can
    import back and verify. So this class is pickled under its own (importable) name at
    protocol 2 -- ``GLOBAL``, ``EMPTY_TUPLE``, ``NEWOBJ``, the state dict, ``BUILD``, which
    is exactly how chumpy objects appear in FLAME's Python 2 pickles -- and
    :func:`_rename_pickle_globals` then rewrites that one ``GLOBAL`` opcode to
    ``chumpy.ch Ch`` using pickletools' opcode positions (no blind byte replacement).
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = x

    def __getstate__(self) -> dict[str, np.ndarray]:
        return {"x": self.x}


_PLACEHOLDER_GLOBAL = f"{__name__} {_ChumpyArrayPlaceholder.__qualname__}"
_CHUMPY_CH_GLOBAL = "chumpy.ch Ch"


def _rename_pickle_globals(data: bytes, renames: Mapping[str, str]) -> bytes:
    """Rewrite ``GLOBAL`` opcodes (protocol <= 3) whose ``"module name"`` is in ``renames``.

    ``GLOBAL`` stores its argument as newline-terminated text without a length prefix,
    and protocols <= 3 have no frames, so splicing a different name in keeps every other
    opcode (and memo index) valid.
    """
    out = bytearray()
    last = 0
    for op, arg, pos in pickletools.genops(data):
        if op.name in ("FRAME", "STACK_GLOBAL"):
            raise ValueError("_rename_pickle_globals needs a protocol <= 3 pickle")
        if op.name == "GLOBAL" and isinstance(arg, str) and arg in renames and pos is not None:
            module, name = renames[arg].split(" ")
            out += data[last:pos]
            out += b"c" + f"{module}\n{name}\n".encode("ascii")
            last = pos + 1 + len(arg.encode("latin1")) + 1  # 'c' + "module\nname\n"
    out += data[last:]
    return bytes(out)


def _pickle_bytes(obj: Any, chumpy: bool = False) -> bytes:
    """Protocol-2 pickle (readable by Python 2 FLAME tools); placeholders become chumpy.ch.Ch."""
    data = pickle.dumps(obj, protocol=2)
    if chumpy:
        data = _rename_pickle_globals(data, {_PLACEHOLDER_GLOBAL: _CHUMPY_CH_GLOBAL})
    return data


def write_obj_with_uv(
    path: str | PathLike[str], v: np.ndarray, vt: np.ndarray, f: np.ndarray, ft: np.ndarray
) -> str:
    """Write a triangle OBJ with texture coordinates (``f a/ta b/tb c/tc``), atomically.

    Args:
        path: output ``.obj``.
        v: ``(N, 3)`` vertices.
        vt: ``(T, 2)`` texture coordinates.
        f: ``(F, 3)`` zero-based vertex indices.
        ft: ``(F, 3)`` zero-based texture indices.

    Returns:
        The path written.
    """
    path = os.fspath(path)
    v = np.asarray(to_numpy(v), dtype=np.float64).reshape(-1, 3)
    vt = np.asarray(to_numpy(vt), dtype=np.float64).reshape(-1, 2)
    f = np.asarray(to_numpy(f), dtype=np.int64).reshape(-1, 3)
    ft = np.asarray(to_numpy(ft), dtype=np.int64).reshape(-1, 3)
    if f.shape != ft.shape:
        raise InputError(f"write_obj_with_uv: f has shape {f.shape} but ft has {ft.shape}; expected equal (F, 3)")
    buf = io.StringIO()
    # %.9g round-trips float32 values exactly
    np.savetxt(buf, v, fmt="v %.9g %.9g %.9g")
    np.savetxt(buf, vt, fmt="vt %.9g %.9g")
    corners = np.stack([f + 1, ft + 1], axis=2).reshape(-1, 6)  # a ta b tb c tc, 1-based
    np.savetxt(buf, corners, fmt="f %d/%d %d/%d %d/%d")
    text = buf.getvalue().encode("utf-8")
    _atomic_write(path, lambda fh: fh.write(text))
    return path


def write_flame_files(model: FlameModel, directory: str | PathLike[str], chumpy_style: bool = False) -> dict[str, str]:
    """Write a model in FLAME's own file formats (each file atomically).

    Files:
        * ``generic_model.pkl`` (kind ``"model"``): protocol-2 pickle of FLAME's dict --
          ``v_template (V, 3) float64``, ``f (F, 3) uint32``, ``shapedirs (V, 3, 300 +
          n_expr) float64`` (identity columns zero-padded to FLAME's 300 so expression
          starts at column 300 as in FLAME), ``posedirs (V, 3, 36)``, ``J_regressor``
          as a scipy csc matrix, ``kintree_table (2, 5)`` with root parent 4294967295,
          ``weights (V, 5)``, ``J (5, 3)``, ``bs_style 'lbs'``, ``bs_type 'lrotmin'``.
          With ``chumpy_style`` the v_template/shapedirs/weights/J entries are pickled as
          ``chumpy.ch.Ch`` objects with state ``{'x': array}`` (as in FLAME 2020/2023).
        * ``head_template.obj`` (``"uv"``) when the model has a UV layout.
        * ``landmark_embedding.npy`` (``"landmarks"``, DECA key names, numpy arrays) when
          the model has static and dynamic landmarks; ``flame_static_embedding.pkl``
          (``"static_landmarks"``) when it has static ones.
        * ``mediapipe_landmark_embedding.npz`` (``"mediapipe_landmarks"``) when present.
        * ``FLAME_masks.pkl`` (``"masks"``) when the model has masks.

    A model with ``n_shape < 300`` reads back with ``n_shape=model.n_shape, n_expr=model.n_expr``.

    Args:
        model: the model (NumPy or CuPy arrays).
        directory: output directory (created if needed).
        chumpy_style: write chumpy objects as FLAME 2020/2023 do.

    Returns:
        dict kind -> path written; the kinds match :func:`load_flame_model`'s arguments.

    Raises:
        InputError: ``model.n_shape`` exceeds FLAME's 300 identity columns.
    """
    import scipy.sparse  # lazy: only the writer needs a real sparse matrix

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    if model.n_shape > FLAME_SHAPE_SPACE:
        raise InputError(
            f"write_flame_files: model has n_shape={model.n_shape}, FLAME's layout holds at most {FLAME_SHAPE_SPACE}"
        )
    v_template = to_numpy(model.v_template).astype(np.float64)
    V = v_template.shape[0]
    faces = to_numpy(model.faces).astype(np.int64)
    blend = to_numpy(model.shapedirs).astype(np.float64)
    shapedirs = np.zeros((V, 3, FLAME_SHAPE_SPACE + model.n_expr), dtype=np.float64)
    shapedirs[:, :, : model.n_shape] = blend[:, :, : model.n_shape]
    shapedirs[:, :, FLAME_SHAPE_SPACE:] = blend[:, :, model.n_shape :]
    J_regressor = to_numpy(model.J_regressor).astype(np.float64)
    parents = np.asarray(model.parents, dtype=np.int64)
    kintree = np.stack([np.where(parents < 0, KINTREE_ROOT_SENTINEL, parents), np.arange(N_JOINTS)]).astype(np.int64)
    weights = to_numpy(model.lbs_weights).astype(np.float64)
    # J[j, k] = sum_v R[j, v] * T[v, k]
    J = np.einsum("jv,vk->jk", J_regressor, v_template)

    wrap: Callable[[np.ndarray], Any] = _ChumpyArrayPlaceholder if chumpy_style else (lambda a: a)
    flame_dict = {
        "f": faces.astype(np.uint32),
        "J_regressor": scipy.sparse.csc_matrix(J_regressor),
        "kintree_table": kintree,
        "J": wrap(J),
        "weights": wrap(weights),
        "posedirs": to_numpy(model.posedirs).astype(np.float64),
        "v_template": wrap(v_template),
        "shapedirs": wrap(shapedirs),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }
    written: dict[str, str] = {}

    def put(kind: str, name: str, write: Callable[[BinaryIO], object]) -> None:
        path = os.path.join(directory, name)
        _atomic_write(path, write)
        written[kind] = path

    model_bytes = _pickle_bytes(flame_dict, chumpy=chumpy_style)
    put("model", "generic_model.pkl", lambda fh: fh.write(model_bytes))

    if model.uv is not None:
        written["uv"] = write_obj_with_uv(
            os.path.join(directory, "head_template.obj"), v_template, model.uv.vt, faces, model.uv.ft
        )

    lm = model.landmarks
    if lm is not None:
        static_faces = np.asarray(lm.static_faces, dtype=np.int64)
        static_bary = np.asarray(lm.static_bary, dtype=np.float32)
        if lm.dynamic_faces is not None and lm.dynamic_bary is not None:
            deca: dict[str, np.ndarray] = {
                "static_lmk_faces_idx": static_faces,
                "static_lmk_bary_coords": static_bary,
                "dynamic_lmk_faces_idx": np.asarray(lm.dynamic_faces, dtype=np.int64),
                "dynamic_lmk_bary_coords": np.asarray(lm.dynamic_bary, dtype=np.float32),
            }
            if lm.full_faces is not None and lm.full_bary is not None:
                # DECA keeps a leading batch axis on the 68 landmarks
                deca["full_lmk_faces_idx"] = np.asarray(lm.full_faces, dtype=np.int64)[None]
                deca["full_lmk_bary_coords"] = np.asarray(lm.full_bary, dtype=np.float32)[None]
            deca_obj = np.empty((), dtype=object)  # np.save of a dict = 0-d object array, as DECA's file
            deca_obj[()] = deca
            put("landmarks", "landmark_embedding.npy", lambda fh: np.save(fh, deca_obj, allow_pickle=True))
        if len(static_faces):
            static = {"lmk_face_idx": static_faces, "lmk_b_coords": static_bary}
            static_bytes = _pickle_bytes(static)
            put("static_landmarks", "flame_static_embedding.pkl", lambda fh: fh.write(static_bytes))
            written.setdefault("landmarks", written["static_landmarks"])
        if lm.mediapipe_faces is not None and lm.mediapipe_bary is not None and lm.mediapipe_indices is not None:
            mp_faces = np.asarray(lm.mediapipe_faces, dtype=np.int64)
            mp_bary = np.asarray(lm.mediapipe_bary, dtype=np.float32)
            mp_ids = np.asarray(lm.mediapipe_indices, dtype=np.int64)
            put(
                "mediapipe_landmarks",
                "mediapipe_landmark_embedding.npz",
                lambda fh: np.savez(fh, lmk_face_idx=mp_faces, lmk_b_coords=mp_bary, landmark_indices=mp_ids),
            )

    if model.masks:
        masks_bytes = _pickle_bytes({k: np.asarray(v, dtype=np.int64) for k, v in model.masks.items()})
        put("masks", "FLAME_masks.pkl", lambda fh: fh.write(masks_bytes))
    return written
