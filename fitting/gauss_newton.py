"""The fast solver: Levenberg-Marquardt with IRLS weights and analytic Jacobians.

Both data terms are robust (the UV term sums 2D distances, not squares; the normal
term is an L1 norm). Each iteration replaces them by their IRLS quadratic majorisers
at the current state, ``|r| ~ r^2 / (2 max(|r|, eps))``, whose gradient equals the
energy's gradient and whose Hessian is ``J^T W J`` with ``W = weight / max(|r|, eps)``.
The gradient comes from :func:`p3dmm.fitting.energy.evaluate_energy` (checked against
finite differences); this module only adds the Jacobians:

* UV rows ``d pi(v) / d x`` for the active targets, from the exact FLAME vertex
  Jacobian (:func:`p3dmm.fitting.lbs.flame_jacobian`) and the projection;
* normal rows ``d n_p / d x`` through face normals -> area-weighted vertex normals ->
  barycentric interpolation -> normalisation (-> head-space rotation), using sparse
  incidence matrices (scipy on the CPU, cupyx on the GPU).

A step is accepted when the energy (fragments held fixed) decreases; otherwise the
damping grows. The fragments and visibility are re-rendered once per iteration.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .camera import FLAME_TO_OPENCV
from .energy import EnergyTerms, FitState, Frame, NormalTargets, project, rendered_normals
from .lbs import flame_forward, flame_jacobian, rodrigues, rodrigues_jvp
from .xp import asarray_on, get_array_module

if TYPE_CHECKING:  # pragma: no cover
    from .fitter import _Context

__all__ = ["levenberg_marquardt", "normal_equations"]

log = logging.getLogger(__name__)

_EPS_UV = 1e-3  # IRLS floor of the UV residual norm (image-size units; 0.5 px at 512)
_EPS_N = 2e-2  # IRLS floor of a normal residual component


def _sparse(xp: Any) -> Any:
    if xp is np:
        import scipy.sparse as sp
    else:  # pragma: no cover - GPU only
        import cupyx.scipy.sparse as sp
    return sp


def _strided_normals(ctx: "_Context") -> NormalTargets:
    """Normal targets restricted to every k-th row and column (the fast solver's L_n)."""
    k = max(int(ctx.config.gn_normal_stride), 1)
    if k == 1:
        return ctx.normals
    xp = ctx.xp
    m = xp.zeros_like(ctx.normals.mask)
    m[::k, ::k] = ctx.normals.mask[::k, ::k]
    return NormalTargets(normals=ctx.normals.normals, mask=m, space=ctx.normals.space, scale=ctx.normals.scale)


class _VertexJacobian:
    """FLAME vertex Jacobian rows computed once per iteration for the vertices asked for."""

    def __init__(self, model: Any, cache: Any) -> None:
        self.model, self.cache = model, cache
        self.xp = get_array_module(model.v_template)
        self.J: Any = None
        self.loc: Any = None

    def ensure(self, vids: Any) -> None:
        xp = self.xp
        vids = xp.unique(vids)
        self.J = flame_jacobian(self.model, self.cache, vids)  # (M, 3, nf)
        self.loc = xp.full(self.model.n_vertices, -1, dtype=xp.int64)
        self.loc[vids] = xp.arange(vids.shape[0])

    def rows(self, ids: Any) -> Any:
        if self.loc is None or bool((self.loc[ids] < 0).any()):
            self.ensure(ids if self.loc is None else self.xp.concatenate([ids, self.xp.nonzero(self.loc >= 0)[0]]))
        return self.J[self.loc[ids]]


def normal_equations(
    ctx: "_Context",
    state: FitState,
    frame: Frame,
    normals: NormalTargets,
    energy: EnergyTerms,
    forward: tuple[Any, Any] | None = None,
    eps_scale: float = 1.0,
) -> tuple[Any, Any]:
    """IRLS Gauss-Newton system ``(H, g)`` at ``state`` (g is the exact energy gradient).

    Args:
        forward: optional ``(vertices, cache)`` of :func:`flame_forward` at ``state``.
        eps_scale: multiplies the IRLS residual floors (> 1 gives flatter, more
            quadratic models and longer steps).

    Returns:
        ``H (n, n)`` and ``g (n,)`` over :meth:`FitState.to_vector`'s layout.
    """
    xp = ctx.xp
    model = ctx.model
    w = ctx.config.weights
    dt = model.v_template.dtype
    H_img, W_img = ctx.size
    S = float(max(H_img, W_img))
    n_s, n_e = model.n_shape, model.n_expr
    nf = n_s + n_e + 15
    n = nf + 6  # + t (3), log_f, pp (2)
    verts, cache = forward if forward is not None else flame_forward(model, state.params())
    R0 = asarray_on(xp, FLAME_TO_OPENCV, dt)
    H = xp.zeros((n, n), dtype=xp.float64)
    jac = _VertexJacobian(model, cache)

    uv = ctx.uv
    Xc, proj = project(state, verts[uv.vertex_ids])
    r = (proj - uv.pixels) / S
    rho = xp.sqrt((r * r).sum(-1))
    active = frame.visible & (rho * S < w.uv_cap_px) & (Xc[:, 2] > 0)
    idx = xp.nonzero(active)[0]
    ids = uv.vertex_ids[idx]

    # ------------------------------------------------------------ normal rows
    if w.normal > 0:
        cover = (frame.face_id >= 0) & normals.mask
        pix = xp.nonzero(cover.reshape(-1))[0]
        if pix.size:
            Rg = rodrigues(state.pose[:1])[0]
            R_out = Rg.T if normals.space == "head" else R0
            n_out, u, _, corners = rendered_normals(verts, model.faces, frame.face_id, frame.bary, pix, R_out)
            d = normals.normals.reshape(-1, 3)[pix] - n_out
            keep = xp.abs(d).mean(-1) < w.normal_outlier
            kp = xp.nonzero(keep)[0]
            if kp.size:
                Jn = _normal_jacobian(ctx, verts, jac, frame, pix[kp], corners[kp], u[kp], R_out, state, normals.space, ids)
                wt = (w.normal / normals.n_pixels) / xp.maximum(xp.abs(d[kp]), _EPS_N * eps_scale)  # (P, 3)
                # J^T W J as (sqrt(W) J)^T (sqrt(W) J): numpy then uses a symmetric rank-k update
                Jw = Jn.reshape(-1, nf) * xp.sqrt(wt).reshape(-1)[:, None]
                H[:nf, :nf] += (Jw.T @ Jw).astype(xp.float64)

    # ---------------------------------------------------------------- UV rows
    if idx.size:
        Xa = Xc[idx]
        f = xp.exp(state.log_f)
        Z = Xa[:, 2]
        zero = xp.zeros_like(Z)
        # dp[v, k, :] = d proj_k / d Xc / S
        dp = xp.stack(
            [xp.stack([f / Z, zero, -f * Xa[:, 0] / Z**2], -1), xp.stack([zero, f / Z, -f * Xa[:, 1] / Z**2], -1)], 1
        ) / S
        Jv = jac.rows(ids)  # (A, 3, nf)
        J_flame = dp @ (R0 @ Jv)  # (A, 2, nf)
        J_t = dp  # (A, 2, 3)
        J_f = (f * Xa[:, :2] / Z[:, None] / S)[:, :, None]  # (A, 2, 1)
        J_pp = xp.broadcast_to(xp.eye(2, dtype=dt) / S, (idx.size, 2, 2))
        J = xp.concatenate([J_flame, J_t, J_f, J_pp], 2).reshape(-1, n)
        wt = (w.uv / uv.n_targets) / xp.maximum(rho[idx], _EPS_UV * eps_scale)
        Jw = J * xp.repeat(xp.sqrt(wt), 2)[:, None]
        H += (Jw.T @ Jw).astype(xp.float64)

    # ------------------------------------------------------------ regulariser
    reg = xp.zeros(n, dtype=xp.float64)
    reg[:n_s] = 2 * w.identity
    reg[n_s : n_s + n_e] = 2 * w.expression
    pose_w = [0.0, w.neck, w.jaw, w.eyes, w.eyes]
    for j in range(5):
        reg[n_s + n_e + 3 * j : n_s + n_e + 3 * j + 3] = 2 * pose_w[j]
    reg[nf + 3] = 2 * w.focal
    reg[nf + 4 :] = 2 * w.principal / S**2
    H += xp.diag(reg)
    if energy.grad is None:
        raise ValueError("normal_equations: energy must be evaluated with_grad=True")
    return H, energy.grad.to_vector().astype(xp.float64)


def _normal_jacobian(
    ctx: "_Context",
    verts: Any,
    jac: _VertexJacobian,
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
    xp = ctx.xp
    sp = _sparse(xp)
    model = ctx.model
    faces = model.faces
    V = model.n_vertices
    dt = verts.dtype
    P = pix.shape[0]
    # vertices whose normals are interpolated, and the faces around them
    used = xp.unique(corners.reshape(-1))
    inc = _incidence(ctx)  # (V, F) vertex-face incidence
    sub = inc[used]  # (U, F)
    fsel = xp.unique(sub.indices)
    sub = sub[:, fsel]  # (U, Fn)
    fv = faces[fsel]  # (Fn, 3)
    vids = fv.reshape(-1)
    jac.ensure(vids if extra_ids is None else xp.concatenate([vids, extra_ids]))
    Fn = fv.shape[0]
    Jc = jac.rows(fv.reshape(-1))  # (3 Fn, 3, nf): corner-major per face
    nf = Jc.shape[2]
    v0, v1, v2 = verts[fv[:, 0]], verts[fv[:, 1]], verts[fv[:, 2]]
    e1, e2 = v1 - v0, v2 - v0
    from .lbs import _skew

    # d(e1 x e2) = -[e2]x (dv1 - dv0) + [e1]x (dv2 - dv0)
    #            = [e2 - e1]x dv0 - [e2]x dv1 + [e1]x dv2: one (3 x 9) @ (9 x nf) per face
    K = xp.concatenate([_skew(e2 - e1), -_skew(e2), _skew(e1)], axis=2)  # (Fn, 3, 9)
    dfn = K @ Jc.reshape(Fn, 9, nf)  # (Fn, 3, nf)
    dm = (sub @ dfn.reshape(dfn.shape[0], -1)).reshape(-1, 3, nf)  # (U, 3, nf)
    # unnormalised vertex normals of the used vertices
    fn = xp.cross(e1, e2)
    m = (sub @ fn).reshape(-1, 3)
    mnorm = xp.maximum(xp.sqrt((m * m).sum(-1)), 1e-12)
    nv = m / mnorm[:, None]
    Pm = (xp.eye(3, dtype=dt) - nv[:, :, None] * nv[:, None, :]) / mnorm[:, None, None]
    dnv = Pm @ dm  # (U, 3, nf)
    # barycentric interpolation as a sparse (P, U) matrix
    uloc = xp.full(V, -1, dtype=xp.int64)
    uloc[used] = xp.arange(used.shape[0])
    b = frame.bary.reshape(-1, 3)[pix].astype(dt)
    Bm = sp.csr_matrix(
        (b.reshape(-1), (xp.repeat(xp.arange(P), 3), uloc[corners.reshape(-1)])), shape=(P, used.shape[0])
    )
    du = (Bm @ dnv.reshape(dnv.shape[0], -1)).reshape(P, 3, nf)
    unorm = xp.maximum(xp.sqrt((u * u).sum(-1)), 1e-12)
    nw = u / unorm[:, None]
    Pu = (xp.eye(3, dtype=dt) - nw[:, :, None] * nw[:, None, :]) / unorm[:, None, None]
    dn = R_out @ (Pu @ du)  # (P, 3, nf)
    if space == "head":
        # n_out = Rg^T n: extra dependence on the global rotation, pose columns 0..2
        n_s_e = model.n_shape + model.n_expr
        eye = xp.eye(3, dtype=dt).reshape(3, 1, 3)
        dRg = rodrigues_jvp(state.pose[:1], eye)[:, 0]  # (3, 3, 3)
        extra = xp.einsum("aji,pj->pia", dRg, nw)  # d(Rg^T n)/d r_a
        dn[:, :, n_s_e : n_s_e + 3] += extra
    return -dn  # residual d = N - n_out


_INCIDENCE: dict[int, tuple[Any, Any]] = {}


def _incidence(ctx: "_Context") -> Any:
    """Vertex-face incidence (V, F) CSR with ones, cached per faces array."""
    faces = ctx.model.faces
    key = id(faces)
    hit = _INCIDENCE.get(key)
    if hit is not None and hit[0] is faces:
        return hit[1]
    xp = ctx.xp
    sp = _sparse(xp)
    F = faces.shape[0]
    rows = faces.T.reshape(-1)
    cols = xp.tile(xp.arange(F), 3)
    data = xp.ones(3 * F, dtype=ctx.model.v_template.dtype)
    inc = sp.csr_matrix((data, (rows, cols)), shape=(ctx.model.n_vertices, F))
    _INCIDENCE.clear()
    _INCIDENCE[key] = (faces, inc)
    return inc


def levenberg_marquardt(ctx: "_Context", state: FitState) -> tuple[FitState, int, str]:
    """Minimise the energy from ``state``.

    Returns:
        (state, iterations, stop reason): ``"tolerance"`` (relative decrease below
        ``gn_tolerance``, measured between re-renders), ``"no_decrease"`` (no damped
        step lowers the energy: a local minimum of the model at this render) or
        ``"max_iterations"``. The state returned is the best one seen after a re-render.
    """
    xp = ctx.xp
    cfg = ctx.config
    normals = _strided_normals(ctx)
    mu = 1e-3
    reason = "max_iterations"
    best_state, best_total = state, math.inf
    stale = 0
    it = 0
    for it in range(1, cfg.gn_iterations + 1):
        fwd = flame_forward(ctx.model, state.params())
        frame = ctx.render(state, fwd[0])
        e = ctx.energy(state, frame, normals=normals, forward=fwd)
        ctx.record("lm", it, e)
        e_total = float(e.total)  # LM decides on host scalars: one read-back per trial
        if not math.isfinite(e_total):
            from .errors import FittingError

            raise FittingError(f"fit: non-finite energy at LM iteration {it} ({e.to_dict()})")
        # new face ids / visibility can raise the energy: stop when two re-renders in a
        # row do not improve on the best state seen
        if e_total > best_total * (1.0 - cfg.gn_tolerance):
            stale += 1
            if stale >= 2:
                reason = "tolerance"
                break
        else:
            stale = 0
        if e_total < best_total:
            best_state, best_total = state, e_total
        floors = max(1.0, cfg.gn_irls_floor_start * cfg.gn_irls_floor_decay ** (it - 1))
        H, g = normal_equations(ctx, state, frame, normals, e, forward=fwd, eps_scale=floors)
        x0 = state.to_vector()
        dH = xp.diag(H).copy()
        rel = -1.0
        for _ in range(8):
            A = H + mu * xp.diag(dH + 1e-9 * dH.max())
            step = -xp.linalg.solve(A, g)
            cand = state.from_vector((x0 + step).astype(x0.dtype))
            ec_total = float(ctx.energy(cand, frame, with_grad=False, normals=normals).total)
            log.debug("LM it %d mu %.2e E %.6g -> %.6g", it, mu, e_total, ec_total)
            if math.isfinite(ec_total) and ec_total < e_total:
                rel = (e_total - ec_total) / max(e_total, 1e-12)
                state = cand
                mu = max(mu / 3.0, 1e-7)
                break
            mu *= 8.0
        if rel < 0:
            reason = "no_decrease"
            break
    return best_state, it, reason
