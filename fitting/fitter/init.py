"""Initialisation of a fit from the UV correspondences alone: head rotation, camera
translation and focal length (zero shape and expression).
"""

from __future__ import annotations

import math
from typing import Any

from ..base.camera import FLAME_TO_OPENCV, Camera
from ..base.graph import StepGraph
from ..base.rotation import rodrigues, rotation_to_axis_angle
from ..base.xp import asarray_on, constant, get_array_module
from ..model.flame_model import FlameModel
from ..model.params import POSE_SHAPE
from .energy import EnergyWeights
from .state import FitState, UVTargets

__all__ = ["init_rigid", "init_rigid_batch", "refine_rigid"]


def init_rigid(
    model: FlameModel,
    uv: UVTargets,
    f0: float,
    pp0: Any,
    size: tuple[int, int],
    weights: EnergyWeights,
    iters: int = 15,
    fix_focal: bool = False,
    graphs: bool = True,
) -> FitState:
    """Head rotation, camera translation and focal from UV correspondences alone.

    An affine camera ``p = M X + b`` is fitted to (template vertex, target pixel) pairs by
    iteratively reweighted least squares (normal equations: ``lstsq`` would read the rank
    back on CuPy); the nearest rotation to the rows of ``M`` gives the head rotation, its
    scale the depth ``f0 / s``; then :func:`refine_rigid`. Runs on the fitting device in
    float64 without reading anything back.
    """
    return init_rigid_batch(model, [uv], f0, pp0, size, weights, iters, fix_focal, graphs)[0]


def init_rigid_batch(
    model: FlameModel,
    uvs: list[UVTargets],
    f0: float,
    pp0: Any,
    size: tuple[int, int],
    weights: EnergyWeights,
    iters: int = 15,
    fix_focal: bool = False,
    graphs: bool = True,
) -> list[FitState]:
    """:func:`init_rigid` of B images of one size at once (one set of launches).

    The images share the model, the queried vertices (``uv.vertex_ids``), the size and
    the camera start ``f0``, ``pp0``; their targets differ. Each result equals the
    image's own :func:`init_rigid` up to the batched products' round-off.
    """
    xp = get_array_module(uvs[0].pixels)
    ids = uvs[0].vertex_ids
    X = model.v_template[ids].astype(xp.float64)  # (N, 3), shared
    p = xp.stack([uv.pixels for uv in uvs]).astype(xp.float64)  # (B, N, 2)
    valid = xp.stack([uv.weight() for uv in uvs]).astype(xp.float64)  # (B, N)
    n_targets = xp.stack([xp.asarray(uv.n_targets, dtype=xp.float64) for uv in uvs])
    pp = asarray_on(xp, pp0, xp.float64)
    A = xp.concatenate([X, xp.ones((X.shape[0], 1))], 1)  # (N, 4)
    eye4 = xp.eye(4)
    w = valid
    for _ in range(5):
        Aw = A[None] * w[:, :, None]  # (B, N, 4)
        AtA = Aw.transpose(0, 2, 1) @ A  # (B, 4, 4)
        tr = xp.trace(AtA, axis1=1, axis2=2)
        AtA = AtA + (1e-9 * (tr + 1.0))[:, None, None] * eye4  # keeps a degenerate set solvable
        sol = xp.linalg.solve(AtA, Aw.transpose(0, 2, 1) @ p)  # (B, 4, 2)
        res = xp.sqrt((((A @ sol) - p) ** 2).sum(-1))
        w = valid / xp.maximum(res, 1.0)  # IRLS for sum |r|: weight 1/|r| on the squares
    M0, M1, b = sol[:, :3, 0], sol[:, :3, 1], sol[:, 3]  # rows of M (B, 3) and b (B, 2)
    # s > 0 keeps a degenerate fit (no correspondences: reported when the result is read) finite
    s = xp.maximum(0.5 * (xp.sqrt((M0**2).sum(-1)) + xp.sqrt((M1**2).sum(-1))), 1e-9)
    Bm = xp.stack([M0 / s[:, None], M1 / s[:, None], xp.cross(M0, M1) / (s**2)[:, None]], 1)  # (B, 3, 3)
    U, _, Vt = xp.linalg.svd(Bm)
    flip = xp.stack([xp.ones_like(s), xp.ones_like(s), xp.linalg.det(U @ Vt)], -1)  # (B, 3)
    Rc = (U * flip[:, None, :]) @ Vt  # camera-from-FLAME rotations R0 Rg
    Rg = constant(xp, FLAME_TO_OPENCV, xp.float64).T @ Rc
    zc = (X[None] @ Rc.transpose(0, 2, 1))[:, :, 2]
    tz = f0 / s - (zc * valid).sum(-1) / xp.maximum(valid.sum(-1), 1.0)
    txy = (b - pp) / s[:, None]
    t = xp.concatenate([txy, tz[:, None]], -1)
    return refine_rigid(X, p, valid, n_targets, Rg, t, math.log(f0), pp, size, weights, iters, model, fix_focal, graphs)


def refine_rigid(
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
    fix_focal: bool = False,
    graphs: bool = True,
) -> list[FitState]:
    """Gauss-Newton with IRLS on ``(lambda_uv / N) sum |r_v| + lambda_f (log f - log f0)^2``, per image.

    Variables per image b: a left rotation increment in camera axes, the camera
    translation and the log focal length; the template ``X (N, 3)`` (zero shape and
    expression) is rigid here; ``p (B, N, 2)`` are the targets, ``valid (B, N)`` (0/1)
    drops rows without a correspondence and ``n_targets (B,)`` is N per image; ``Rg
    (B, 3, 3)`` and ``t (B, 3)`` are the starts. A fixed number of iterations (no
    convergence test, which would read the device); on CuPy an iteration is captured as
    a CUDA graph (``graphs``: :attr:`FitConfig.cuda_graphs`).
    """
    xp = get_array_module(X)
    R0 = constant(xp, FLAME_TO_OPENCV, xp.float64)
    S = float(max(size))
    B = p.shape[0]
    n = xp.maximum(xp.asarray(n_targets, dtype=xp.float64), 1.0)  # (B,)
    e6 = constant(xp, [0, 0, 0, 0, 0, 0, 1.0], xp.float64)
    keep = 1.0 - e6
    eye7 = xp.eye(7)
    # the variables live in buffers updated in place: on CuPy an iteration is a CUDA graph
    Rg = xp.array(Rg, dtype=xp.float64, copy=True)
    t = xp.array(t, dtype=xp.float64, copy=True)
    lf = xp.full(B, lf0, dtype=xp.float64)

    def iteration() -> None:
        Rc = R0 @ Rg  # (B, 3, 3)
        Y = X[None] @ Rc.transpose(0, 2, 1)  # (B, N, 3)
        Xc = Y + t[:, None, :]
        f = xp.exp(lf)[:, None]
        z = Xc[:, :, 2]
        proj = f[:, :, None] * Xc[:, :, :2] / z[:, :, None] + pp
        r = (proj - p) / S
        rho = xp.sqrt((r * r).sum(-1))
        w = valid * (weights.uv / n)[:, None] / xp.maximum(rho, 1e-4) * (rho <= 4 * weights.uv_cap)  # outliers out
        fz = f / z / S
        zero = xp.zeros_like(z)
        rows = []
        for k in range(2):
            # d proj_k / d Xc = f / z e_k - f x_k / z^2 e_z (over S)
            dp = xp.stack([fz if k == 0 else zero, zero if k == 0 else fz, -fz * Xc[:, :, k] / z], -1)
            # d/d(omega) of dp . (omega x Y) = Y x dp ; d/dt = dp ; d/dlogf = (proj_k - c_k) / S
            rows.append(xp.concatenate([xp.cross(Y, dp), dp, ((proj[:, :, k] - pp[k]) / S)[:, :, None]], -1))
        J = xp.concatenate(rows, 1)  # (B, 2N, 7)
        rr = xp.concatenate([r[:, :, 0], r[:, :, 1]], 1)
        Jw = J * xp.concatenate([w, w], 1)[:, :, None]
        H = Jw.transpose(0, 2, 1) @ J
        g = (Jw.transpose(0, 2, 1) @ rr[:, :, None])[:, :, 0]
        H = H + 2 * weights.focal * e6[:, None] * e6[None, :]
        g = g + 2 * weights.focal * (lf - lf0)[:, None] * e6
        if fix_focal:  # a known focal length: no step in log f (identity row and column, zero gradient)
            H = H * keep[:, None] * keep[None, :] + e6[:, None] * e6[None, :]
            g = g * keep
        tr = xp.trace(H, axis1=1, axis2=2)
        delta = -xp.linalg.solve(H + (1e-9 * tr)[:, None, None] * eye7, g[:, :, None])[:, :, 0]
        Rg[...] = R0.T @ rodrigues(delta[:, :3]) @ R0 @ Rg
        t[...] = t + delta[:, 3:6]
        lf[...] = lf + delta[:, 6]

    key = ("rigid", size, weights, fix_focal, X.shape, B)
    graph = StepGraph(xp, iteration, "fit: rigid initialisation", enabled=graphs, warm=(model, key))
    for _ in range(iters):
        graph()
    dt = model.v_template.dtype
    pose = xp.zeros((B, *POSE_SHAPE), dtype=dt)
    pose[:, 0] = rotation_to_axis_angle(Rg).astype(dt)
    # one buffer per variable for the batch; each image's state holds its own rows of them
    t_d, lf_d = t.astype(dt), lf.astype(dt)
    pp_d = xp.tile(pp.astype(dt), (B, 1))
    shape, expr = xp.zeros((B, model.n_shape), dtype=dt), xp.zeros((B, model.n_expr), dtype=dt)
    return [FitState(shape=shape[b], expr=expr[b], pose=pose[b], t=t_d[b], log_f=lf_d[b], pp=pp_d[b]) for b in range(B)]
