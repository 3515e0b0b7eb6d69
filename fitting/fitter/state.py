"""The variables and per-image data of a fit: :class:`FitState`, the UV and normal targets,
and the :class:`Frame` a render provides to the energy.

Conventions: the camera rotation is fixed to :data:`FLAME_TO_OPENCV` (the head's global
rotation is a FLAME pose parameter) and FLAME's own translation stays zero, so the camera
of a state is ``x_cam = R0 @ v + t``, ``pixel = f * x_cam[:2] / x_cam[2] + c``
(:meth:`FitState.camera`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base.camera import FLAME_TO_OPENCV, Camera
from ..base.xp import constant, get_array_module
from ..model.params import FlameParams

__all__ = ["FitState", "Frame", "NormalTargets", "UVTargets"]


@dataclass
class FitState:
    """Optimisation variables. Arrays live on the fitting device (NumPy or CuPy).

    Attributes:
        shape: ``(n_shape,)`` FLAME identity coefficients.
        expr: ``(n_expr,)`` FLAME expression coefficients.
        pose: ``(5, 3)`` (:data:`~p3dmm.fitting.model.params.POSE_SHAPE`) FLAME joint rotations.
        t: ``(3,)`` the camera's translation (:attr:`Camera.t`); FLAME's own translation
            (:attr:`FlameParams.transl`) stays zero in a fit.
        log_f: ``()`` log focal length in pixels of the observation.
        pp: ``(2,)`` principal point in pixels of the observation.
    """

    shape: Any
    expr: Any
    pose: Any
    t: Any
    log_f: Any
    pp: Any

    NAMES = ("shape", "expr", "pose", "t", "log_f", "pp")

    def to_vector(self) -> Any:
        xp = get_array_module(self.shape)
        return xp.concatenate([xp.ravel(getattr(self, n)) for n in self.NAMES])

    def sizes(self) -> list[int]:
        return [int(np.prod(getattr(self, n).shape)) for n in self.NAMES]

    def from_vector(self, x: Any) -> "FitState":
        out, k = [], 0
        for n, s in zip(self.NAMES, self.sizes()):
            out.append(x[k : k + s].reshape(getattr(self, n).shape))
            k += s
        return FitState(*out)

    def params(self) -> FlameParams:
        xp = get_array_module(self.shape)
        return FlameParams(shape=self.shape, expr=self.expr, pose=self.pose, transl=xp.zeros(3, dtype=self.shape.dtype))

    def camera(self, width: int, height: int) -> Camera:
        """The camera of this state for a ``width x height`` observation (arrays on the device)."""
        xp = get_array_module(self.shape)
        return Camera(
            focal=xp.exp(self.log_f),
            principal=self.pp,
            R=constant(xp, FLAME_TO_OPENCV, self.shape.dtype),
            t=self.t,
            width=width,
            height=height,
        )

    def copy(self) -> "FitState":
        return FitState(*(getattr(self, n).copy() for n in self.NAMES))


@dataclass
class UVTargets:
    """Per-image UV correspondences (computed once per image).

    The arrays have one row per query vertex whether or not it found a pixel (fixed
    shapes: selecting the valid rows would need their count on the host); ``valid``
    marks the ones that did.

    Attributes:
        vertex_ids: ``(N,) int`` FLAME vertices queried.
        pixels: ``(N, 2) float`` target pixel coordinates (x = column, y = row).
        n_targets: the number of valid targets (an int, or on CuPy a 0-d device array in
            the pixels' float dtype, so it does not promote).
        valid: ``(N,) bool`` rows with a correspondence (None: all of them).
    """

    vertex_ids: Any
    pixels: Any
    n_targets: Any
    valid: Any = None

    @property
    def normaliser(self) -> Any:
        """N_t of L_uv: ``max(n_targets, 1)`` (no division by zero without targets)."""
        if isinstance(self.n_targets, (int, np.integer)):
            return max(int(self.n_targets), 1)
        return get_array_module(self.n_targets).maximum(self.n_targets, 1)

    def weight(self) -> Any:
        """``(N,)`` 1.0 for valid rows, 0.0 otherwise (in the pixels' dtype)."""
        xp = get_array_module(self.pixels)
        if self.valid is None:
            return xp.ones(self.pixels.shape[0], dtype=self.pixels.dtype)
        return self.valid.astype(self.pixels.dtype)


@dataclass
class NormalTargets:
    """Observed normals at the render resolution (their ``(H, W)`` is the render size).

    Attributes:
        normals: ``(H, W, 3)`` unit normals in ``space``.
        mask: ``(H, W) bool`` pixels that take part.
        space: ``"camera"`` or ``"head"``.
        grid: optional ``(P,)`` flat indices of the only pixels ``mask`` can be True at
            (a strided subset); the dense L_n evaluation then visits just those.
        n_mask: ``mask.sum()`` (an int on NumPy, a 0-d device array on CuPy, where
            reading it would synchronise).
        n_pixels: normaliser of L_n, ``max(n_mask, 1)``.
    """

    normals: Any
    mask: Any
    space: str
    grid: Any = None
    n_mask: Any = field(init=False)
    n_pixels: Any = field(init=False)

    def __post_init__(self) -> None:
        xp = get_array_module(self.mask)
        if xp is np:
            self.n_mask = int(self.mask.sum())
            self.n_pixels = max(self.n_mask, 1)
        else:  # in the normals' dtype: an int64 0-d array would promote float32 weights to float64
            self.n_mask = self.mask.sum().astype(self.normals.dtype)
            self.n_pixels = xp.maximum(self.n_mask, 1)


@dataclass
class Frame:
    """What a render of the current state provides to the energy (constants of a step).

    Attributes:
        face_id: ``(H, W) int32`` rasterized face per pixel of the normal render (-1 empty).
        bary: ``(H, W, 3)`` barycentrics.
        visible: ``(N,) bool`` visibility of each UV target vertex (depth test).
    """

    face_id: Any
    bary: Any
    visible: Any
