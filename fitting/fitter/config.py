"""What a fit takes: the :class:`Observation` (predicted maps of one image) and the
:class:`FitConfig` (one source of truth for both solvers).

The two solvers are named ``"fast"`` (Levenberg-Marquardt with IRLS weights, the default)
and ``"paper"`` (Adam with the paper's schedule); their settings are prefixed ``fast_``
and ``paper_``. The old ``gn_*`` spellings of the fast solver's settings still work and
warn (:class:`DeprecationWarning`).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..base.errors import InputError
from .energy import EnergyWeights
from .uv_nn import DEFAULT_DELTA_UV_SQ

__all__ = ["FitConfig", "Observation", "SOLVERS"]

#: Solver names of :attr:`FitConfig.solver`.
SOLVERS = ("fast", "paper")


@dataclass
class Observation:
    """Predicted maps of one image.

    Attributes:
        normals: ``(H, W, 3) float32`` unit normals in ``normal_space``.
        uv: ``(H, W, 2) float32`` FLAME UV coordinates in [0, 1].
        mask: ``(H, W)`` bool (or float in [0, 1], thresholded at 0.5) face region.
        normal_space: one of :data:`~p3dmm.fitting.render.maps.NORMAL_SPACES`: ``"camera"`` (OpenCV camera axes) or ``"head"`` (FLAME frame with
            the head's global rotation undone, the official Pixel3DMM convention).
        shape_prior: optional ``(n_shape,)`` identity prior (e.g. from MICA).
    """

    normals: Any
    uv: Any
    mask: Any
    normal_space: str = "camera"
    shape_prior: Any = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.uv.shape[0]), int(self.uv.shape[1])


@dataclass(frozen=True)
class FitConfig:
    """Fitting configuration (one source of truth for both solvers).

    Attributes:
        solver: ``"fast"`` (Levenberg-Marquardt) or ``"paper"`` (Adam, paper schedule).
        weights: energy weights (paper defaults).
        render_size: resolution of the normal-loss render (the official tracker uses 256);
            maps smaller than this are rendered at their own size.
        delta_uv_sq: squared UV distance below which a correspondence is valid (5e-5).
        uv_regions: model mask regions whose vertices get UV targets.
        min_targets: fewer valid correspondences than this is a FittingError.
        min_mask_pixels: a smaller observation mask is a FittingError.
        focal_init: initial focal length in pixels of the observation (default
            ``2 * max(H, W)``, about 28 degrees of field of view); also the focal prior.
        focal: a known focal length in pixels of the observation (EXIF, a calibrated
            camera), held fixed; then the camera-frame mesh is metric. Without it the
            focal length is estimated, and a single image determines it only weakly: the
            projection is what the maps constrain, and depth trades off against focal
            length (a longer lens farther away gives nearly the same image), so the
            fitted ``camera.t[2]`` and ``focal`` can both be off by the same factor while
            the reprojection and the aligned shape are right.
        principal_point: a known ``(cx, cy)`` in pixels of the observation, held fixed
            (default: estimated, with a prior at the image centre).
        visibility_tolerance: depth slack (m) of the vertex visibility test.
        paper_camera_steps / paper_steps: Adam steps of the camera stage / full stage.
        lr_*: Adam learning rates per variable group (paper: shape 1e-3, expr 3e-3).
        rerender_every: steps between re-renders (face ids, visibility) in the paper solver.
        init_uv_iterations: Levenberg-Marquardt passes of the initialisation's non-rigid
            stage, before either solver (UV term and regulariser over every variable, UV
            cap widened by ``init_uv_cap_scale``); 0 starts the solvers from the rigid
            initialisation.
        quality_uv_px: a UV target counts as explained in :attr:`FitResult.quality` when
            its final reprojection is within this many pixels of a 512 px crop.
        quality_min: a fit explaining less than this fraction of its UV targets or of its
            mask's normals is reported as collapsed (not converged, with an issue).
        quality_atlas_min: a UV map with less than this fraction of its mask pixels on the
            model's UV atlas is reported as being in another layout (an issue and a
            :class:`~p3dmm.fitting.base.errors.ConventionWarning`; occluders and a
            predictor's errors leave about 80-100% on it).
        check_conventions: after a collapsed fit, try the other readings of the maps
            (flipped normals, the other normal space, swapped or flipped UV) and raise an
            ``InputError`` naming one that explains them clearly better. Off where the
            conventions are known, as in the runtime (they come from the engines'
            manifest): there a poor prediction is a low-quality fit, not a user's mistake.
        fast_iterations: Levenberg-Marquardt passes of the fast solver's full stage (one
            tried step each; an accepted step is followed by a re-render and a new
            linearisation).
        fast_normal_stride: the fast solver uses every k-th render row/column for L_n.
        fast_tolerance: relative energy decrease below which the fast solver stops.
        fast_irls_floor_start / fast_irls_floor_decay: the IRLS residual floors start this
            many times larger (flatter, more quadratic models: long early steps) and
            shrink by the decay factor per linearisation down to their base values.
        cuda_graphs: on CuPy, capture the fixed-shape solver steps (a Levenberg-Marquardt
            pass, an Adam step) as CUDA graphs and replay them with one launch each
            (:class:`~p3dmm.fitting.base.graph.StepGraph`; falls back to eager steps when
            capture fails). False, or the environment variable ``P3DMM_CUDA_GRAPHS=0``,
            runs every step eagerly (for debugging and profiling). No effect on NumPy.
    """

    solver: str = "fast"
    weights: EnergyWeights = field(default_factory=EnergyWeights)
    render_size: int = 256
    delta_uv_sq: float = DEFAULT_DELTA_UV_SQ
    uv_regions: tuple[str, ...] = ("face", "left_ear", "right_ear")
    min_targets: int = 20
    min_mask_pixels: int = 64
    focal_init: float | None = None
    focal: float | None = None
    principal_point: tuple[float, float] | None = None
    visibility_tolerance: float = 0.005
    paper_camera_steps: int = 500
    paper_steps: int = 800
    lr_shape: float = 1e-3
    lr_expr: float = 3e-3
    lr_pose: float = 3e-3
    lr_t: float = 1e-3
    lr_log_f: float = 3e-3
    lr_pp: float = 0.1
    rerender_every: int = 1
    init_uv_iterations: int = 10
    init_uv_cap_scale: float = 4.0
    quality_uv_px: float = 5.0
    quality_min: float = 0.15
    quality_atlas_min: float = 0.7
    check_conventions: bool = True
    fast_iterations: int = 30
    fast_normal_stride: int = 2
    fast_tolerance: float = 5e-3
    fast_irls_floor_start: float = 5.0
    fast_irls_floor_decay: float = 0.6
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise InputError(f"FitConfig.solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.render_size < 16:
            raise InputError(f"FitConfig.render_size must be >= 16, got {self.render_size}")
        if self.focal is not None and not (math.isfinite(self.focal) and self.focal > 0):
            raise InputError(f"FitConfig.focal must be a positive focal length in pixels, got {self.focal!r}")
        if self.principal_point is not None:
            pp = tuple(self.principal_point)
            if len(pp) != 2 or not all(math.isfinite(float(c)) for c in pp):
                raise InputError(f"FitConfig.principal_point must be (cx, cy) in pixels, got {self.principal_point!r}")


#: Old spelling -> field of the fast solver's settings.
_DEPRECATED_FIELDS = {
    "gn_iterations": "fast_iterations",
    "gn_normal_stride": "fast_normal_stride",
    "gn_tolerance": "fast_tolerance",
    "gn_irls_floor_start": "fast_irls_floor_start",
    "gn_irls_floor_decay": "fast_irls_floor_decay",
}


def _accept_deprecated_names(init: Any) -> Any:
    """Wrap ``FitConfig.__init__`` so that ``gn_*`` keywords map to ``fast_*`` with a warning.

    An old keyword wins over the new one when both are given (``dataclasses.replace(cfg,
    gn_iterations=...)`` passes every current field too).
    """

    @functools.wraps(init)
    def __init__(self: FitConfig, *args: Any, **kwargs: Any) -> None:
        for old, new in _DEPRECATED_FIELDS.items():
            if old in kwargs:
                warnings.warn(f"FitConfig({old}=...) is deprecated; use {new}=", DeprecationWarning, stacklevel=2)
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    return __init__


def _deprecated_property(old: str, new: str) -> property:
    def get(self: FitConfig) -> Any:
        warnings.warn(f"FitConfig.{old} is deprecated; use FitConfig.{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated spelling of :attr:`{new}`.")


FitConfig.__init__ = _accept_deprecated_names(FitConfig.__init__)  # type: ignore[method-assign]
for _old, _new in _DEPRECATED_FIELDS.items():
    setattr(FitConfig, _old, _deprecated_property(_old, _new))
