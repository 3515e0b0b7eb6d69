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

__all__ = ["init_rigid", "refine_rigid"]


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
    return refine_rigid(X, p, valid, uv.n_targets, Rg, t, math.log(f0), pp, size, weights, iters, model, fix_focal, graphs)


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
) -> FitState:
    """Gauss-Newton with IRLS on ``(lambda_uv / N) sum |r_v| + lambda_f (log f - log f0)^2``.

    Variables: a left rotation increment in camera axes, the camera translation and the
    log focal length; the template (zero shape/expression) is rigid here; ``valid``
    (0/1 per row) drops rows without a correspondence and ``n_targets`` is N. A fixed
    number of iterations (no convergence test, which would read the device); on CuPy an
    iteration is captured as a CUDA graph (``graphs``: :attr:`FitConfig.cuda_graphs`).
    """
    xp = get_array_module(X)
    R0 = constant(xp, FLAME_TO_OPENCV, xp.float64)
    height, width = size
    S = float(max(size))
    n = xp.maximum(xp.asarray(n_targets, dtype=xp.float64), 1.0)
    eye7 = xp.eye(7)
    # the variables live in buffers updated in place: on CuPy an iteration is a CUDA graph
    Rg = xp.array(Rg, dtype=xp.float64, copy=True)
    t = xp.array(t, dtype=xp.float64, copy=True)
    lf = xp.full((), lf0, dtype=xp.float64)

    def iteration() -> None:
        camera = Camera(focal=xp.exp(lf), principal=pp, R=R0 @ Rg, t=t, width=width, height=height)
        Y = X @ camera.R.T
        Xc = Y + t
        proj = camera.project_camera(Xc)
        r = (proj - p) / S
        rho = xp.sqrt((r * r).sum(1))
        w = valid * (weights.uv / n) / xp.maximum(rho, 1e-4) * (rho <= 4 * weights.uv_cap)  # outliers out
        dproj = camera.project_camera_jacobian(Xc) / S  # (N, 2, 3)
        rows = []
        for k in range(2):
            dp = dproj[:, k]
            # d/d(omega) of dp . (omega x Y) = Y x dp ; d/dt = dp ; d/dlogf = (proj_k - c_k) / S
            rows.append(xp.concatenate([xp.cross(Y, dp), dp, ((proj[:, k] - pp[k]) / S)[:, None]], 1))
        J = xp.concatenate(rows)
        rr = xp.concatenate([r[:, 0], r[:, 1]])
        ww = xp.concatenate([w, w])
        H = (J * ww[:, None]).T @ J
        g = (J * ww[:, None]).T @ rr
        H = H + 2 * weights.focal * eye7[6][:, None] * eye7[6][None, :]
        g = g + 2 * weights.focal * (lf - lf0) * eye7[6]
        if fix_focal:  # the focal length is known: no step in log f
            H = H * (1.0 - eye7[6])[:, None] * (1.0 - eye7[6])[None, :] + eye7[6][:, None] * eye7[6][None, :]
            g = g * (1.0 - eye7[6])
        delta = -xp.linalg.solve(H + 1e-9 * xp.trace(H) * eye7, g)
        Rg[...] = R0.T @ rodrigues(delta[None, :3])[0] @ R0 @ Rg
        t[...] = t + delta[3:6]
        lf[...] = lf + delta[6]

    key = ("rigid", size, weights, fix_focal, X.shape)
    graph = StepGraph(xp, iteration, "fit: rigid initialisation", enabled=graphs, warm=(model, key))
    for _ in range(iters):
        graph()
    dt = model.v_template.dtype
    pose = xp.zeros(POSE_SHAPE, dtype=dt)
    pose[0] = rotation_to_axis_angle(Rg).astype(dt)
    return FitState(
        shape=xp.zeros(model.n_shape, dtype=dt),
        expr=xp.zeros(model.n_expr, dtype=dt),
        pose=pose,
        t=t.astype(dt),
        log_f=lf.astype(dt),
        pp=pp.astype(dt),
    )
