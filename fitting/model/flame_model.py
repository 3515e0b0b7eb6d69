"""The FLAME model object users hold: arrays + loaders + the forward pass.

:class:`FlameModel` is a :class:`~p3dmm.fitting.model.arrays.FlameArrays` (the validated
arrays, nothing else) with the constructors and the math as methods on top: it is the
only module of the model layer that knows the file readers, the synthetic head and the
LBS functions, so each of those depends on the arrays alone.
"""

from __future__ import annotations

import weakref
from os import PathLike
from typing import Any

import numpy as np

from . import flame_files, flame_write
from .arrays import FlameArrays
from .lbs import flame_forward
from .params import FlameParams
from .synthetic_head import build_synthetic_flame

__all__ = ["FlameModel"]

_MODELS: "weakref.WeakKeyDictionary[FlameArrays, FlameModel]" = weakref.WeakKeyDictionary()


class FlameModel(FlameArrays):
    """A FLAME-topology head model (FLAME 2020/2023 or the synthetic stand-in).

    Fields: see :class:`~p3dmm.fitting.model.arrays.FlameArrays`.
    """

    @classmethod
    def from_arrays(cls, arrays: FlameArrays) -> "FlameModel":
        """The model over ``arrays`` (the same object again for the same arrays)."""
        if isinstance(arrays, FlameModel):
            return arrays
        model = _MODELS.get(arrays)
        if model is None:
            model = _MODELS[arrays] = cls(**arrays.fields())
        return model

    # ------------------------------------------------------------ constructors
    @staticmethod
    def load(
        path: str | PathLike[str],
        uv: str | PathLike[str] | np.ndarray | None = None,
        landmarks: str | PathLike[str] | list[str | PathLike[str]] | None = None,
        mediapipe_landmarks: str | PathLike[str] | None = None,
        masks: str | PathLike[str] | None = None,
        n_shape: int = 300,
        n_expr: int = 100,
        dtype: Any = np.float32,
    ) -> "FlameModel":
        """Load real FLAME files (FLAME 2020 / 2023 / 2023 Open pickles, or .npz).

        Args:
            path: ``generic_model.pkl``, ``flame2023.pkl``, ``flame2023_no_jaw.pkl`` or
                ``flame2023_Open.pkl`` (chumpy pickles are read without chumpy).
            uv: ``head_template.obj`` (vt/f with texture indices), or a ``(V, 2)`` array.
            landmarks: ``landmark_embedding.npy`` (DECA/MICA layout, torch tensors
                inside are read without torch), FLAME's ``flame_static_embedding.pkl``
                and/or ``flame_dynamic_embedding.npy``, or a list of these (merged).
            mediapipe_landmarks: ``mediapipe_landmark_embedding.npz``.
            masks: ``FLAME_masks.pkl``.
            n_shape: identity components kept (<= what the file has).
            n_expr: expression components kept.
            dtype: float dtype of the arrays.

        Raises:
            ModelFileError: a file is missing, truncated, of the wrong kind, or lacks a
                key / has a key of the wrong shape; the message names file and key.
        """
        arrays = flame_files.load_flame_model(
            path,
            uv=uv,
            landmarks=landmarks,
            mediapipe_landmarks=mediapipe_landmarks,
            masks=masks,
            n_shape=n_shape,
            n_expr=n_expr,
            dtype=dtype,
        )
        return FlameModel.from_arrays(arrays)

    @staticmethod
    def synthetic(seed: int = 0, dtype: Any = np.float32) -> "FlameModel":
        """A generated stand-in head with FLAME's exact dimensions (see ``synthetic_head``).

        Cached per ``(seed, dtype)``: do not modify the arrays in place.
        """
        return FlameModel.from_arrays(build_synthetic_flame(seed=seed, dtype=dtype))

    # ------------------------------------------------------------------- math
    def vertices(self, params: FlameParams) -> Any:
        """Posed vertices ``(V, 3)`` in the model's dtype and array module."""
        return flame_forward(self, params)[0]

    def neutral_vertices(self, params: FlameParams) -> Any:
        """Vertices with the params' identity, zero expression, zero pose and no translation."""
        xp = self.xp
        p = FlameParams(
            shape=params.shape,
            expr=xp.zeros_like(params.expr),
            pose=xp.zeros_like(params.pose),
            transl=xp.zeros_like(params.transl),
        )
        return self.vertices(p)

    # ------------------------------------------------------------------ files
    def write(self, directory: str | PathLike[str], chumpy_style: bool = False) -> dict[str, str]:
        """Write FLAME-format files (model pkl, head_template.obj, landmark embeddings, masks).

        Returns a dict kind -> path of what was written. See ``flame_write.write_flame_files``.
        """
        return flame_write.write_flame_files(self, directory, chumpy_style=chumpy_style)
