"""FLAME parameters and the constants of FLAME's kinematic tree.

Conventions (identical to the reference FLAME layer, smplx ``FLAME``):
    * joints 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye; parents [-1, 0, 1, 1, 1]
    * pose: 5 axis-angle vectors in that joint order, ``(5, 3)`` (15 values)
    * translation is added after skinning
    * geometry in metres, FLAME frame: y up, z towards the face's front
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from ..base.errors import InputError
from ..base.xp import asarray_on, get_array_module, to_numpy

__all__ = [
    "FLAME_PARENTS",
    "FLAME_SHAPE_SPACE",
    "FlameParams",
    "JOINT_NAMES",
    "KINTREE_ROOT_SENTINEL",
    "N_JOINTS",
    "N_POSE_BASIS",
    "POSE_SHAPE",
]

N_JOINTS = 5
FLAME_PARENTS = np.array([-1, 0, 1, 1, 1], dtype=np.int64)
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")
#: Shape of :attr:`FlameParams.pose`: one axis-angle vector per joint.
POSE_SHAPE = (N_JOINTS, 3)
#: Pose-corrective blend shapes: 9 entries of ``R_j - I`` for every joint but the root.
N_POSE_BASIS = 9 * (N_JOINTS - 1)
#: Identity columns in FLAME's ``shapedirs``; expression columns start here (smplx does
#: the same: ``shapedirs[:, :, 300:300 + n_expr]``).
FLAME_SHAPE_SPACE = 300
#: Parent id FLAME stores for the root joint in ``kintree_table`` (uint32 -1).
KINTREE_ROOT_SENTINEL = 4294967295


@dataclass
class FlameParams:
    """FLAME parameters of one head.

    Attributes:
        shape: ``(n_shape,)`` identity coefficients (units of standard deviations).
        expr: ``(n_expr,)`` expression coefficients.
        pose: ``(5, 3)`` axis-angle rotations: global, neck, jaw, left eye, right eye.
        transl: ``(3,)`` translation in metres, added after skinning.
    """

    shape: Any
    expr: Any
    pose: Any
    transl: Any

    @staticmethod
    def zeros(n_shape: int = 300, n_expr: int = 100, xp: ModuleType = np, dtype: Any = np.float32) -> "FlameParams":
        """All-zero parameters (the template head)."""
        return FlameParams(
            shape=xp.zeros(n_shape, dtype=dtype),
            expr=xp.zeros(n_expr, dtype=dtype),
            pose=xp.zeros(POSE_SHAPE, dtype=dtype),
            transl=xp.zeros(3, dtype=dtype),
        )

    @property
    def n_values(self) -> int:
        return int(self.shape.shape[0] + self.expr.shape[0] + 3 * N_JOINTS + 3)

    def to_vector(self) -> Any:
        """Concatenate to ``(n_shape + n_expr + 15 + 3,)`` in the order shape, expr, pose, transl."""
        xp = get_array_module(self.shape)
        return xp.concatenate([self.shape.ravel(), self.expr.ravel(), self.pose.ravel(), self.transl.ravel()])

    @staticmethod
    def from_vector(x: Any, n_shape: int, n_expr: int) -> "FlameParams":
        """Inverse of :meth:`to_vector`."""
        n = n_shape + n_expr + 3 * N_JOINTS + 3
        if x.shape != (n,):
            raise InputError(f"FlameParams.from_vector: got shape {tuple(x.shape)}, expected ({n},)")
        a, b, c = n_shape, n_shape + n_expr, n_shape + n_expr + 3 * N_JOINTS
        return FlameParams(shape=x[:a], expr=x[a:b], pose=x[b:c].reshape(POSE_SHAPE), transl=x[c:])

    def astype(self, xp: ModuleType, dtype: Any = np.float32) -> "FlameParams":
        """Copy onto array module ``xp`` with ``dtype``."""
        return FlameParams(*(asarray_on(xp, getattr(self, f.name), dtype) for f in dataclasses.fields(self)))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready dict of host lists."""
        return {f.name: to_numpy(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: Mapping[str, Any], dtype: Any = np.float32) -> "FlameParams":
        try:
            return FlameParams(
                shape=np.asarray(d["shape"], dtype=dtype),
                expr=np.asarray(d["expr"], dtype=dtype),
                pose=np.asarray(d["pose"], dtype=dtype).reshape(POSE_SHAPE),
                transl=np.asarray(d["transl"], dtype=dtype),
            )
        except KeyError as e:
            raise InputError(f"FlameParams dict lacks key {e}; expected shape, expr, pose, transl") from e
