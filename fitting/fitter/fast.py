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
from dataclasses import replace
from typing import Any

import numpy as np

from ..base.camera import FLAME_TO_OPENCV
from ..base.rotation import rodrigues_jvp, skew
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
    "levenberg_marquardt",
    "VertexJacobian",
    "normal_equations",
    "normal_jacobian",
    "normal_jacobian_dense",
    "solve_fast",
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
            _add_normal_rows(H, Jn, nr.d, nr.keep[:, None], w.normal / normals.n_pixels, eps_scale, nf)
        else:
            pix = xp.nonzero(((frame.face_id >= 0) & normals.mask).reshape(-1))[0]
            if pix.size:
                nr = normal_residuals(verts, model.faces, frame, normals, pix, R_out, w)
                kp = xp.nonzero(nr.keep)[0]
                if kp.size:
                    Jn = normal_jacobian(
                        problem, verts, jac, frame, pix[kp], nr.corners[kp], nr.u[kp], R_out, state, normals.space, ids
                    )
                    _add_normal_rows(H, Jn, nr.d[kp], 1.0, w.normal / normals.n_pixels, eps_scale, nf)

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


def _add_normal_rows(H: Any, Jn: Any, d: Any, keep: Any, scale: Any, eps_scale: Any, nf: int) -> None:
    """``H[:nf, :nf] += Jn^T W Jn`` with IRLS weights ``W = keep * scale / max(|d|, eps)``.

    Computed as ``(sqrt(W) Jn)^T (sqrt(W) Jn)``: NumPy then uses a symmetric rank-k update.
    """
    xp = get_array_module(Jn)
    wt = keep * scale / xp.maximum(xp.abs(d), _EPS_N * eps_scale)  # (P, 3)
    Jw = Jn.reshape(-1, nf) * xp.sqrt(wt).reshape(-1)[:, None]
    H[:nf, :nf] += (Jw.T @ Jw).astype(xp.float64)


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


def _select(cond: Any, a: FitState, b: FitState) -> FitState:
    """``a`` where the 0-d bool ``cond`` holds, else ``b`` (no host read)."""
    xp = get_array_module(a.shape)
    return FitState(*(xp.where(cond, getattr(a, k), getattr(b, k)) for k in FitState.NAMES))


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
    cfg = problem.config
    w = replace(cfg.weights, normal=0.0, uv_cap_px=cfg.weights.uv_cap_px * cfg.init_uv_cap_scale)
    state, _, code = levenberg_marquardt(problem, state, w, None, cfg.init_uv_iterations, "init_uv")
    return state, code


def solve_fast(problem: FitProblem, state: FitState) -> tuple[FitState, Any, Any]:
    """Minimise the full energy from ``state`` (``fast_iterations`` passes, stage ``"fast"``).

    Returns:
        (state, passes, stop code) as :func:`levenberg_marquardt`.
    """
    cfg = problem.config
    normals = strided_normals(problem.normals, cfg.fast_normal_stride)
    return levenberg_marquardt(problem, state, cfg.weights, normals, cfg.fast_iterations, "fast")


def levenberg_marquardt(
    problem: FitProblem,
    state: FitState,
    weights: EnergyWeights,
    normals: NormalTargets | None,
    iterations: int,
    stage: str,
) -> tuple[FitState, Any, Any]:
    """Minimise the energy with ``weights`` (and ``normals`` at the render resolution) from ``state``.

    Each pass tries one damped step from the latest linearisation; an accepted step is
    followed by a re-render and a new linearisation. The bookkeeping lives in 0-d device
    arrays (see the module docstring). Camera values held fixed (:func:`free_variables`)
    get no step.

    Returns:
        (state, iterations, stop code): the best state seen after a re-render; the
        number of passes (tried steps) before the stop; an index into
        :data:`STOP_REASONS`: ``"tolerance"`` (two re-renders in a row lowered the
        energy by less than ``fast_tolerance`` relative to the best), ``"no_decrease"``
        (eight damped steps in a row were rejected), ``"non_finite"`` (the energy at a
        re-render is NaN/inf) or ``"max_iterations"`` (``iterations`` passes). The
        last two are 0-d arrays of the fitting device.
    """
    xp = problem.xp
    cfg = problem.config
    dense = xp is not np
    free = constant(xp, free_variables(problem), np.float64)
    fixed = 1.0 - free
    stop = LaggedFlag(xp)
    f64 = xp.float64
    mu = xp.asarray(1e-3, dtype=f64)
    best_total = xp.asarray(math.inf, dtype=f64)
    best_state = state
    stale = xp.zeros((), dtype=xp.int64)
    rejects = xp.zeros((), dtype=xp.int64)
    done = xp.zeros((), dtype=bool)
    code = xp.zeros((), dtype=xp.int64)
    passes = xp.zeros((), dtype=xp.int64)
    n_fresh = xp.zeros((), dtype=xp.int64)
    fresh = xp.ones((), dtype=bool)  # the state changed since the last linearisation
    relinearise = True
    frame: Any = None
    e_total: Any = None
    H: Any = None
    g: Any = None
    dH: Any = None
    x0: Any = None
    linearisations = 0
    for _ in range(iterations):
        if relinearise:
            linearisations += 1
            fwd = flame_forward(problem.model, state.params())
            frame = problem.render(state, fwd[0])
            e = problem.energy(state, frame, weights, normals=normals, forward=fwd)
            problem.record(stage, linearisations, e, skip=done | ~fresh)
            e_total = e.total.astype(f64)
            # re-linearising an unchanged (rejected) state repeats the previous numbers:
            # only a fresh state counts towards the stopping rule
            finite = xp.isfinite(e_total)
            stale = xp.where(fresh, xp.where(e_total <= best_total * (1.0 - cfg.fast_tolerance), 0, stale + 1), stale)
            better = fresh & finite & (e_total < best_total)
            best_state = _select(better, state, best_state)
            best_total = xp.where(better, e_total, best_total)
            new_code = xp.where(~finite, 3, xp.where(fresh & (stale >= 2), 1, 0))
            code = xp.where(done, code, new_code)
            done = done | (new_code > 0)
            if stop.poll(done):
                break
            n_fresh = n_fresh + fresh  # linearisations at new states: the IRLS floor schedule's clock
            floors = xp.maximum(1.0, cfg.fast_irls_floor_start * cfg.fast_irls_floor_decay ** (n_fresh - 1).astype(f64))
            floors = floors.astype(problem.model.v_template.dtype)  # a float64 0-d array would promote the weights
            H, g = normal_equations(
                problem, state, frame, normals if normals is not None else problem.normals, e,
                forward=fwd, eps_scale=floors, dense=dense, weights=weights,
            )  # fmt: skip
            # fixed camera values: no gradient, an identity block (their step is zero)
            H = H * free[:, None] * free[None, :] + xp.diag(fixed)
            g = g * free
            x0 = state.to_vector()
            dH = xp.diag(H).copy()
        passes = passes + ~done
        A = H + mu * xp.diag(dH + 1e-9 * dH.max())
        step = -xp.linalg.solve(A, g)
        cand = state.from_vector((x0 + step).astype(x0.dtype))
        ec_total = problem.energy(cand, frame, weights, with_grad=False, normals=normals)
        ec_total = ec_total.total.astype(f64)
        accept = ~done & xp.isfinite(ec_total) & (ec_total < e_total)
        state = _select(accept, cand, state)
        mu = xp.where(accept, xp.maximum(mu / 3.0, 1e-7), xp.where(done, mu, mu * 8.0))
        rejects = xp.where(accept | done, 0, rejects + 1)
        code = xp.where(~done & (rejects >= 8), 2, code)
        done = done | (rejects >= 8)
        fresh = accept
        # the CPU knows at once whether to re-linearise; the GPU always does (no read)
        relinearise = dense or bool(accept)
        if stop.poll(done):
            break
    return best_state, passes, code
