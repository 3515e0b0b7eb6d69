"""Fit FLAME and a camera to predicted normal and UV maps.

``fit(observation, model, config, device)`` runs, per image:

1. validation of the maps (shape, dtype, finiteness, mask size) and of the model (UVs);
2. UV correspondences, once: every valid FLAME vertex (``config.uv_regions``, eyeballs
   excluded) gets the pixel whose predicted UV is nearest its template UV
   (:func:`p3dmm.fitting.uv_nn.uv_targets`), kept if closer than ``delta_uv_sq``;
3. initialisation from those correspondences alone (no landmark detector): an affine
   camera fitted by least squares to template-vertex/pixel pairs gives the head rotation
   and a weak-perspective scale, refined to a perspective rigid pose + focal length by
   Gauss-Newton on the UV residuals;
4. a solver over shape, expression, pose and camera: ``"paper"`` (Adam with the
   paper's learning rates and schedule, faithful to Pixel3DMM) or ``"fast"``
   (Levenberg-Marquardt with IRLS weights for the robust terms, analytic Jacobians).

Arrays stay on the fitting device (NumPy or CuPy) throughout; results are copied to the
host only when the :class:`FitResult` is built.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .camera import FLAME_TO_OPENCV, Camera
from .energy import EnergyTerms, EnergyWeights, FitState, Frame, NormalTargets, UVTargets, evaluate_energy, project
from .errors import FittingError, InputError
from .flame_model import FlameModel, FlameParams
from .lbs import flame_forward, rodrigues, rotation_to_axis_angle, shaped_vertices
from .xp import asarray_on, constant, device_of, get_array_module

__all__ = ["Observation", "FitConfig", "FitResult", "fit"]

log = logging.getLogger(__name__)


# ============================================================================ inputs
@dataclass
class Observation:
    """Predicted maps of one image.

    Attributes:
        normals: ``(H, W, 3) float32`` unit normals in ``normal_space``.
        uv: ``(H, W, 2) float32`` FLAME UV coordinates in [0, 1].
        mask: ``(H, W)`` bool (or float in [0, 1], thresholded at 0.5) face region.
        normal_space: ``"camera"`` (OpenCV camera axes) or ``"head"`` (FLAME frame with
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
        render_size: resolution of the normal-loss render (the official tracker uses 256).
        delta_uv_sq: squared UV distance below which a correspondence is valid (5e-5).
        uv_regions: model mask regions whose vertices get UV targets.
        min_targets: fewer valid correspondences than this is a FittingError.
        min_mask_pixels: a smaller observation mask is a FittingError.
        focal_init: initial focal length in pixels of the observation (default
            ``2 * max(H, W)``, about 28 degrees of field of view); also the focal prior.
        visibility_tolerance: depth slack (m) of the vertex visibility test.
        paper_camera_steps / paper_steps: Adam steps of the camera stage / full stage.
        lr_*: Adam learning rates per variable group (paper: shape 1e-3, expr 3e-3).
        gn_iterations: Levenberg-Marquardt passes of the fast solver (one tried step each;
            an accepted step is followed by a re-render and a new linearisation).
        gn_normal_stride: the fast solver uses every k-th render row/column for L_n.
        gn_tolerance: relative energy decrease below which LM stops.
        gn_irls_floor_start / gn_irls_floor_decay: the IRLS residual floors start this
            many times larger (flatter, more quadratic models: long early steps) and
            shrink by the decay factor per iteration down to their base values.
        rerender_every: steps between re-renders (face ids, visibility) in the paper solver.
    """

    solver: str = "fast"
    weights: EnergyWeights = field(default_factory=EnergyWeights)
    render_size: int = 256
    delta_uv_sq: float = 5e-5
    uv_regions: tuple[str, ...] = ("face", "left_ear", "right_ear")
    min_targets: int = 20
    min_mask_pixels: int = 64
    focal_init: float | None = None
    visibility_tolerance: float = 0.005
    paper_camera_steps: int = 500
    paper_steps: int = 800
    lr_shape: float = 1e-3
    lr_expr: float = 3e-3
    lr_pose: float = 3e-3
    lr_t: float = 1e-3
    lr_log_f: float = 3e-3
    lr_pp: float = 0.1
    gn_iterations: int = 30
    gn_normal_stride: int = 2
    gn_tolerance: float = 5e-3
    gn_irls_floor_start: float = 5.0
    gn_irls_floor_decay: float = 0.6
    rerender_every: int = 1

    def __post_init__(self) -> None:
        if self.solver not in ("fast", "paper"):
            raise InputError(f"FitConfig.solver must be 'fast' or 'paper', got {self.solver!r}")
        if self.render_size < 16:
            raise InputError(f"FitConfig.render_size must be >= 16, got {self.render_size}")


@dataclass
class FitResult:
    """Result of :func:`fit` (host NumPy arrays).

    Attributes:
        params: fitted FLAME parameters (translation zero: the camera holds it).
        camera: fitted camera at the observation's resolution.
        vertices: ``(V, 3) float32`` posed vertices in the FLAME/world frame.
        neutral_vertices: ``(V, 3)`` identity only (zero expression and pose).
        energies: final per-term energies.
        history: per step dicts (stage, iteration, total, uv, normal, regularizer, active
            counts): every Adam step; for the fast solver, every re-render (linearisation).
        iterations: solver steps run (Adam steps; for the fast solver, LM passes = tried steps).
        converged: False only when the fast solver ran out of iterations or the paper
            schedule ended with a higher energy than it started the fitting stage with.
        stop_reason: ``"tolerance"``, ``"no_decrease"``, ``"max_iterations"`` (fast) or
            ``"schedule"`` / ``"energy_increased"`` (paper).
        n_targets: valid UV correspondences.
        timings: seconds per stage.
    """

    params: FlameParams
    camera: Camera
    vertices: np.ndarray
    neutral_vertices: np.ndarray
    energies: dict[str, float]
    history: list[dict[str, float]]
    iterations: int
    converged: bool
    stop_reason: str
    n_targets: int
    timings: dict[str, float]

    @property
    def report(self) -> dict[str, Any]:
        """Convergence report (JSON-ready)."""
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "energies": self.energies,
            "n_targets": self.n_targets,
            "timings": self.timings,
        }


# ======================================================================= validation
class _Checks:
    """Checks of the input whose outcome is a count on the fitting device.

    On NumPy a failing check raises at once. On CuPy reading the count would make the host
    wait for the device, so the checks are queued and :meth:`raise_failed` reads all of
    them in one transfer when the result is read; the solve runs meanwhile (on arrays
    that stay finite or merely produce a non-finite energy) and no result is returned
    from input that failed a check.
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self._pending: list[tuple[Any, Any, Any]] = []

    def require(self, count: Any, ok: Any, error: Any) -> None:
        """Raise ``error(n)`` unless ``ok(n)`` for ``n = int(count)`` (now, or deferred on the GPU)."""
        if self.xp is np:
            n = int(count)
            if not ok(n):
                raise error(n)
        else:
            self._pending.append((count, ok, error))

    def counts(self) -> Any:
        """``(n_checks,)`` float64 device vector of the queued counts (empty on NumPy)."""
        xp = self.xp
        if not self._pending:
            return xp.zeros(0)
        return xp.stack([xp.asarray(c, dtype=xp.float64).reshape(()) for c, _, _ in self._pending])

    def raise_failed(self, counts: Any = None) -> None:
        """Raise the first failed queued check's error.

        Args:
            counts: host copy of :meth:`counts` (read here when not given).
        """
        if not self._pending:
            return
        values = self.counts().get() if counts is None else counts
        pending, self._pending = self._pending, []
        for n, (_, ok, error) in zip(values, pending):
            if not ok(int(n)):
                raise error(int(n))


def _validate(obs: Observation, model: FlameModel, config: FitConfig, xp: Any, checks: _Checks) -> tuple[Any, Any, Any]:
    """Check the observation; returns (normals, uv, mask) on the fitting device.

    Shapes, dtypes and the model are checked on the host at once. The two checks that
    need the data (non-finite masked pixels, mask size) go through ``checks``: immediate
    on NumPy, read with the result on CuPy (maps already on the device stay there).
    """
    uv, normals, mask = obs.uv, obs.normals, obs.mask
    for name, a in (("uv", uv), ("normals", normals), ("mask", mask)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise InputError(f"fit: observation.{name} is a {type(a).__name__}, expected a NumPy or CuPy array")
    if uv.ndim != 3 or uv.shape[2] != 2:
        raise InputError(f"fit: observation.uv has shape {tuple(uv.shape)}, expected (H, W, 2)")
    H, W = uv.shape[:2]
    if H != W:
        raise InputError(f"fit: observation maps are {H}x{W}; expected a square face crop (H == W, e.g. 512x512)")
    if tuple(normals.shape) != (H, W, 3):
        raise InputError(f"fit: observation.normals has shape {tuple(normals.shape)}, expected ({H}, {W}, 3)")
    if tuple(mask.shape) != (H, W):
        raise InputError(f"fit: observation.mask has shape {tuple(mask.shape)}, expected ({H}, {W})")
    for name, a in (("uv", uv), ("normals", normals)):
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"fit: observation.{name} has dtype {a.dtype}, expected float32")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
        raise InputError(f"fit: observation.mask has dtype {mask.dtype}, expected bool or float")
    if obs.normal_space not in ("camera", "head"):
        raise InputError(f"fit: observation.normal_space must be 'camera' or 'head', got {obs.normal_space!r}")
    if model.uv is None:
        raise FittingError(f"fit: model {model.name!r} has no UV layout; load it with uv='head_template.obj'")
    if obs.shape_prior is not None and tuple(np.shape(obs.shape_prior)) != (model.n_shape,):
        raise InputError(f"fit: observation.shape_prior has shape {np.shape(obs.shape_prior)}, expected ({model.n_shape},)")
    uv = asarray_on(xp, uv)
    normals = asarray_on(xp, normals)
    mask = asarray_on(xp, mask)
    if mask.dtype != bool:
        mask = mask > 0.5
    bad = ~(xp.isfinite(uv).all(-1) & xp.isfinite(normals).all(-1)) & mask
    checks.require(
        bad.sum(),
        lambda n: n == 0,
        lambda n: InputError(f"fit: {n} masked pixels have NaN/inf in observation.uv or observation.normals"),
    )
    min_px = config.min_mask_pixels
    checks.require(
        mask.sum(),
        lambda n: n >= min_px,
        lambda n: FittingError(f"fit: observation.mask has {n} pixels, fewer than min_mask_pixels={min_px}"),
    )
    normals = xp.where(mask[..., None], normals, 0.0).astype(xp.float32)
    return normals, xp.where(mask[..., None], uv, 0.0).astype(xp.float32), mask


def _uv_vertex_ids(model: FlameModel, regions: tuple[str, ...]) -> np.ndarray:
    ids = [np.asarray(model.masks[r]) for r in regions if r in model.masks]
    if not ids:
        # no region masks: every vertex that is not an eyeball vertex
        eyes = [np.asarray(model.masks[r]) for r in ("left_eyeball", "right_eyeball") if r in model.masks]
        keep = np.ones(model.n_vertices, bool)
        for e in eyes:
            keep[e] = False
        return np.nonzero(keep)[0]
    out = np.unique(np.concatenate(ids))
    for r in ("left_eyeball", "right_eyeball"):
        if r in model.masks:
            out = np.setdiff1d(out, np.asarray(model.masks[r]))
    return out


def _downsample_normals(normals: Any, mask: Any, size: int) -> tuple[Any, Any, float]:
    """Square ``(S, S)`` maps to ``size x size``: area average (majority mask) when S is a
    multiple of ``size``, nearest pixel otherwise."""
    xp = get_array_module(normals)
    H, W = mask.shape
    s = size / max(H, W)
    if H % size == 0 and W % size == 0 and H == W:
        k = H // size
        n = (normals * mask[..., None]).reshape(size, k, size, k, 3).sum((1, 3))
        m = mask.reshape(size, k, size, k).mean((1, 3)) > 0.5
    else:
        rows = xp.clip(((xp.arange(size) + 0.5) / s - 0.5).round().astype(xp.int64), 0, H - 1)
        cols = xp.clip(((xp.arange(size) + 0.5) / s - 0.5).round().astype(xp.int64), 0, W - 1)
        n = normals[rows][:, cols]
        m = mask[rows][:, cols]
    norm = xp.sqrt((n * n).sum(-1, keepdims=True))
    m = m & (norm[..., 0] > 1e-6)
    return (n / xp.maximum(norm, 1e-12)).astype(normals.dtype), m, s


# ========================================================================= rendering
def _render_frame(
    model: FlameModel, state: FitState, uv: UVTargets, size: int, scale: float, tol: float, verts: Any = None
) -> Frame:
    """Rasterize the current state at the render resolution; visibility of UV targets."""
    from .raster import rasterize

    xp = get_array_module(state.shape)
    if verts is None:
        verts = flame_forward(model, state.params())[0]
    Xc, _ = project(state, verts)
    f = xp.exp(state.log_f) * scale
    pp = (state.pp + 0.5) * scale - 0.5
    cam = Camera(focal=f, principal=pp, R=xp.eye(3, dtype=Xc.dtype), t=xp.zeros(3, dtype=Xc.dtype), width=size, height=size)
    frags = rasterize(Xc.astype(xp.float32), model.faces, cam, size, size)
    # visibility: a target vertex is visible if it is not behind the rendered surface
    Xt = Xc[uv.vertex_ids]
    px = f * Xt[:, :2] / Xt[:, 2:3] + pp
    col = xp.clip(xp.rint(px[:, 0]).astype(xp.int64), 0, size - 1)
    row = xp.clip(xp.rint(px[:, 1]).astype(xp.int64), 0, size - 1)
    inside = (px[:, 0] > -0.5) & (px[:, 0] < size - 0.5) & (px[:, 1] > -0.5) & (px[:, 1] < size - 0.5)
    d = frags.depth[row, col]
    visible = inside & (Xt[:, 2] > 0) & ((frags.face_id[row, col] < 0) | (Xt[:, 2] <= d + tol))
    return Frame(face_id=frags.face_id, bary=frags.bary.astype(Xc.dtype), visible=visible)


# ==================================================================== initialisation
def _init_rigid(
    model: FlameModel, uv: UVTargets, f0: float, pp0: Any, size: tuple[int, int], weights: EnergyWeights, iters: int = 15
) -> FitState:
    """Head rotation, camera translation and focal from UV correspondences alone.

    An affine camera ``p = M X + b`` is fitted to (template vertex, target pixel) pairs by
    iteratively reweighted least squares (normal equations: ``lstsq`` would read the rank
    back on CuPy); the nearest rotation to the rows of ``M`` gives the head rotation, its
    scale the depth ``f0 / s``; then :func:`_refine_rigid`. Runs on the fitting device in
    float64 without reading anything back.
    """
    xp = get_array_module(uv.pixels)
    X = model.v_template[uv.vertex_ids].astype(xp.float64)
    p = uv.pixels.astype(xp.float64)
    valid = uv.weight().astype(xp.float64)
    pp = asarray_on(xp, pp0, xp.float64)
    A = xp.concatenate([X, xp.ones((X.shape[0], 1))], 1)
    w = valid
    for _ in range(5):
        Aw = A * w[:, None]
        AtA = Aw.T @ A
        AtA = AtA + 1e-9 * (xp.trace(AtA) + 1.0) * xp.eye(4)  # keeps a degenerate set solvable
        sol = xp.linalg.solve(AtA, Aw.T @ p)
        res = xp.sqrt(((A @ sol - p) ** 2).sum(1))
        w = valid / xp.maximum(res, 1.0)  # IRLS for sum |r|: weight 1/|r| on the squares
    M, b = sol[:3].T, sol[3]
    # s > 0 keeps a degenerate fit (no correspondences: reported when the result is read) finite
    s = xp.maximum(0.5 * (xp.sqrt((M[0] ** 2).sum()) + xp.sqrt((M[1] ** 2).sum())), 1e-9)
    B = xp.stack([M[0] / s, M[1] / s, xp.cross(M[0], M[1]) / s**2])
    U, _, Vt = xp.linalg.svd(B)
    D = xp.diag(xp.stack([xp.ones(()), xp.ones(()), xp.linalg.det(U @ Vt)]))
    Rc = U @ D @ Vt  # camera-from-FLAME rotation R0 Rg
    Rg = constant(xp, FLAME_TO_OPENCV, xp.float64).T @ Rc
    tz = f0 / s - ((X @ Rc.T)[:, 2] * valid).sum() / xp.maximum(valid.sum(), 1.0)
    txy = (b - pp) / s
    t = xp.stack([txy[0], txy[1], tz])
    return _refine_rigid(X, p, valid, uv.n_targets, Rg, t, math.log(f0), pp, size, weights, iters, model)


def _refine_rigid(
    X: Any,
    p: Any,
    valid: Any,
    n_targets: Any,
    Rg: Any,
    t: Any,
    lf0: float,
    pp: Any,
    size: tuple[int, int],
    weights: EnergyWeights,
    iters: int,
    model: FlameModel,
) -> FitState:
    """Gauss-Newton with IRLS on ``(lambda_uv / N) sum |r_v| + lambda_f (log f - log f0)^2``.

    Variables: a left rotation increment in camera axes, the camera translation and the
    log focal length; the template (zero shape/expression) is rigid here; ``valid``
    (0/1 per row) drops rows without a correspondence and ``n_targets`` is N. A fixed
    number of iterations (no convergence test, which would read the device).
    """
    xp = get_array_module(X)
    R0 = constant(xp, FLAME_TO_OPENCV, xp.float64)
    S = float(max(size))
    n = xp.maximum(xp.asarray(n_targets, dtype=xp.float64), 1.0)
    lf = xp.asarray(lf0, dtype=xp.float64)
    eye7 = xp.eye(7)
    for _ in range(iters):
        Y = X @ (R0 @ Rg).T
        Xc = Y + t
        f = xp.exp(lf)
        Z = Xc[:, 2]
        r = (f * Xc[:, :2] / Z[:, None] + pp - p) / S
        rho = xp.sqrt((r * r).sum(1))
        w = valid * (weights.uv / n) / xp.maximum(rho, 1e-4) * (rho * S <= 4 * weights.uv_cap_px)  # outliers out
        rows = []
        for k in range(2):
            e_k = xp.zeros(3)
            e_k[k] = 1.0
            dp = (f / Z)[:, None] * e_k - (f * Xc[:, k] / Z**2)[:, None] * constant(xp, [0.0, 0.0, 1.0], xp.float64)
            dp = dp / S
            # d/d(omega) of dp . (omega x Y) = Y x dp ; d/dt = dp ; d/dlogf = f X_k / Z / S
            rows.append(xp.concatenate([xp.cross(Y, dp), dp, (f * Xc[:, k] / Z / S)[:, None]], 1))
        J = xp.concatenate(rows)
        rr = xp.concatenate([r[:, 0], r[:, 1]])
        ww = xp.concatenate([w, w])
        H = (J * ww[:, None]).T @ J
        g = (J * ww[:, None]).T @ rr
        H = H + 2 * weights.focal * eye7[6][:, None] * eye7[6][None, :]
        g = g + 2 * weights.focal * (lf - lf0) * eye7[6]
        delta = -xp.linalg.solve(H + 1e-9 * xp.trace(H) * eye7, g)
        Rg = R0.T @ rodrigues(delta[None, :3])[0] @ R0 @ Rg
        t = t + delta[3:6]
        lf = lf + delta[6]
    dt = model.v_template.dtype
    pose = xp.zeros((5, 3), dtype=dt)
    pose[0] = rotation_to_axis_angle(Rg).astype(dt)
    return FitState(
        shape=xp.zeros(model.n_shape, dtype=dt),
        expr=xp.zeros(model.n_expr, dtype=dt),
        pose=pose,
        t=t.astype(dt),
        log_f=lf.astype(dt),
        pp=pp.astype(dt),
    )


# ============================================================================ solvers
_ADAM_GROUPS_CAMERA = ("pose", "t", "log_f", "pp")


def _adam(
    ctx: "_Context", state: FitState, steps: int, groups: tuple[str, ...], weights: EnergyWeights, stage: str
) -> FitState:
    """Adam on the energy (the paper's optimiser), re-rendering every ``rerender_every`` steps."""
    xp = ctx.xp
    cfg = ctx.config
    lrs = {
        "shape": cfg.lr_shape,
        "expr": cfg.lr_expr,
        "pose": cfg.lr_pose,
        "t": cfg.lr_t,
        "log_f": cfg.lr_log_f,
        "pp": cfg.lr_pp,
    }
    m = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    v = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    b1, b2, eps = 0.9, 0.999, 1e-8
    frame = None
    # shape and expression are constant in the camera stage: blend them once
    shaped = shaped_vertices(ctx.model, state.params()) if "shape" not in groups else None
    for it in range(steps):
        fwd = flame_forward(ctx.model, state.params(), shaped)
        if frame is None or it % max(cfg.rerender_every, 1) == 0:
            frame = ctx.render(state, fwd[0])
        e = ctx.energy(state, frame, weights, forward=fwd)
        grad = e.grad
        if grad is None:  # pragma: no cover - energy() is called with_grad=True
            raise FittingError("fit: the energy returned no gradient")
        for g in groups:
            gr = getattr(grad, g)
            if stage == "camera" and g == "pose":
                gr = gr.copy()
                gr[1:] = 0.0
            m[g] = b1 * m[g] + (1 - b1) * gr
            v[g] = b2 * v[g] + (1 - b2) * gr * gr
            mh = m[g] / (1 - b1 ** (it + 1))
            vh = v[g] / (1 - b2 ** (it + 1))
            setattr(state, g, getattr(state, g) - lrs[g] * mh / (xp.sqrt(vh) + eps))
        ctx.record(stage, it, e)
    # nothing is read back here: a non-finite energy is reported when the result is read
    return state


# ============================================================================ context
class _Context:
    """Per-image constants shared by the solvers."""

    def __init__(
        self,
        model: FlameModel,
        config: FitConfig,
        uv: UVTargets,
        normals: NormalTargets,
        size: tuple[int, int],
        shape_prior: Any,
        focal_prior: float,
        pp_prior: Any,
    ) -> None:
        self.model = model
        self.config = config
        self.uv = uv
        self.normals = normals
        self.size = size
        self.shape_prior = shape_prior
        self.focal_prior = focal_prior
        self.pp_prior = pp_prior
        self.xp = get_array_module(model.v_template)
        self.history: list[tuple[str, int, Any]] = []
        self.n_renders = 0
        self.checks = _Checks(self.xp)
        self.host_faces: Any = model.faces if self.xp is np else None  # set by prepare() on the GPU

    def render(self, state: FitState, verts: Any = None) -> Frame:
        self.n_renders += 1
        return _render_frame(
            self.model, state, self.uv, self.config.render_size, self.normals.scale, self.config.visibility_tolerance,
            verts,
        )

    def energy(self, state: FitState, frame: Frame, weights: EnergyWeights | None = None, with_grad: bool = True,
               normals: NormalTargets | None = None, forward: tuple[Any, Any] | None = None) -> EnergyTerms:
        return evaluate_energy(
            self.model,
            state,
            self.uv,
            normals if normals is not None else self.normals,
            frame,
            weights or self.config.weights,
            self.size,
            shape_prior=self.shape_prior,
            focal_prior=self.focal_prior,
            pp_prior=self.pp_prior,
            with_grad=with_grad,
            forward=forward,
        )

    def record(self, stage: str, it: int, e: EnergyTerms, skip: Any = None) -> None:
        """Keep the step's energy terms as one device vector (read when the result is built).

        Args:
            skip: optional 0-d device bool; True drops the entry from the history (the
                LM's passes after its stop, or re-linearisations of an unchanged state,
                which the GPU runs because it does not read the device). Entries recorded
                with ``skip`` are numbered consecutively per stage.
        """
        v = _terms_vector(self.xp, e)
        flag = self.xp.zeros((1,), dtype=v.dtype) if skip is None else self.xp.asarray(skip, dtype=v.dtype).reshape(1)
        self.history.append((stage, it if skip is None else -1, self.xp.concatenate([v, flag])))

    def history_dicts(self, values: np.ndarray) -> list[dict[str, Any]]:
        """Per-step dicts from ``values``, the host copy of :meth:`history_array`."""
        out: list[dict[str, Any]] = []
        count: dict[str, int] = {}
        for (st, it, _), v in zip(self.history, values):
            if v[-1]:
                continue
            if it < 0:
                it = count[st] = count.get(st, 0) + 1
            out.append({"stage": st, "iteration": it, **_terms_dict(v[:-1])})
        return out

    def history_array(self) -> Any:
        """``(steps, 6)`` device array: :func:`_terms_vector` rows and the skip flag."""
        if not self.history:
            return self.xp.zeros((0, 6))
        return self.xp.stack([v for _, _, v in self.history])


_TERMS = ("uv", "normal", "regularizer", "n_uv_active", "n_normal_active")


def _terms_vector(xp: Any, e: EnergyTerms) -> Any:
    return xp.stack([xp.asarray(getattr(e, k), dtype=xp.float64) for k in _TERMS])


def _terms_dict(v: np.ndarray) -> dict[str, float]:
    """Host dict in :meth:`EnergyTerms.to_dict`'s layout from a :func:`_terms_vector` copy."""
    uv, normal, reg, n_uv, n_n = (float(x) for x in v)
    return {
        "total": uv + normal + reg,
        "uv": uv,
        "normal": normal,
        "regularizer": reg,
        "n_uv_active": int(n_uv),
        "n_normal_active": int(n_n),
    }


def _download(xp: Any, **arrays: Any) -> dict[str, np.ndarray]:
    """Copy several device arrays to the host in one transfer (float64; shapes kept)."""
    if xp is np:
        return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    flat = [xp.asarray(v, dtype=xp.float64).reshape(-1) for v in arrays.values()]
    host = xp.concatenate(flat).get()
    out, k0 = {}, 0
    for (k, v), f in zip(arrays.items(), flat):
        out[k] = host[k0 : k0 + f.shape[0]].reshape(v.shape)
        k0 += f.shape[0]
    return out


# ================================================================================ fit
def prepare(
    observation: Observation, model: FlameModel, config: FitConfig, device: str = "cpu"
) -> tuple[_Context, FitState, dict[str, float]]:
    """Validation, UV correspondences, normal targets and the initial state of a fit.

    Returns:
        (per-image context shared by the solvers, initial state, timings). On CuPy the
        checks that need the data are pending in ``context.checks`` (see
        :class:`_Checks`); call ``context.checks.raise_failed()`` before using a result.
    """
    timings: dict[str, float] = {}
    xp = device_of(device)
    checks = _Checks(xp)
    normals_d, uv_d, mask_d = _validate(observation, model, config, xp, checks)
    dmodel = _model_on(model, device)
    H, W = mask_d.shape
    S = max(H, W)

    # ------------------------------------------------------------ correspondences
    from .uv_nn import uv_targets

    t0 = time.perf_counter()
    ids = _uv_vertex_ids(model, config.uv_regions)
    query = asarray_on(xp, model.uv.vertex_uv[ids], np.float32)  # type: ignore[union-attr]
    pix, valid = uv_targets(query, uv_d, mask_d, config.delta_uv_sq)
    n_valid = valid.sum()
    n_valid = int(n_valid) if xp is np else n_valid.astype(dmodel.v_template.dtype)
    min_t, radius = config.min_targets, math.sqrt(config.delta_uv_sq)
    checks.require(
        n_valid,
        lambda n: n >= min_t,
        lambda n: FittingError(
            f"fit: only {n} FLAME vertices found a pixel with UV within sqrt(delta_uv_sq)={radius:.4f} "
            f"(need {min_t}); the UV map does not match the model's UV layout or the mask is wrong"
        ),
    )
    # all queried vertices keep their row (fixed shapes on the device); `valid` masks them
    uvt = UVTargets(
        vertex_ids=asarray_on(xp, ids),
        pixels=xp.where(valid[:, None], pix, 0.0).astype(dmodel.v_template.dtype),
        n_targets=n_valid,
        valid=valid,
    )
    n_d, m_d, scale = _downsample_normals(normals_d, mask_d, min(config.render_size, S))
    ntg = NormalTargets(normals=n_d.astype(dmodel.v_template.dtype), mask=m_d, space=observation.normal_space, scale=scale)
    timings["correspondences"] = time.perf_counter() - t0

    # ----------------------------------------------------------------- init
    t0 = time.perf_counter()
    f0 = float(config.focal_init or 2.0 * S)
    pp0 = np.array([(W - 1) / 2, (H - 1) / 2])
    state = _init_rigid(dmodel, uvt, f0, pp0, (H, W), config.weights)
    prior = None if observation.shape_prior is None else asarray_on(xp, observation.shape_prior, dmodel.v_template.dtype)
    ctx = _Context(dmodel, config, uvt, ntg, (H, W), prior, math.log(f0), asarray_on(xp, pp0, dmodel.v_template.dtype))
    ctx.checks = checks
    ctx.host_faces = model.faces
    timings["init"] = time.perf_counter() - t0
    return ctx, state, timings


def fit(
    observation: Observation,
    model: FlameModel,
    config: FitConfig | None = None,
    device: str = "cpu",
) -> FitResult:
    """Fit FLAME shape, expression, pose and a camera to predicted normal/UV maps.

    Args:
        observation: the maps of one image (host or device arrays).
        model: a FLAME model with a UV layout (host arrays; moved to ``device``).
        config: solver and energy settings (default: fast solver, paper weights).
        device: ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy).

    Returns:
        :class:`FitResult` on the host.

    Raises:
        InputError: maps of the wrong shape/dtype, NaN/inf inside the mask.
        FittingError: mask too small, model without UVs, too few UV correspondences,
            or a non-finite energy during the solve.
    """
    config = config or FitConfig()
    t_start = time.perf_counter()
    ctx, state, timings = prepare(observation, model, config, device)
    H, W = ctx.size

    # ---------------------------------------------------------------- solve
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if config.solver == "paper":
        cam_w = replace(config.weights, normal=0.0)
        state = _adam(ctx, state, config.paper_camera_steps, _ADAM_GROUPS_CAMERA, cam_w, "camera")
        state = _adam(ctx, state, config.paper_steps, FitState.NAMES, config.weights, "fit")
        iterations = config.paper_camera_steps + config.paper_steps
        converged, stop_reason = True, "schedule"
    else:
        from .gauss_newton import levenberg_marquardt

        state, lm_passes, lm_code = levenberg_marquardt(ctx, state)
        extra["lm_passes"], extra["lm_code"] = lm_passes, lm_code
    timings["solve"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- result
    # everything the result needs, read back in one transfer (the first read of the fit
    # on CuPy): the deferred input checks, the energies, the state and the vertices
    frame = ctx.render(state)
    final = ctx.energy(state, frame, with_grad=False)
    verts_d = flame_forward(ctx.model, state.params())[0]
    host = _download(
        ctx.xp,
        checks=ctx.checks.counts(),
        final=_terms_vector(ctx.xp, final),
        history=ctx.history_array(),
        shape=state.shape,
        expr=state.expr,
        pose=state.pose,
        t=state.t,
        log_f=state.log_f,
        pp=state.pp,
        verts=verts_d,
        n_targets=ctx.uv.n_targets,
        **extra,
    )
    ctx.checks.raise_failed(host["checks"])
    if config.solver == "fast":
        from .gauss_newton import STOP_REASONS

        iterations = int(host["lm_passes"])
        stop_reason = STOP_REASONS[int(host["lm_code"])]
        if stop_reason == "non_finite":
            first = next((h for h in ctx.history_dicts(host["history"]) if not math.isfinite(h["total"])), {})
            raise FittingError(
                f"fit: non-finite energy at LM iteration {first.get('iteration', '?')} ({first}); "
                "check the observation maps"
            )
        converged = stop_reason != "max_iterations"
    energies = _terms_dict(host["final"])
    history = ctx.history_dicts(host["history"])
    if not math.isfinite(energies["total"]):
        bad = next((h for h in history if not math.isfinite(h["total"])), None)
        where = f" first in the {bad['stage']} stage at step {bad['iteration']}" if bad else ""
        raise FittingError(f"fit: the energy became non-finite{where} ({energies}); check the observation maps")
    if config.solver == "paper":
        hist = [h["total"] for h in history if h["stage"] == "fit"]
        converged = bool(hist) and hist[-1] <= hist[0]
        stop_reason = "schedule" if converged else "energy_increased"
    params_h = FlameParams(
        shape=host["shape"].astype(np.float32),
        expr=host["expr"].astype(np.float32),
        pose=host["pose"].astype(np.float32),
        transl=np.zeros(3, np.float32),
    )
    camera_h = Camera(
        focal=np.float32(np.exp(host["log_f"])),
        principal=host["pp"].astype(np.float32),
        R=FLAME_TO_OPENCV.astype(np.float32),
        t=host["t"].astype(np.float32),
        width=W,
        height=H,
    )
    neutral = model.neutral_vertices(params_h.astype(np, model.dtype)).astype(np.float32)
    timings["total"] = time.perf_counter() - t_start
    return FitResult(
        params=params_h,
        camera=camera_h,
        vertices=host["verts"].astype(np.float32),
        neutral_vertices=neutral,
        energies=energies,
        history=history,
        iterations=iterations,
        converged=converged,
        stop_reason=stop_reason,
        n_targets=int(host["n_targets"]),
        timings=timings,
    )


_MODEL_CACHE: "weakref.WeakKeyDictionary[FlameModel, FlameModel]" = weakref.WeakKeyDictionary()


def _model_on(model: FlameModel, device: str) -> FlameModel:
    """The model on ``device``, memoised per model so repeated GPU fits don't copy it again."""
    if device == "cpu":
        return model
    if model not in _MODEL_CACHE:
        _MODEL_CACHE[model] = model.to(device)
    return _MODEL_CACHE[model]
