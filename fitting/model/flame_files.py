"""Readers for FLAME's files: model pickle / ``.npz``, ``head_template.obj``, landmark
embeddings and region masks (no chumpy, no torch: every pickle goes through
:mod:`p3dmm.fitting.model.unpickle`).

Public functions:
    * :func:`load_flame_model` -- model file (+ UV, landmarks, masks) -> FlameArrays
    * :func:`read_flame_arrays` -- the validated arrays of a model file
    * :func:`load_uv` -- ``head_template.obj`` or a per-vertex array -> FlameUV
    * :func:`load_landmark_embedding`, :func:`load_mediapipe_embedding` -> LandmarkEmbedding parts
    * :func:`load_flame_masks` -- ``FLAME_masks.pkl`` -> dict of vertex ids
"""

from __future__ import annotations

import dataclasses
import os
from os import PathLike
from typing import Any, Mapping, Sequence

import numpy as np

from ..base.errors import InputError, ModelFileError
from ..base.mesh_io import read_obj_with_uv
from ..base.xp import to_numpy
from .arrays import FlameArrays, FlameUV, LandmarkEmbedding
from .params import FLAME_SHAPE_SPACE, N_JOINTS, N_POSE_BASIS
from .unpickle import ChumpyStub, SparseMatrixStub, read_mapping

__all__ = [
    "load_flame_masks",
    "load_flame_model",
    "load_landmark_embedding",
    "load_mediapipe_embedding",
    "load_uv",
    "read_flame_arrays",
]

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
    d = read_mapping(source, "FLAME model")
    v_template = _float_array(d, "v_template", (None, 3), source)
    V = v_template.shape[0]
    if V == 0:
        raise ModelFileError(f"{source}: key 'v_template' has shape (0, 3), expected (V, 3) with V > 0")
    faces = _index_array(_require(d, "f", source, (None, 3)), "f", source, V, f"V={V} vertices", (None, 3))
    shapedirs = _float_array(d, "shapedirs", (V, 3, None), source)
    posedirs = _float_array(d, "posedirs", (V, 3, N_POSE_BASIS), source)
    J_regressor = _float_array(d, "J_regressor", (N_JOINTS, V), source)
    weights = _float_array(d, "weights", (V, N_JOINTS), source)
    row_sums = weights.sum(1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if not np.all(np.isfinite(weights)) or abs(row_sums[worst] - 1.0) > 1e-3 or weights.min() < -1e-6:
        raise ModelFileError(
            f"{source}: key 'weights' (skinning weights) must be finite, >= 0 and sum to 1 per vertex; "
            f"vertex {worst} sums to {row_sums[worst]:.6g} (min weight {weights.min():.3g})"
        )
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
) -> FlameArrays:
    """Load real FLAME files into :class:`FlameArrays` (no chumpy, no torch).

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
    return FlameArrays(
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
        d = read_mapping(source, "landmark embedding")
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
    d = read_mapping(source, "MediaPipe landmark embedding")
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
    d = read_mapping(source, "FLAME masks")
    out: dict[str, np.ndarray] = {}
    for name, value in d.items():
        out[name] = _index_array(value, name, source, n_vertices, f"V={n_vertices} vertices", (None,))
    return out


# ======================================================================================
