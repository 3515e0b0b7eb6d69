"""Writers of FLAME's own file formats (model pickle, ``head_template.obj``, landmark
embeddings, region masks), readable by FLAME's Python 2 tools and by
:mod:`p3dmm.fitting.model.flame_files`.
"""

from __future__ import annotations

import os
import pickle
import pickletools
from os import PathLike
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from ..base.atomic_io import atomic_write
from ..base.errors import InputError
from ..base.mesh_io import write_obj_with_uv
from ..base.xp import to_numpy
from .arrays import FlameArrays
from .params import FLAME_SHAPE_SPACE, KINTREE_ROOT_SENTINEL, N_JOINTS

__all__ = ["write_flame_files"]


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


def write_flame_files(model: FlameArrays, directory: str | PathLike[str], chumpy_style: bool = False) -> dict[str, str]:
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
        atomic_write(path, write)
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
