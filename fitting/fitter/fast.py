"""The ``"fast"`` solver: Levenberg-Marquardt with IRLS weights and analytic Jacobians.

Both data terms are robust (the UV term sums 2D distances, not squares; the normal
term is an L1 norm). Each iteration replaces them by their IRLS quadratic majorisers
at the current state, ``|r| ~ r^2 / (2 max(|r|, eps))``, whose gradient equals the
energy's gradient and whose Hessian is ``J^T W J`` with ``W = weight / max(|r|, eps)``.
The gradient comes from :func:`p3dmm.fitting.fitter.energy.evaluate_energy` (checked
against finite differences), and so do the residuals (:func:`~.energy.uv_residuals`,
:func:`~.energy.normal_residuals`) and the regulariser's curvature; this module only adds
the Jacobians:

* UV rows ``d pi(v) / d x`` for the active targets, from the exact FLAME vertex
  Jacobian (:func:`p3dmm.fitting.model.lbs.flame_jacobian`) and the projection's
  (:meth:`Camera.project_camera_jacobian`);
* normal rows ``d n_p / d x`` through face normals -> area-weighted vertex normals ->
  barycentric interpolation -> normalisation (-> head-space rotation), using sparse
  incidence matrices (scipy on the CPU, cupyx on the GPU).

A step is accepted when the energy (fragments held fixed) decreases; otherwise the
damping grows. The fragments and visibility are re-rendered after every accepted step.

On the GPU nothing is read back: the system is built with fixed shapes (every UV target
and every pixel of the strided normal grid, with zero weights where inactive, and the
Jacobian of all vertex normals through a constant sparse incidence matrix), and the
accept/reject decision, damping, best state and stopping rule are device arrays updated
with ``where``. The host learns that the solver stopped through a
:class:`~p3dmm.fitting.base.xp.LaggedFlag` (a non-blocking copy), so it may queue a few more
iterations, which change nothing once the stop flag is set. On the CPU the same loop runs
with the compact system (only active rows) and stops at once.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..base import cuda
from ..base.camera import FLAME_TO_OPENCV
from ..base.rotation import rodrigues_jvp, skew
from ..base.graph import StepGraph
from ..base.xp import LaggedFlag, constant, get_array_module
from ..model.lbs import flame_forward, flame_jacobian
from ..model.params import N_JOINTS
from .energy import (
    EnergyTerms,
    EnergyWeights,
    normal_residuals,
    output_rotation,
    regularizer_hessian_diagonal,
    uv_residuals,
)
from .problem import FitProblem
from .state import FitState, Frame, NormalTargets

__all__ = [
    "STOP_REASONS",
    "free_variables",
    "init_with_uv",
    "init_with_uv_batch",
    "levenberg_marquardt",
    "VertexJacobian",
    "normal_equations",
    "normal_jacobian",
    "normal_jacobian_dense",
    "solve_fast",
    "solve_fast_batch",
    "strided_normals",
]

log = logging.getLogger(__name__)

_EPS_UV = 1e-3  # IRLS floor of the UV residual norm (image-size units; 0.5 px at 512)
_EPS_N = 2e-2  # IRLS floor of a normal residual component


def _sparse(xp: Any) -> Any:
    if xp is np:
        import scipy.sparse as sp
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.sparse as sp
    return sp


def strided_normals(normals: NormalTargets, stride: int) -> NormalTargets:
    """Normal targets restricted to every ``stride``-th row and column (the fast solver's L_n)."""
    k = max(int(stride), 1)
    if k == 1:
        return normals
    xp = get_array_module(normals.mask)
    m = xp.zeros_like(normals.mask)
    m[::k, ::k] = normals.mask[::k, ::k]
    Hr, Wr = m.shape
    grid = (xp.arange(0, Hr, k)[:, None] * Wr + xp.arange(0, Wr, k)[None, :]).reshape(-1)
    return NormalTargets(normals=normals.normals, mask=m, space=normals.space, grid=grid)


class VertexJacobian:
    """FLAME vertex Jacobian rows, computed once per iteration.

    With ``everything`` (the fixed-shape GPU path) the rows of all vertices are computed
    on first use; otherwise only those asked for (grown on demand).
    """

    def __init__(self, model: Any, cache: Any, everything: bool = False) -> None:
        self.model, self.cache, self.everything = model, cache, everything
        self.xp = get_array_module(model.v_template)
        self.J: Any = None
        self.loc: Any = None

    def ensure(self, vids: Any) -> None:
        if self.everything:
            return
        xp = self.xp
        vids = xp.unique(vids)
        self.J = flame_jacobian(self.model, self.cache, vids)  # (M, 3, nf)
        self.loc = xp.full(self.model.n_vertices, -1, dtype=xp.int64)
        self.loc[vids] = xp.arange(vids.shape[0])

    def rows(self, ids: Any) -> Any:
        """``(len(ids), 3, nf)`` rows of vertices ``ids`` (all vertices for None; everything mode)."""
        if self.everything:
            if self.J is None:
                self.J = flame_jacobian(self.model, self.cache)  # (V, 3, nf)
            return self.J if ids is None else self.J[ids]
        if self.loc is None or bool((self.loc[ids] < 0).any()):
            self.ensure(ids if self.loc is None else self.xp.concatenate([ids, self.xp.nonzero(self.loc >= 0)[0]]))
        return self.J[self.loc[ids]]


def normal_equations(
    problem: FitProblem,
    state: FitState,
    frame: Frame,
    normals: NormalTargets,
    energy: EnergyTerms,
    forward: tuple[Any, Any] | None = None,
    eps_scale: Any = 1.0,
    dense: bool | None = None,
    weights: EnergyWeights | None = None,
) -> tuple[Any, Any]:
    """IRLS Gauss-Newton system ``(H, g)`` at ``state`` (g is the exact energy gradient).

    Args:
        energy: the energy at ``state`` with ``weights``, with its gradient.
        forward: optional ``(vertices, cache)`` of :func:`flame_forward` at ``state``.
        eps_scale: multiplies the IRLS residual floors (> 1 gives flatter, more
            quadratic models and longer steps); a number or a 0-d device array.
        dense: build the system with fixed shapes (all UV targets, all pixels of
            ``normals.grid``, all vertex normals) and zero weights for inactive rows,
            instead of gathering the active rows. Default: on CuPy, where a gather would
            need its size on the host. Both give the same system.
        weights: the energy's weights (default: the problem's).

    Returns:
        ``H (n, n)`` and ``g (n,)`` over :meth:`FitState.to_vector`'s layout.
    """
    xp = problem.xp
    model = problem.model
    w = weights or problem.config.weights
    dt = model.v_template.dtype
    H_img, W_img = problem.size
    S = float(max(H_img, W_img))
    n_s, n_e = model.n_shape, model.n_expr
    nf = n_s + n_e + 3 * N_JOINTS  # FLAME columns of the state vector
    n = nf + 6  # + t (3), log_f, pp (2)
    if dense is None:
        dense = xp is not np
    verts, cache = forward if forward is not None else flame_forward(model, state.params())
    R0 = constant(xp, FLAME_TO_OPENCV, dt)
    H = xp.zeros((n, n), dtype=xp.float64)
    jac = VertexJacobian(model, cache, everything=dense)

    uv = problem.uv
    res = uv_residuals(state, verts, uv, frame, w, problem.size)
    active = res.active
    idx = xp.arange(active.shape[0]) if dense else xp.nonzero(active)[0]
    ids = uv.vertex_ids[idx]

    # ------------------------------------------------------------ normal rows
    if w.normal > 0:
        R_out = output_rotation(state, normals.space)
        if dense:
            pix = normals.grid if normals.grid is not None else xp.arange(normals.mask.size)
            nr = normal_residuals(verts, model.faces, frame, normals, pix, R_out, w)
            Jn = normal_jacobian_dense(
                problem, verts, jac, frame, pix, nr.corners, nr.u, nr.vertex_sums, R_out, state, normals.space
            )
            _add_normal_rows(H, Jn, nr.d, nr.keep[:, None], w.normal, normals.n_pixels, eps_scale, nf)
        else:
            pix = xp.nonzero(((frame.face_id >= 0) & normals.mask).reshape(-1))[0]
            if pix.size:
                nr = normal_residuals(verts, model.faces, frame, normals, pix, R_out, w)
                kp = xp.nonzero(nr.keep)[0]
                if kp.size:
                    Jn = normal_jacobian(
                        problem, verts, jac, frame, pix[kp], nr.corners[kp], nr.u[kp], R_out, state, normals.space, ids
                    )
                    _add_normal_rows(H, Jn, nr.d[kp], 1.0, w.normal, normals.n_pixels, eps_scale, nf)

    # ---------------------------------------------------------------- UV rows
    if dense or idx.size:
        Xa = res.points_cam[idx]
        camera = state.camera(W_img, H_img)
        dp = camera.project_camera_jacobian(Xa) / S  # dp[v, k, :] = d proj_k / d Xc / S
        Jv = jac.rows(ids)  # (A, 3, nf)
        J_flame = dp @ (R0 @ Jv)  # (A, 2, nf)
        J_t = dp  # (A, 2, 3)
        J_f = ((camera.project_camera(Xa) - state.pp) / S)[:, :, None]  # (A, 2, 1): d proj / d log f
        J_pp = xp.broadcast_to(xp.eye(2, dtype=dt) / S, (idx.shape[0], 2, 2))
        J = xp.concatenate([J_flame, J_t, J_f, J_pp], 2).reshape(-1, n)
        Jw = _uv_rows_fused(J, res.rho, active, w.uv, uv.n_targets, eps_scale) if dense else None
        if Jw is None:
            wt = (w.uv / uv.normaliser) / xp.maximum(res.rho[idx], _EPS_UV * eps_scale)
            if dense:
                wt = wt * active  # inactive rows (and Z <= 0, where J is not finite) weigh nothing
                J = xp.where(xp.repeat(active, 2)[:, None], J, 0.0)
            Jw = J * xp.repeat(xp.sqrt(wt), 2)[:, None]
        H += (Jw.T @ Jw).astype(xp.float64)

    # ------------------------------------------------------------ regulariser
    H += xp.diag(constant(xp, regularizer_hessian_diagonal(w, n_s, n_e, S), xp.float64))
    if energy.grad is None:
        raise ValueError("normal_equations: energy must be evaluated with_grad=True")
    return H, energy.grad.to_vector().astype(xp.float64)


def _add_normal_rows(
    H: Any, Jn: Any, d: Any, keep: Any, w_normal: float, n_pixels: Any, eps_scale: Any, nf: int
) -> None:
    """``H[:nf, :nf] += Jn^T W Jn`` with IRLS weights ``W = keep * (w_normal / n_pixels) / max(|d|, eps)``.

    Computed as ``(sqrt(W) Jn)^T (sqrt(W) Jn)``: NumPy then uses a symmetric rank-k update.
    On CuPy ``sqrt(W) Jn`` is one fused kernel (``irls.cu``: ``irls_normal_rows``), whose
    twin is the NumPy code here.
    """
    xp = get_array_module(Jn)
    Jw = _normal_rows_fused(Jn, d, keep, w_normal, n_pixels, eps_scale, nf)
    if Jw is None:
        wt = keep * (w_normal / n_pixels) / xp.maximum(xp.abs(d), _EPS_N * eps_scale)  # (P, 3)
        Jw = Jn.reshape(-1, nf) * xp.sqrt(wt).reshape(-1)[:, None]
    H[:nf, :nf] += (Jw.T @ Jw).astype(xp.float64)


def _normal_rows_fused(Jn: Any, d: Any, keep: Any, w_normal: float, n_pixels: Any, eps_scale: Any, nf: int) -> Any:
    """``sqrt(W) Jn`` of :func:`_add_normal_rows` as ``(3 P, nf)``, one ``irls.cu`` launch; None
    where the NumPy/CuPy code runs instead (NumPy, ``P3DMM_FUSED_KERNELS=0``, mixed float
    types, a ``keep`` that is not a per-pixel bool array)."""
    xp = get_array_module(Jn)
    dt = Jn.dtype
    if not cuda.fused_kernels(xp) or dt not in (np.float32, np.float64) or d.dtype != dt:
        return None
    P = int(d.shape[0])
    rows = 3 * P
    if not isinstance(keep, xp.ndarray) or keep.dtype != xp.bool_ or keep.size != P or rows >= 2**31:
        return None
    J = Jn.reshape(rows, nf)
    return _weighted_rows("irls_normal_rows", J, d, keep.reshape(-1), w_normal, n_pixels, _EPS_N, eps_scale)


def _uv_rows_fused(J: Any, rho: Any, active: Any, w_uv: float, n_targets: Any, eps_scale: Any) -> Any:
    """The dense UV rows of :func:`normal_equations`, ``where(active, J, 0) * sqrt(W)`` with
    ``W = active * (w_uv / max(n_targets, 1)) / max(rho, eps)`` per target (two rows each),
    as one ``irls.cu`` launch (``irls_uv_rows``); None where the NumPy/CuPy code runs instead."""
    xp = get_array_module(J)
    dt = J.dtype
    if not cuda.fused_kernels(xp) or dt not in (np.float32, np.float64) or rho.dtype != dt:
        return None
    rows = int(J.shape[0])
    if rows != 2 * int(rho.shape[0]) or rows >= 2**31:
        return None
    return _weighted_rows("irls_uv_rows", J, rho, active, w_uv, n_targets, _EPS_UV, eps_scale)


def _weighted_rows(kernel: str, J: Any, r: Any, mask: Any, w: float, count: Any, eps: float, eps_scale: Any) -> Any:
    """Launch ``<kernel>_f32/_f64`` of ``irls.cu`` on ``J (rows, ncols)`` with residuals ``r``,
    a bool ``mask``, the weight ``w``, the 0-d normaliser ``count`` and the IRLS floor
    ``eps * eps_scale``; returns the weighted rows, or None where a scalar cannot be passed
    to the kernel as it is (the caller runs the op chain then)."""
    xp = get_array_module(J)
    dt = J.dtype
    count_d, eps_d = cuda.kernel_scalar(xp, count, dt), cuda.kernel_scalar(xp, eps_scale, dt)
    if count_d is None or eps_d is None:
        return None
    rows, ncols = (int(n) for n in J.shape)
    out = xp.empty((rows, ncols), dtype=dt)
    args = (
        cuda.kernel_array(xp, J, dt),
        cuda.kernel_array(xp, r, dt),
        cuda.kernel_array(xp, mask, xp.bool_).view(xp.uint8),
        np.float64(w),
        count_d,
        np.float64(eps),
        eps_d,
        np.int32(rows),
        np.int32(ncols),
        out,
    )
    suffix = "f32" if dt == np.float32 else "f64"
    cuda.launch("p3dmm.fitting.fitter", "irls", f"{kernel}_{suffix}", rows * ncols, args)
    return out


def _face_normal_jacobian(verts: Any, faces: Any, Jc: Any) -> Any:
    """``(F, 3, nf)`` Jacobian of the unnormalised face normals ``e1 x e2``.

    ``Jc`` holds the vertex Jacobian rows of ``faces.reshape(-1)`` (corner-major per face,
    ``(3 F, 3, nf)``).
    """
    xp = get_array_module(verts)
    F, nf = faces.shape[0], Jc.shape[2]
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    e1, e2 = v1 - v0, v2 - v0
    # d(e1 x e2) = -[e2]x (dv1 - dv0) + [e1]x (dv2 - dv0)
    #            = [e2 - e1]x dv0 - [e2]x dv1 + [e1]x dv2: one (3 x 9) @ (9 x nf) per face
    K = xp.concatenate([skew(e2 - e1), -skew(e2), skew(e1)], axis=2)  # (F, 3, 9)
    return K @ Jc.reshape(F, 9, nf)


def _normalize_jacobian(m: Any, dm: Any) -> Any:
    """Jacobian of ``m / |m|`` from ``dm = dm / dx``: ``(I - n n^T) / |m| @ dm`` per row."""
    xp = get_array_module(m)
    mnorm = xp.maximum(xp.sqrt((m * m).sum(-1)), 1e-12)
    n = m / mnorm[:, None]
    return ((xp.eye(3, dtype=dm.dtype) - n[:, :, None] * n[:, None, :]) / mnorm[:, None, None]) @ dm


def normal_jacobian_dense(
    problem: FitProblem,
    verts: Any,
    jac: VertexJacobian,
    frame: Frame,
    pix: Any,
    corners: Any,
    u: Any,
    vsums: Any,
    R_out: Any,
    state: FitState,
    space: str,
) -> Any:
    """Fixed-shape twin of :func:`normal_jacobian`: the Jacobian of every vertex normal
    (all faces, a constant sparse vertex-face incidence product), then one gather per
    barycentric corner. Pixels on no face get finite rows (their weight is zero)."""
    faces = problem.model.faces
    dt = verts.dtype
    F = faces.shape[0]
    Jall = jac.rows(None)  # (V, 3, nf)
    nf = Jall.shape[2]
    dfn = _face_normal_jacobian(verts, faces, Jall[faces].reshape(3 * F, 3, nf))  # (F, 3, nf)
    dm = (_incidence(problem) @ dfn.reshape(F, 3 * nf)).reshape(-1, 3, nf)  # (V, 3, nf)
    dnv = _normalize_jacobian(vsums, dm)  # (V, 3, nf)
    b = frame.bary.reshape(-1, 3)[pix].astype(dt)
    du = b[:, 0, None, None] * dnv[corners[:, 0]]
    du = du + b[:, 1, None, None] * dnv[corners[:, 1]]
    du = du + b[:, 2, None, None] * dnv[corners[:, 2]]
    return _finish_normal_jacobian(problem, du, u, R_out, state, space)


def _finish_normal_jacobian(problem: FitProblem, du: Any, u: Any, R_out: Any, state: FitState, space: str) -> Any:
    """From ``du = d u / d params`` (unnormalised interpolated normal) to ``d(-n_out)``."""
    xp = problem.xp
    model = problem.model
    dt = du.dtype
    nw = u / xp.maximum(xp.sqrt((u * u).sum(-1)), 1e-12)[:, None]
    dn = R_out @ _normalize_jacobian(u, du)  # (P, 3, nf)
    if space == "head":
        # n_out = Rg^T n: extra dependence on the global rotation, pose columns 0..2
        n_s_e = model.n_shape + model.n_expr
        eye = xp.eye(3, dtype=dt).reshape(3, 1, 3)
        dRg = rodrigues_jvp(state.pose[:1], eye)[:, 0]  # (3, 3, 3)
        extra = xp.einsum("aji,pj->pia", dRg, nw)  # d(Rg^T n)/d r_a
        dn[:, :, n_s_e : n_s_e + 3] += extra
    return -dn  # residual d = N - n_out


def normal_jacobian(
    problem: FitProblem,
    verts: Any,
    jac: VertexJacobian,
    frame: Frame,
    pix: Any,
    corners: Any,
    u: Any,
    R_out: Any,
    state: FitState,
    space: str,
    extra_ids: Any = None,
) -> Any:
    """``(P, 3, nf)`` Jacobian of the output-space rendered normals w.r.t. FLAME params.

    ``extra_ids`` are vertices whose Jacobian rows will be needed next (the UV term's):
    they are computed in the same :func:`flame_jacobian` call.
    """
    xp = problem.xp
    sp = _sparse(xp)
    model = problem.model
    faces = model.faces
    V = model.n_vertices
    dt = verts.dtype
    P = pix.shape[0]
    # vertices whose normals are interpolated, and the faces around them
    used = xp.unique(corners.reshape(-1))
    inc = _incidence(problem)  # (V, F) vertex-face incidence
    sub = inc[used]  # (U, F)
    fsel = xp.unique(sub.indices)
    sub = sub[:, fsel]  # (U, Fn)
    fv = faces[fsel]  # (Fn, 3)
    vids = fv.reshape(-1)
    jac.ensure(vids if extra_ids is None else xp.concatenate([vids, extra_ids]))
    Jc = jac.rows(fv.reshape(-1))  # (3 Fn, 3, nf): corner-major per face
    nf = Jc.shape[2]
    dfn = _face_normal_jacobian(verts, fv, Jc)  # (Fn, 3, nf)
    dm = (sub @ dfn.reshape(dfn.shape[0], -1)).reshape(-1, 3, nf)  # (U, 3, nf)
    # unnormalised vertex normals of the used vertices
    fn = xp.cross(verts[fv[:, 1]] - verts[fv[:, 0]], verts[fv[:, 2]] - verts[fv[:, 0]])
    dnv = _normalize_jacobian((sub @ fn).reshape(-1, 3), dm)  # (U, 3, nf)
    # barycentric interpolation as a sparse (P, U) matrix
    uloc = xp.full(V, -1, dtype=xp.int64)
    uloc[used] = xp.arange(used.shape[0])
    b = frame.bary.reshape(-1, 3)[pix].astype(dt)
    Bm = sp.csr_matrix(
        (b.reshape(-1), (xp.repeat(xp.arange(P), 3), uloc[corners.reshape(-1)])), shape=(P, used.shape[0])
    )
    du = (Bm @ dnv.reshape(dnv.shape[0], -1)).reshape(P, 3, nf)
    return _finish_normal_jacobian(problem, du, u, R_out, state, space)


_INCIDENCE: dict[int, tuple[Any, Any]] = {}


def _incidence(problem: FitProblem) -> Any:
    """Vertex-face incidence (V, F) CSR with ones, cached per faces array.

    Built with SciPy from the host faces and uploaded as a whole on the GPU (building a
    cupyx matrix from COO or CSR arrays would read sizes back from the device).
    """
    faces = problem.model.faces
    key = id(faces)
    hit = _INCIDENCE.get(key)
    if hit is not None and hit[0] is faces:
        return hit[1]
    import scipy.sparse

    host_faces = np.asarray(problem.host_faces)
    F = host_faces.shape[0]
    inc = scipy.sparse.csr_matrix(
        (np.ones(3 * F, dtype=problem.model.v_template.dtype), (host_faces.T.reshape(-1), np.tile(np.arange(F), 3))),
        shape=(problem.model.n_vertices, F),
    )
    inc.sum_duplicates()
    if problem.xp is not np:
        inc = _sparse(problem.xp).csr_matrix(inc)
        inc.has_canonical_format = True  # true by construction; cupyx would check on the device
    _INCIDENCE.clear()
    _INCIDENCE[key] = (faces, inc)
    return inc


#: :func:`solve_fast`'s stop reasons by device code (0: still running).
STOP_REASONS = ("max_iterations", "tolerance", "no_decrease", "non_finite")


def free_variables(problem: FitProblem) -> np.ndarray:
    """``(n,)`` host 1.0/0.0 per entry of :meth:`FitState.to_vector`: 0 for the camera values
    held fixed (a known focal length or principal point, :class:`FitConfig`)."""
    model, cfg = problem.model, problem.config
    nf = model.n_shape + model.n_expr + 3 * N_JOINTS
    free = np.ones(nf + 6)
    if cfg.focal is not None:
        free[nf + 3] = 0.0
    if cfg.principal_point is not None:
        free[nf + 4 :] = 0.0
    return free


def init_with_uv(problem: FitProblem, state: FitState) -> tuple[FitState, Any]:
    """The non-rigid part of the initialisation, shared by both solvers.

    ``init_uv_iterations`` Levenberg-Marquardt passes (history stage ``"init_uv"``) on the
    UV term and the regulariser alone, with the UV cap widened ``init_uv_cap_scale``
    times, over every variable. A rigid start far from a strong expression or an extreme
    pose leaves most targets beyond the normal cap, where the truncated term is flat and
    neither solver can move them.

    Returns:
        (state, stop code) as :func:`levenberg_marquardt`.
    """
    states, codes = init_with_uv_batch([problem], [state])
    return states[0], codes[0]


def init_with_uv_batch(problems: list[FitProblem], states: list[FitState]) -> tuple[list[FitState], Any]:
    """:func:`init_with_uv` of several images at once (one set of launches; see :func:`levenberg_marquardt`)."""
    cfg = problems[0].config
    w = replace(cfg.weights, normal=0.0, uv_cap_px=cfg.weights.uv_cap_px * cfg.init_uv_cap_scale)
    out, _, codes = levenberg_marquardt(problems, states, w, None, cfg.init_uv_iterations, "init_uv")
    return out, codes


def solve_fast(problem: FitProblem, state: FitState) -> tuple[FitState, Any, Any]:
    """Minimise the full energy from ``state`` (``fast_iterations`` passes, stage ``"fast"``).

    Returns:
        (state, passes, stop code) as :func:`levenberg_marquardt`.
    """
    states, passes, codes = solve_fast_batch([problem], [state])
    return states[0], passes[0], codes[0]


def solve_fast_batch(problems: list[FitProblem], states: list[FitState]) -> tuple[list[FitState], Any, Any]:
    """:func:`solve_fast` of several images at once (one set of launches; see :func:`levenberg_marquardt`)."""
    cfg = problems[0].config
    normals = [strided_normals(p.normals, cfg.fast_normal_stride) for p in problems]
    return levenberg_marquardt(problems, states, cfg.weights, normals, cfg.fast_iterations, "fast", keep_best=True)


@dataclass
class _Carry:
    """The solver's bookkeeping for B images, stacked on a leading axis.

    Device buffers that live across passes and are updated in place (so that a pass can
    be replayed as a CUDA graph). ``H``, ``g``, ``dH``, ``x0`` and ``e_total`` are the
    latest linearisation of each image: the GPU makes a new one every pass, the CPU keeps
    it while steps are rejected.
    """

    x: Any  # (B, n) current states
    best_x: Any  # (B, n) best states seen at a linearisation
    mu: Any  # (B,) damping
    best_total: Any  # (B,) energy of best_x
    stale: Any  # (B,) linearisations in a row without a relative decrease of fast_tolerance
    rejects: Any  # (B,) rejected steps in a row
    done: Any  # (B,) stopped
    code: Any  # (B,) index into STOP_REASONS
    passes: Any  # (B,) tried steps before the stop
    n_fresh: Any  # (B,) linearisations at new states (the IRLS floor schedule's clock)
    fresh: Any  # (B,) the state changed since the last linearisation
    k: Any  # () pass counter: the history row
    hist: Any  # (B, iterations, len(EnergyTerms.FIELDS) + 1) per-pass energies and skip flags
    H: Any
    g: Any
    dH: Any
    x0: Any
    e_total: Any
    best_verts: list[Any] = field(default_factory=list)  # per image: posed vertices of best_x
    best_frames: list[Any] = field(default_factory=list)  # per image: the Frame rendered at best_x

    @staticmethod
    def start(xp: Any, x: Any, iterations: int) -> "_Carry":
        B, n = x.shape
        f64, i64 = xp.float64, xp.int64
        hist = xp.zeros((B, max(iterations, 1), len(EnergyTerms.FIELDS) + 1), dtype=f64)
        hist[:, :, -1] = 1.0  # rows of passes that do not linearise stay skipped
        # the zero-initialised buffers of each dtype are views of one allocation (one
        # launch each instead of one per buffer: the first fit of a process runs eagerly)
        counters = xp.zeros((5, B), dtype=i64)
        zeros = xp.zeros(B * n * n + 2 * B * n + B, dtype=f64)
        o = [0, B * n * n, B * n * n + B * n, B * n * n + 2 * B * n]
        return _Carry(
            x=x.copy(),
            best_x=x.copy(),
            mu=xp.full(B, 1e-3, dtype=f64),
            best_total=xp.full(B, math.inf, dtype=f64),
            stale=counters[0],
            rejects=counters[1],
            done=xp.zeros(B, dtype=bool),
            code=counters[2],
            passes=counters[3],
            n_fresh=counters[4],
            fresh=xp.ones(B, dtype=bool),
            k=xp.zeros((), dtype=i64),
            hist=hist,
            H=zeros[o[0] : o[1]].reshape(B, n, n),
            g=zeros[o[1] : o[2]].reshape(B, n),
            dH=zeros[o[2] : o[3]].reshape(B, n),
            x0=x.copy(),
            e_total=zeros[o[3] :],
        )


def levenberg_marquardt(
    problems: list[FitProblem],
    states: list[FitState],
    weights: EnergyWeights,
    normals: list[NormalTargets] | None,
    iterations: int,
    stage: str,
    keep_best: bool = False,
) -> tuple[list[FitState], Any, Any]:
    """Minimise the energy with ``weights`` (and ``normals`` at the render resolution) from
    ``states``, for B images at once.

    Each pass tries one damped step per image from its latest linearisation; an accepted
    step is followed by a re-render and a new linearisation. The images share one set of
    launches: their variables are stacked (``(B, n)``), their damped systems are solved
    as one batched solve, and their damping, acceptance and stopping rule are per-image
    device arrays (:class:`_Carry`); a stopped image is masked out (its state no longer
    changes) while the others go on. The bookkeeping lives in device arrays updated in
    place, so on CuPy the fixed-shape pass is captured once as a CUDA graph and replayed
    (:class:`~p3dmm.fitting.base.graph.StepGraph`, ``FitConfig.cuda_graphs``). Camera
    values held fixed (:func:`free_variables`) get no step. Each image's result equals its
    own single-image solve (up to the batched solver's round-off).

    ``keep_best``: also keep each image's vertices and render at its best state and leave
    them in ``problem.evaluated`` for the result (which then needs no forward pass and
    render of its own).

    Returns:
        (states, passes ``(B,)``, stop codes ``(B,)``): per image the best state seen
        after a re-render; the number of passes (tried steps) before the stop; an index
        into :data:`STOP_REASONS`: ``"tolerance"`` (two re-renders in a row lowered the
        energy by less than ``fast_tolerance`` relative to the best), ``"no_decrease"``
        (eight damped steps in a row were rejected), ``"non_finite"`` (the energy at a
        re-render is NaN/inf) or ``"max_iterations"`` (``iterations`` passes). Passes and
        codes are device arrays.
    """
    p0 = problems[0]
    xp = p0.xp
    dense = xp is not np
    template = states[0]
    c = _Carry.start(xp, xp.stack([s.to_vector() for s in states]), iterations)
    B = len(problems)
    relin = [True] * B  # which images linearise in the next pass (the GPU: all, always)
    frames: list[Any] = [None] * B
    # the vertices and render of each image's best state, kept for its result (which then
    # needs no forward pass or render of its own): on the GPU buffers written in place at
    # each improvement (inside the graph), on the CPU references to the pass's arrays
    # (one allocation per buffer for all images of one render size, each image a view)
    dt, V = p0.model.v_template.dtype, p0.model.n_vertices
    shapes = [(p.render_size, int(p.uv.vertex_ids.shape[0])) for p in problems] if keep_best else []
    if shapes:
        c.best_verts, c.best_frames = [None] * B, [None] * B
    for R, N in set(shapes):
        members = [b for b, sh in enumerate(shapes) if sh == (R, N)]
        k = len(members)
        verts_b = xp.zeros((k, V, 3), dtype=dt)
        face_id = xp.full((k, R, R), -1, dtype=xp.int32)
        bary = xp.zeros((k, R, R, 3), dtype=dt)
        visible = xp.zeros((k, N), dtype=bool)
        for j, b in enumerate(members):
            c.best_verts[b] = verts_b[j]
            c.best_frames[b] = Frame(face_id=face_id[j], bary=bary[j], visible=visible[j])

    def step() -> None:
        _lm_pass(problems, template, c, weights, normals, relin, frames, dense)

    # the pass's kernels and cached constants depend on the model, the configuration and
    # the weights, the map sizes (S) and the normal spaces: once warmed, later fits capture at once
    key = ("lm", stage, p0.config, weights, tuple(sorted({(p.size, p.normals.space) for p in problems})))
    graph = StepGraph(xp, step, f"fit: Levenberg-Marquardt ({stage})", enabled=p0.config.cuda_graphs,
                      warm=(p0.model, key))  # fmt: skip
    stop = LaggedFlag(xp)
    for _ in range(iterations):
        graph()
        if dense:
            if stop.poll(c.done.all()):
                break
            continue
        # the CPU knows at once which images stopped and which need a new linearisation
        done, fresh = c.done.tolist(), c.fresh.tolist()
        if all(done):
            break
        relin[:] = [not d and f for d, f in zip(done, fresh)]
    for b, p in enumerate(problems):
        p.record_rows(stage, c.hist[b, :iterations])
    out = [template.from_vector(c.best_x[b]) for b in range(B)]
    if keep_best and iterations > 0:  # the first pass linearises every image: its best state has a render
        for b, p in enumerate(problems):
            p.evaluated = (out[b], c.best_verts[b], c.best_frames[b])
    return out, c.passes, c.code


def _lm_pass(
    problems: list[FitProblem],
    template: FitState,
    c: _Carry,
    weights: EnergyWeights,
    normals: list[NormalTargets] | None,
    relin: list[bool],
    frames: list[Any],
    dense: bool,
) -> None:
    """One pass of :func:`levenberg_marquardt` over the images, written into ``c`` in place.

    ``relin[b]``: image b linearises at its current state first (always on the GPU,
    where this is one fixed-shape step; on the CPU only after an accepted step).
    """
    p0 = problems[0]
    xp, cfg = p0.xp, p0.config
    f64 = xp.float64
    dt = p0.model.v_template.dtype
    free = constant(xp, free_variables(p0), np.float64)
    fixed = 1.0 - free
    B = len(problems)
    idx = [b for b in range(B) if relin[b]]
    if idx:
        # IRLS floors: the schedule's clock counts linearisations at new states
        n_fresh = c.n_fresh + c.fresh
        floors = xp.maximum(1.0, cfg.fast_irls_floor_start * cfg.fast_irls_floor_decay ** (n_fresh - 1).astype(f64))
        floors = floors.astype(dt)  # a float64 array would promote the weights
        skip = c.done | ~c.fresh
        rows, totals, Hs, gs, verts = [], [], [], [], []
        for b in idx:
            p = problems[b]
            st = template.from_vector(c.x[b])
            nt = normals[b] if normals is not None else None
            fwd = flame_forward(p.model, st.params())
            verts.append(fwd[0])
            frames[b] = p.render(st, fwd[0])
            e = p.energy(st, frames[b], weights, normals=nt, forward=fwd)
            H, g = normal_equations(
                p, st, frames[b], nt if nt is not None else p.normals, e,
                forward=fwd, eps_scale=floors[b], dense=dense, weights=weights,
            )  # fmt: skip
            rows.append(e.to_vector())
            totals.append(e.total.astype(f64))
            Hs.append(H * free[:, None] * free[None, :] + xp.diag(fixed))  # fixed values: identity block
            gs.append(g * free)
        rows_s = xp.stack(rows)
        if len(idx) == B:  # the GPU path: whole-batch writes
            c.hist[:, c.k] = xp.concatenate([rows_s, skip.astype(f64)[:, None]], 1)
            c.H[...], c.g[...], c.x0[...] = xp.stack(Hs), xp.stack(gs), c.x
            c.e_total[...] = xp.stack(totals)
            c.n_fresh[...] = n_fresh
        else:
            for j, b in enumerate(idx):
                c.hist[b, c.k] = xp.concatenate([rows_s[j], skip[b : b + 1].astype(f64)])
                c.H[b], c.g[b], c.x0[b] = Hs[j], gs[j], c.x[b]
                c.e_total[b] = totals[j]
                c.n_fresh[b] = n_fresh[b]
        c.dH[...] = xp.diagonal(c.H, axis1=1, axis2=2)
        # the stopping rule: re-linearising an unchanged (rejected) state repeats the
        # previous numbers, so only a fresh state counts
        e_total, fresh, done = c.e_total, c.fresh, c.done
        finite = xp.isfinite(e_total)
        c.stale[...] = xp.where(fresh, xp.where(e_total <= c.best_total * (1.0 - cfg.fast_tolerance), 0, c.stale + 1), c.stale)
        better = fresh & finite & (e_total < c.best_total)
        c.best_x[...] = xp.where(better[:, None], c.x, c.best_x)
        c.best_total[...] = xp.where(better, e_total, c.best_total)
        better_h = None if dense or not c.best_frames else better.tolist()
        for j, b in enumerate(idx if c.best_frames else []):
            fr, bf = frames[b], c.best_frames[b]
            if dense:
                for dst, src in ((bf.face_id, fr.face_id), (bf.bary, fr.bary), (bf.visible, fr.visible),
                                 (c.best_verts[b], verts[j])):  # fmt: skip
                    xp.copyto(dst, src, where=better[b])
            elif better_h[b]:  # type: ignore[index]
                c.best_frames[b], c.best_verts[b] = fr, verts[j]
        new_code = xp.where(~finite, 3, xp.where(fresh & (c.stale >= 2), 1, 0))
        c.code[...] = xp.where(done, c.code, new_code)
        c.done[...] = done | (new_code > 0)
    # ------------------------------------------------- damped steps, one batched solve
    done = c.done
    c.passes[...] = c.passes + ~done
    live = list(range(B)) if dense else [b for b, d in enumerate(done.tolist()) if not d]
    sel = slice(None) if dense or len(live) == B else live  # the CPU solves the live images only
    damp = c.dH[sel] + 1e-9 * c.dH[sel].max(1, keepdims=True)
    eye = xp.eye(c.H.shape[1], dtype=f64)
    A = c.H[sel] + eye * (c.mu[sel][:, None] * damp)[:, None, :]
    step = -xp.linalg.solve(A, c.g[sel][:, :, None])[:, :, 0]
    if isinstance(sel, slice):
        xc = (c.x0 + step).astype(c.x.dtype)
    else:
        xc = c.x.copy()
        xc[live] = (c.x0[live] + step).astype(c.x.dtype)
    ecs = []
    for b in live:
        cand = template.from_vector(xc[b])
        nt = normals[b] if normals is not None else None
        ecs.append(problems[b].energy(cand, frames[b], weights, with_grad=False, normals=nt).total.astype(f64))
    if dense:
        ec = xp.stack(ecs)
    else:
        ec = xp.full(B, math.inf, dtype=f64)
        for j, b in enumerate(live):
            ec[b] = ecs[j]
    accept = ~done & xp.isfinite(ec) & (ec < c.e_total)
    c.x[...] = xp.where(accept[:, None], xc, c.x)
    c.mu[...] = xp.where(accept, xp.maximum(c.mu / 3.0, 1e-7), xp.where(done, c.mu, c.mu * 8.0))
    c.rejects[...] = xp.where(accept | done, 0, c.rejects + 1)
    c.code[...] = xp.where(~done & (c.rejects >= 8), 2, c.code)
    c.done[...] = done | (c.rejects >= 8)
    c.fresh[...] = accept
    c.k += 1
