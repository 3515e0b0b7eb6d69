"""The fitting energy E = lambda_uv L_uv + lambda_n L_n + R and its analytic gradient.

Variables (see :class:`FitState`): FLAME shape, expression and pose (global, neck,
jaw, eyes), and the camera's translation, log focal length and principal point. The
camera rotation is fixed to :data:`FLAME_TO_OPENCV` (the head's global rotation is a
FLAME pose parameter) and FLAME's own translation stays zero, so
``x_cam = R0 @ v + t`` and ``pixel = f * x_cam[:2] / x_cam[2] + c``.

Terms (normalised so that the paper's weights are meaningful at any image size):

* ``L_uv = (1 / N_t) * sum_v 1[visible_v, |r_v| * S < cap] * |r_v|`` with
  ``r_v = (pi(v) - p*_v) / S``: the 2D distance, in units of the image size S, between
  the projection of a target vertex and the pixel whose predicted UV is nearest to the
  vertex's template UV. N_t is the number of targets (fixed per image).
* ``L_n = (1 / N_p) * sum_p sum_c |N_pc - n_pc|`` over the pixels of the observation
  mask that the render covers and that pass the outlier cut (mean abs difference
  < ``normal_outlier``); N_p is the number of observation-mask pixels. Rendered normals
  are interpolated vertex normals (barycentrics and face ids from the rasterizer are
  constants of a step), in camera space (``R0 n``) or head space (``R_global^T n``).
* ``R = l_id |shape - shape_prior|^2 + l_ex |expr|^2 + l_jaw |jaw|^2 + l_neck |neck|^2
  + l_eyes |eyes|^2 + l_pp |(c - c0) / S|^2 + l_focal (log f - log f0)^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .camera import FLAME_TO_OPENCV, Camera
from .flame_model import FlameModel, FlameParams
from .geometry import normalize_vjp, scatter_add_rows, vertex_normal_sums, vertex_normals_vjp
from .lbs import flame_forward, flame_vjp, rodrigues, rodrigues_vjp
from .xp import constant, get_array_module

__all__ = ["EnergyWeights", "FitState", "UVTargets", "NormalTargets", "EnergyTerms", "Frame", "evaluate_energy"]


@dataclass(frozen=True)
class EnergyWeights:
    """Weights of the energy terms (paper defaults for the first four)."""

    uv: float = 2000.0
    normal: float = 200.0
    identity: float = 0.15
    expression: float = 0.01
    jaw: float = 0.1
    neck: float = 1.0
    eyes: float = 1.0
    principal: float = 10.0
    focal: float = 1.0
    uv_cap_px: float = 20.0
    normal_outlier: float = 0.33


@dataclass
class FitState:
    """Optimisation variables. Arrays live on the fitting device (NumPy or CuPy)."""

    shape: Any
    expr: Any
    pose: Any  # (5, 3)
    t: Any  # (3,) camera translation
    log_f: Any  # () log focal length in pixels
    pp: Any  # (2,) principal point

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
        n_targets: normaliser N_t of L_uv, the number of valid targets (an int, or on
            CuPy a 0-d device array in the pixels' float dtype, so it does not promote).
        valid: ``(N,) bool`` rows with a correspondence (None: all of them).
    """

    vertex_ids: Any
    pixels: Any
    n_targets: Any
    valid: Any = None

    def weight(self) -> Any:
        """``(N,)`` 1.0 for valid rows, 0.0 otherwise (in the pixels' dtype)."""
        xp = get_array_module(self.pixels)
        if self.valid is None:
            return xp.ones(self.pixels.shape[0], dtype=self.pixels.dtype)
        return self.valid.astype(self.pixels.dtype)


@dataclass
class NormalTargets:
    """Observed normals at the render resolution.

    Attributes:
        normals: ``(H, W, 3)`` unit normals in ``space``.
        mask: ``(H, W) bool`` pixels that take part.
        space: ``"camera"`` or ``"head"``.
        scale: render size / observation size (the camera is scaled by it).
        grid: optional ``(P,)`` flat indices of the only pixels ``mask`` can be True at
            (a strided subset); the dense L_n evaluation then visits just those.
        n_pixels: normaliser of L_n, ``max(mask.sum(), 1)`` (an int on NumPy, a 0-d
            device array on CuPy, where reading it would synchronise).
    """

    normals: Any
    mask: Any
    space: str
    scale: float
    grid: Any = None
    n_pixels: Any = field(init=False)

    def __post_init__(self) -> None:
        xp = get_array_module(self.mask)
        if xp is np:
            self.n_pixels = max(int(self.mask.sum()), 1)
        else:  # in the normals' dtype: an int64 0-d array would promote float32 weights to float64
            self.n_pixels = xp.maximum(self.mask.sum(), 1).astype(self.normals.dtype)


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


@dataclass
class EnergyTerms:
    """Energy per term and the gradient w.r.t. the state.

    The values are 0-d arrays of the fitting device (NumPy scalars on the CPU, CuPy 0-d
    arrays on the GPU), so evaluating the energy never waits for the device; ``float()``
    one, or call :meth:`to_dict`, to read it.
    """

    uv: Any
    normal: Any
    regularizer: Any
    n_uv_active: Any
    n_normal_active: Any
    grad: FitState | None = None

    @property
    def total(self) -> Any:
        return self.uv + self.normal + self.regularizer

    def to_dict(self) -> dict[str, float]:
        """Host values: total, uv, normal, regularizer, n_uv_active, n_normal_active."""
        return {
            "total": float(self.total),
            "uv": float(self.uv),
            "normal": float(self.normal),
            "regularizer": float(self.regularizer),
            "n_uv_active": int(self.n_uv_active),
            "n_normal_active": int(self.n_normal_active),
        }


def project(state: FitState, verts: Any) -> tuple[Any, Any]:
    """World vertices -> (camera-frame points ``(N, 3)``, pixels ``(N, 2)``)."""
    xp = get_array_module(verts)
    R0 = constant(xp, FLAME_TO_OPENCV, verts.dtype)
    Xc = verts @ R0.T + state.t
    f = xp.exp(state.log_f)
    return Xc, f * Xc[:, :2] / Xc[:, 2:3] + state.pp


def rendered_normals(
    verts: Any, faces: Any, face_id: Any, bary: Any, pix: Any, R_out: Any
) -> tuple[Any, Any, Any, Any]:
    """Interpolated unit normals at pixels ``pix`` (flat indices) rotated by ``R_out``.

    Empty pixels (face id -1) among ``pix`` give zero normals.

    Returns:
        (n_out ``(P, 3)``, u ``(P, 3)`` unnormalised world normals, vertex normal sums
        ``(V, 3)`` (:func:`vertex_normal_sums`), corner vertex ids ``(P, 3)``).
    """
    xp = get_array_module(verts)
    m = vertex_normal_sums(verts, faces)
    vn = m / xp.maximum(xp.sqrt((m * m).sum(-1, keepdims=True)), 1e-12)
    fid = xp.maximum(face_id.reshape(-1)[pix], 0)
    b = bary.reshape(-1, 3)[pix]
    corners = faces[fid]  # (P, 3)
    # u[p, i] = sum_k b[p, k] * vn[corners[p, k], i]
    u = (b[:, :, None] * vn[corners]).sum(1)
    n = u / xp.maximum(xp.sqrt((u * u).sum(-1, keepdims=True)), 1e-12)
    return n @ R_out.T, u, m, corners


def evaluate_energy(
    model: FlameModel,
    state: FitState,
    uv: UVTargets,
    normals: NormalTargets | None,
    frame: Frame,
    weights: EnergyWeights,
    image_size: tuple[int, int],
    shape_prior: Any = None,
    focal_prior: float = 0.0,
    pp_prior: Any = None,
    with_grad: bool = True,
    forward: tuple[Any, Any] | None = None,
    dense_pixels: bool | None = None,
) -> EnergyTerms:
    """Energy of ``state`` with the fragments/visibility of ``frame`` held fixed.

    Args:
        model: FLAME model on the fitting device.
        state: current variables.
        uv: UV targets of the image.
        normals: observed normals at render resolution, or None to skip L_n.
        frame: fragments and visibility from the latest render.
        weights: term weights.
        image_size: (height, width) of the observation; S = max of the two.
        shape_prior: ``(n_shape,)`` identity prior (MICA-style) or None for zero.
        focal_prior: log focal length the focal regulariser pulls towards.
        pp_prior: ``(2,)`` principal point prior.
        with_grad: compute the gradient too.
        forward: optional ``(vertices, cache)`` of :func:`flame_forward` at ``state``.
        dense_pixels: evaluate L_n on every render pixel (every pixel of
            ``normals.grid`` when given) with a 0/1 weight instead of gathering the
            covered ones (default: on CuPy, where a gather would need the pixel count on
            the host; both give the same values).

    Returns:
        :class:`EnergyTerms` (with ``grad`` when requested); nothing is read back to
        the host.
    """
    xp = get_array_module(state.shape)
    H, W = image_size
    S = float(max(H, W))
    dt = model.v_template.dtype
    verts, cache = forward if forward is not None else flame_forward(model, state.params())
    R0 = constant(xp, FLAME_TO_OPENCV, dt)
    g_verts = xp.zeros_like(verts)
    g_t = xp.zeros(3, dtype=dt)
    g_logf = xp.zeros((), dtype=dt)
    g_pp = xp.zeros(2, dtype=dt)
    g_pose_extra = xp.zeros((5, 3), dtype=dt)

    # ---------------------------------------------------------------- UV term
    Xc, proj = project(state, verts[uv.vertex_ids])
    r = (proj - uv.pixels) / S
    rho = xp.sqrt((r * r).sum(-1))
    active = frame.visible & (rho * S < weights.uv_cap_px) & (Xc[:, 2] > 0)
    if uv.valid is not None:
        active = active & uv.valid
    e_uv = weights.uv * (rho * active).sum() / uv.n_targets
    n_uv = active.sum()
    if with_grad:
        coef = (weights.uv / uv.n_targets) * active / xp.maximum(rho, 1e-12)
        g_proj = (coef[:, None] * r) / S  # dE/dproj
        f = xp.exp(state.log_f)
        Z = Xc[:, 2]
        g_Xc = xp.stack(
            [
                g_proj[:, 0] * f / Z,
                g_proj[:, 1] * f / Z,
                -(g_proj[:, 0] * Xc[:, 0] + g_proj[:, 1] * Xc[:, 1]) * f / (Z * Z),
            ],
            -1,
        )
        g_t = g_t + g_Xc.sum(0)
        g_logf = g_logf + (g_proj * (f * Xc[:, :2] / Z[:, None])).sum()
        g_pp = g_pp + g_proj.sum(0)
        g_verts = g_verts + scatter_add_rows(uv.vertex_ids, g_Xc @ R0, verts.shape[0])

    # ------------------------------------------------------------ normal term
    e_n, n_n = xp.zeros((), dtype=dt), xp.zeros((), dtype=xp.int64)
    if normals is not None and weights.normal > 0:
        cover = ((frame.face_id >= 0) & normals.mask).reshape(-1)
        if dense_pixels is None:
            dense_pixels = xp is not np
        if dense_pixels:
            pix = normals.grid if normals.grid is not None else xp.arange(cover.shape[0])
        else:
            pix = xp.nonzero(cover)[0]
        if normals.space == "head":
            Rg = rodrigues(state.pose[:1])[0]
            R_out = Rg.T
        else:
            R_out = R0
        n_out, u, vsums, corners = rendered_normals(verts, model.faces, frame.face_id, frame.bary, pix, R_out)
        d = normals.normals.reshape(-1, 3)[pix] - n_out
        keep = cover[pix] & (xp.abs(d).mean(-1) < weights.normal_outlier)
        n_n = keep.sum()
        e_n = weights.normal * (xp.abs(d).sum(-1) * keep).sum() / normals.n_pixels
        if with_grad:
            g_nout = -(weights.normal / normals.n_pixels) * xp.sign(d) * keep[:, None]
            n_world = u / xp.maximum(xp.sqrt((u * u).sum(-1, keepdims=True)), 1e-12)
            if normals.space == "head":
                # n_out = Rg^T n  ->  dE/dRg[j, i] = sum_p n[p, j] g[p, i]
                g_Rg = n_world.T @ g_nout
                g_pose_extra[0] = rodrigues_vjp(state.pose[:1], g_Rg[None])[0]
            g_n = g_nout @ R_out  # dE/dn_world
            g_u = normalize_vjp(u, g_n)
            b = frame.bary.reshape(-1, 3)[pix]
            # vn[corners[p, k]] receives b[p, k] * g_u[p]
            contrib = (b[:, :, None] * g_u[:, None, :]).reshape(-1, 3)
            g_vn = scatter_add_rows(corners.reshape(-1), contrib, verts.shape[0])
            g_verts = g_verts + vertex_normals_vjp(verts, model.faces, g_vn, vsums)

    # ------------------------------------------------------------ regulariser
    prior = shape_prior if shape_prior is not None else xp.zeros_like(state.shape)
    ds = state.shape - prior
    c0 = pp_prior if pp_prior is not None else state.pp
    dpp = (state.pp - c0) / S
    dlf = state.log_f - focal_prior
    reg = (
        weights.identity * (ds * ds).sum()
        + weights.expression * (state.expr * state.expr).sum()
        + weights.neck * (state.pose[1] ** 2).sum()
        + weights.jaw * (state.pose[2] ** 2).sum()
        + weights.eyes * (state.pose[3:] ** 2).sum()
        + weights.principal * (dpp * dpp).sum()
        + weights.focal * (dlf * dlf)
    )
    terms = EnergyTerms(uv=e_uv, normal=e_n, regularizer=reg, n_uv_active=n_uv, n_normal_active=n_n)
    if not with_grad:
        return terms

    pg = flame_vjp(model, cache, g_verts)
    g_pose = pg.pose + g_pose_extra
    pose_w = constant(xp, [0.0, weights.neck, weights.jaw, weights.eyes, weights.eyes], dt)
    g_pose = g_pose + 2.0 * pose_w[:, None] * state.pose
    terms.grad = FitState(
        shape=pg.shape + 2.0 * weights.identity * ds,
        expr=pg.expr + 2.0 * weights.expression * state.expr,
        pose=g_pose,
        t=g_t,
        log_f=g_logf + 2.0 * weights.focal * dlf,
        pp=g_pp + 2.0 * weights.principal * dpp / S,
    )
    return terms
