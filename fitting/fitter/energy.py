"""The fitting energy E = lambda_uv L_uv + lambda_n L_n + R, its residuals and its analytic gradient.

Variables: :class:`~p3dmm.fitting.fitter.state.FitState` (FLAME shape, expression and
pose, the camera's translation, log focal length and principal point); the camera of a
state is :meth:`FitState.camera` and every projection goes through
:class:`~p3dmm.fitting.base.camera.Camera`.

Terms (normalised so that the paper's weights are meaningful at any image size):

* ``L_uv = (1 / N_t) * sum_v rho_v`` over the N_t targets (fixed per image), with
  ``rho_v = |r_v|`` for an *active* target (visible in the frame, in front of the
  camera, ``|r_v| * S < cap``) and ``rho_v = cap / S`` otherwise; ``r_v = (pi(v) -
  p*_v) / S`` is the 2D distance, in units of the image size S, between the projection
  of a target vertex and the pixel whose predicted UV is nearest to the vertex's
  template UV.
* ``L_n = (1 / N_p) * sum_p e_p`` over the N_p pixels of the observation mask, with
  ``e_p = sum_c |N_pc - n_pc|`` for a pixel the render covers and that passes the
  outlier cut (mean abs difference < ``normal_outlier``), and ``e_p = 3 *
  normal_outlier`` otherwise. Rendered normals are interpolated vertex normals
  (barycentrics and face ids from the rasterizer are constants of a step), in camera
  space (``R0 n``) or head space (``R_global^T n``).

Both data terms are truncated: a target or pixel that is not explained pays the cap,
the most it could cost. So the energy cannot be lowered by losing correspondences
(turning the head away, moving it out of the image, shrinking its silhouette): every
term counts all N_t targets and N_p pixels whether they are active or not. The cap
terms are constant, so the gradient (and with it the paper solver's Adam steps) is that
of the active terms alone, as in the paper; they matter where energies are compared
(the fast solver's accept/reject and stopping rule, the reported energy).
* ``R = l_id |shape - shape_prior|^2 + l_ex |expr|^2 + l_jaw |jaw|^2 + l_neck |neck|^2
  + l_eyes |eyes|^2 + l_pp |(c - c0) / S|^2 + l_focal (log f - log f0)^2``.

The residual definitions (:func:`uv_residuals`, :func:`normal_residuals`) and the
regulariser's curvature (:func:`regularizer_hessian_diagonal`) are shared with the fast
solver, which builds its Gauss-Newton system from the same quantities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import cuda
from ..base.camera import FLAME_TO_OPENCV
from ..base.geometry import (
    normalize_vjp,
    scatter_add_rows,
    vertex_normal_sums,
    vertex_normals_vjp,
)
from ..base.rotation import rodrigues, rodrigues_vjp
from ..base.xp import constant, get_array_module
from ..model.flame_model import FlameModel
from ..model.lbs import flame_forward, flame_vjp
from ..model.params import POSE_SHAPE
from .state import FitState, Frame, NormalTargets, UVTargets

__all__ = [
    "EnergyTerms",
    "EnergyWeights",
    "NormalResiduals",
    "UVResiduals",
    "evaluate_energy",
    "normal_residuals",
    "output_rotation",
    "pose_prior_weights",
    "regularizer_hessian_diagonal",
    "rendered_normals",
    "uv_residuals",
]


@dataclass(frozen=True)
class EnergyWeights:
    """Weights of the energy terms (paper defaults for the first four).

    ``uv_cap_px`` is in pixels of a 512 px crop (scaled with the map size);
    ``normal_outlier`` is a mean absolute difference of unit normals.
    """

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

    @property
    def uv_cap(self) -> float:
        """The UV residual cap in image-size units: ``uv_cap_px`` pixels of a 512 px crop
        (the official tracker's 20 px), so the same fraction of the face at any map size."""
        return self.uv_cap_px / 512.0

    @property
    def normal_cap(self) -> float:
        """What a normal pixel outside the outlier cut costs: ``3 * normal_outlier`` (the L1
        norm of a residual at the cut)."""
        return 3.0 * self.normal_outlier


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
    uv_residuals: "UVResiduals | None" = None  # the UV term's residuals, for callers that need them too

    #: The order of :meth:`to_vector`.
    FIELDS = ("uv", "normal", "regularizer", "n_uv_active", "n_normal_active")

    @property
    def total(self) -> Any:
        return self.uv + self.normal + self.regularizer

    def to_vector(self) -> Any:
        """``(5,)`` float64 device vector of :data:`FIELDS` (kept per step, read at the end)."""
        xp = get_array_module(self.uv, self.normal, self.regularizer)
        return xp.stack([xp.asarray(getattr(self, k)) for k in self.FIELDS], dtype=xp.float64)  # one cast, one launch

    @staticmethod
    def dict_from_vector(v: np.ndarray) -> dict[str, float]:
        """Host dict in :meth:`to_dict`'s layout from a host copy of :meth:`to_vector`."""
        uv, normal, reg, n_uv, n_n = (float(x) for x in v)
        return {
            "total": uv + normal + reg,
            "uv": uv,
            "normal": normal,
            "regularizer": reg,
            "n_uv_active": int(n_uv),
            "n_normal_active": int(n_n),
        }

    def to_dict(self) -> dict[str, float]:
        """Host values: total, uv, normal, regularizer, n_uv_active, n_normal_active."""
        return self.dict_from_vector(np.array([float(getattr(self, k)) for k in self.FIELDS]))


# ------------------------------------------------------------------------ residuals
@dataclass
class UVResiduals:
    """UV-term residuals of the targets at a state (one row per target).

    Attributes:
        points_cam: ``(N, 3)`` camera-frame target vertices.
        r: ``(N, 2)`` ``(projection - target pixel) / S``.
        rho: ``(N,)`` ``|r|``.
        active: ``(N,) bool`` rows that count: valid, visible in the frame, in front of
            the camera and within :attr:`EnergyWeights.uv_cap` of the target.
    """

    points_cam: Any
    r: Any
    rho: Any
    active: Any


def uv_residuals(
    state: FitState, verts: Any, uv: UVTargets, frame: Frame, weights: EnergyWeights, image_size: tuple[int, int]
) -> UVResiduals:
    """The UV term's residuals (:class:`UVResiduals`) of ``verts`` (posed at ``state``)."""
    H, W = image_size
    S = float(max(H, W))
    camera = state.camera(W, H)
    Xc = camera.to_camera(verts[uv.vertex_ids])
    r = (camera.project_camera(Xc) - uv.pixels) / S
    rho = get_array_module(r).sqrt((r * r).sum(-1))
    active = frame.visible & (rho < weights.uv_cap) & (Xc[:, 2] > 0)
    if uv.valid is not None:
        active = active & uv.valid
    return UVResiduals(points_cam=Xc, r=r, rho=rho, active=active)


def output_rotation(state: FitState, space: str) -> Any:
    """``(3, 3)`` rotation from world normals to the observation's normal space.

    ``R0`` (:data:`FLAME_TO_OPENCV`) for camera space, ``R_global^T`` for head space.
    """
    xp = get_array_module(state.pose)
    if space == "head":
        return rodrigues(state.pose[:1])[0].T
    return constant(xp, FLAME_TO_OPENCV, state.pose.dtype)


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


@dataclass
class NormalResiduals:
    """Normal-term residuals at pixels ``pix`` of the render.

    Attributes:
        d: ``(P, 3)`` observed minus rendered normal.
        keep: ``(P,) bool`` covered by the render, inside the observation mask and within
            the outlier cut.
        u: ``(P, 3)`` unnormalised interpolated world normals.
        vertex_sums: ``(V, 3)`` unnormalised vertex normals.
        corners: ``(P, 3)`` vertex ids of each pixel's face.
    """

    d: Any
    keep: Any
    u: Any
    vertex_sums: Any
    corners: Any


def normal_residuals(
    verts: Any, faces: Any, frame: Frame, normals: NormalTargets, pix: Any, R_out: Any, weights: EnergyWeights
) -> NormalResiduals:
    """The normal term's residuals (:class:`NormalResiduals`) at flat render pixels ``pix``.

    On CuPy one fused kernel (``irls.cu``: ``nrm_pixels``) computes all but the vertex
    normal sums; the NumPy code is its twin.
    """
    xp = get_array_module(verts)
    fused = _normal_pixels_fused(verts, faces, frame, normals, pix, R_out, weights, grad=False)
    if fused is not None:
        return fused.nr
    cover = ((frame.face_id >= 0) & normals.mask).reshape(-1)[pix]
    n_out, u, vsums, corners = rendered_normals(verts, faces, frame.face_id, frame.bary, pix, R_out)
    d = normals.normals.reshape(-1, 3)[pix] - n_out
    keep = cover & (xp.abs(d).mean(-1) < weights.normal_outlier)
    return NormalResiduals(d=d, keep=keep, u=u, vertex_sums=vsums, corners=corners)


@dataclass
class _NormalPixels:
    """What the fused normal-pixel kernel gives besides :class:`NormalResiduals` (per pixel)."""

    nr: NormalResiduals
    explained: Any  # (P,) sum_c |d_pc| where kept, else 0
    n_world: Any = None  # (P, 3) unit interpolated world normals (grad only)
    g_nout: Any = None  # (P, 3) dE/dn_out (grad only)
    contrib: Any = None  # (P, 3, 3) dE/d(vertex normal) of each pixel's corners (grad only)


def _normal_pixels_fused(
    verts: Any,
    faces: Any,
    frame: Frame,
    normals: NormalTargets,
    pix: Any,
    R_out: Any,
    weights: EnergyWeights,
    grad: bool,
) -> _NormalPixels | None:
    """:func:`normal_residuals` (and with ``grad`` the per-pixel chain of the normal term's
    gradient in :func:`evaluate_energy`) as one ``irls.cu`` launch, or None where the
    NumPy/CuPy code runs instead: on NumPy, with ``P3DMM_FUSED_KERNELS=0``, and for mixed
    float types (whose promotions the kernel, which computes in one type, would not follow).
    """
    xp = get_array_module(verts)
    dt = verts.dtype
    if not cuda.fused_kernels(xp) or dt not in (np.float32, np.float64):
        return None
    if any(a.dtype != dt for a in (frame.bary, normals.normals, R_out)):
        return None
    P = int(pix.shape[0])
    if P >= 2**31:
        return None
    n_pixels = cuda.kernel_scalar(xp, normals.n_pixels, dt) if grad else None
    if grad and n_pixels is None:
        return None
    m = vertex_normal_sums(verts, faces)
    d = xp.empty((P, 3), dtype=dt)
    keep = xp.empty(P, dtype=bool)
    u = xp.empty((P, 3), dtype=dt)
    corners = xp.empty((P, 3), dtype=xp.int64)
    explained = xp.empty(P, dtype=dt)
    args = (
        cuda.kernel_array(xp, m, dt),
        cuda.kernel_array(xp, faces, xp.int64),
        cuda.kernel_array(xp, frame.face_id.reshape(-1), xp.int32),
        cuda.kernel_array(xp, frame.bary.reshape(-1, 3), dt),
        cuda.kernel_array(xp, pix, xp.int64),
        cuda.kernel_array(xp, normals.normals.reshape(-1, 3), dt),
        cuda.kernel_array(xp, normals.mask.reshape(-1), xp.bool_).view(xp.uint8),
        cuda.kernel_array(xp, R_out, dt),
        np.float64(weights.normal_outlier),
        np.int32(P),
    )
    suffix = "f32" if dt == np.float32 else "f64"
    nr = NormalResiduals(d=d, keep=keep, u=u, vertex_sums=m, corners=corners)
    if not grad:
        outs = (d, keep.view(xp.uint8), u, corners, explained)
        cuda.launch("p3dmm.fitting.fitter", "irls", f"nrm_pixels_{suffix}", P, (*args, *outs))
        return _NormalPixels(nr=nr, explained=explained)
    n_world = xp.empty((P, 3), dtype=dt)
    g_nout = xp.empty((P, 3), dtype=dt)
    contrib = xp.empty((P, 3, 3), dtype=dt)
    grad_args = (np.float64(weights.normal), n_pixels)
    grad_outs = (d, keep.view(xp.uint8), u, corners, explained, n_world, g_nout, contrib)
    cuda.launch("p3dmm.fitting.fitter", "irls", f"nrm_pixels_grad_{suffix}", P, (*args, *grad_args, *grad_outs))
    return _NormalPixels(nr=nr, explained=explained, n_world=n_world, g_nout=g_nout, contrib=contrib)


# ---------------------------------------------------------------------- regulariser
def pose_prior_weights(weights: EnergyWeights) -> list[float]:
    """Per-joint weight of the pose prior (global rotation unregularised)."""
    return [0.0, weights.neck, weights.jaw, weights.eyes, weights.eyes]


def regularizer_hessian_diagonal(weights: EnergyWeights, n_shape: int, n_expr: int, S: float) -> np.ndarray:
    """``(n,)`` host diagonal of the regulariser's Hessian over :meth:`FitState.to_vector`.

    The regulariser is quadratic, so this is exact: ``2 * weight`` per variable (the
    translation is not regularised; the principal point term is scaled by ``1 / S^2``).
    """
    pose = np.repeat(pose_prior_weights(weights), POSE_SHAPE[1])
    return 2.0 * np.concatenate(
        [
            np.full(n_shape, weights.identity),
            np.full(n_expr, weights.expression),
            pose,
            np.zeros(3),
            [weights.focal],
            np.full(2, weights.principal / S**2),
        ]
    )


# --------------------------------------------------------------------------- energy
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
        forward: optional ``(vertices, cache)`` of :func:`flame_forward` at ``state``
            (the cache may be None when ``with_grad`` is False).
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
    g_pose_extra = xp.zeros(POSE_SHAPE, dtype=dt)

    # ---------------------------------------------------------------- UV term
    res = uv_residuals(state, verts, uv, frame, weights, image_size)
    n_uv = res.active.sum()
    # inactive targets pay the cap (see the module docstring)
    e_uv = weights.uv * ((res.rho * res.active).sum() + weights.uv_cap * (uv.n_targets - n_uv.astype(dt))) / uv.normaliser
    if with_grad:
        coef = (weights.uv / uv.normaliser) * res.active / xp.maximum(res.rho, 1e-12)
        g_proj = (coef[:, None] * res.r) / S  # dE/dproj
        camera = state.camera(W, H)
        # g_Xc[n, j] = sum_k g_proj[n, k] * dproj[n, k] / dXc[n, j]
        g_Xc = (g_proj[:, :, None] * camera.project_camera_jacobian(res.points_cam)).sum(1)
        g_t = g_t + g_Xc.sum(0)
        g_logf = g_logf + (g_proj * (camera.project_camera(res.points_cam) - state.pp)).sum()
        g_pp = g_pp + g_proj.sum(0)
        g_verts = g_verts + scatter_add_rows(uv.vertex_ids, g_Xc @ R0, verts.shape[0])

    # ------------------------------------------------------------ normal term
    e_n, n_n = xp.zeros((), dtype=dt), xp.zeros((), dtype=xp.int64)
    if normals is not None and weights.normal > 0:
        if dense_pixels is None:
            dense_pixels = xp is not np
        if dense_pixels:
            pix = normals.grid if normals.grid is not None else xp.arange(normals.mask.size)
        else:
            pix = xp.nonzero(((frame.face_id >= 0) & normals.mask).reshape(-1))[0]
        R_out = output_rotation(state, normals.space)
        # on CuPy one kernel gives the residuals and the per-pixel gradient chain below
        fused = _normal_pixels_fused(verts, model.faces, frame, normals, pix, R_out, weights, grad=with_grad)
        if fused is not None:
            nr = fused.nr
        else:
            nr = normal_residuals(verts, model.faces, frame, normals, pix, R_out, weights)
        n_n = nr.keep.sum()
        # mask pixels that are not covered or fail the outlier cut pay the cap
        explained = fused.explained.sum() if fused is not None else (xp.abs(nr.d).sum(-1) * nr.keep).sum()
        e_n = weights.normal * (explained + weights.normal_cap * (normals.n_mask - n_n.astype(dt))) / normals.n_pixels
        if with_grad:
            if fused is not None:
                g_nout, n_world, contrib = fused.g_nout, fused.n_world, fused.contrib.reshape(-1, 3)
            else:
                g_nout = -(weights.normal / normals.n_pixels) * xp.sign(nr.d) * nr.keep[:, None]
                u = nr.u
                n_world = u / xp.maximum(xp.sqrt((u * u).sum(-1, keepdims=True)), 1e-12)
                g_n = g_nout @ R_out  # dE/dn_world
                g_u = normalize_vjp(u, g_n)
                b = frame.bary.reshape(-1, 3)[pix]
                # vn[corners[p, k]] receives b[p, k] * g_u[p]
                contrib = (b[:, :, None] * g_u[:, None, :]).reshape(-1, 3)
            if normals.space == "head":
                # n_out = Rg^T n  ->  dE/dRg[j, i] = sum_p n[p, j] g[p, i]
                g_Rg = n_world.T @ g_nout
                g_pose_extra[0] = rodrigues_vjp(state.pose[:1], g_Rg[None])[0]
            g_vn = scatter_add_rows(nr.corners.reshape(-1), contrib, verts.shape[0])
            g_verts = g_verts + vertex_normals_vjp(verts, model.faces, g_vn, nr.vertex_sums)

    # ------------------------------------------------------------ regulariser
    prior = shape_prior if shape_prior is not None else xp.zeros_like(state.shape)
    ds = state.shape - prior
    c0 = pp_prior if pp_prior is not None else state.pp
    dpp = (state.pp - c0) / S
    dlf = state.log_f - focal_prior
    pose_w = constant(xp, pose_prior_weights(weights), dt)
    reg = (
        weights.identity * (ds * ds).sum()
        + weights.expression * (state.expr * state.expr).sum()
        + (pose_w[:, None] * state.pose**2).sum()
        + weights.principal * (dpp * dpp).sum()
        + weights.focal * (dlf * dlf)
    )
    terms = EnergyTerms(uv=e_uv, normal=e_n, regularizer=reg, n_uv_active=n_uv, n_normal_active=n_n, uv_residuals=res)
    if not with_grad:
        return terms

    pg = flame_vjp(model, cache, g_verts)
    g_pose = pg.pose + g_pose_extra + 2.0 * pose_w[:, None] * state.pose
    terms.grad = FitState(
        shape=pg.shape + 2.0 * weights.identity * ds,
        expr=pg.expr + 2.0 * weights.expression * state.expr,
        pose=g_pose,
        t=g_t,
        log_f=g_logf + 2.0 * weights.focal * dlf,
        pp=g_pp + 2.0 * weights.principal * dpp / S,
    )
    return terms
