"""Rotations as pure functions over an array module: Rodrigues, its VJP and JVP, the inverse.

Small angles use a Taylor series, which is exact to float64 round-off and has a
well-defined derivative at zero (smplx instead adds 1e-8 to the rotation vector; the
two differ by < 1e-7 in any rotation entry). Every function works on NumPy or CuPy
(``xp = get_array_module(x)``) and never reads a device array on the host.

On CuPy each function is one fused kernel (``rotation.cu``, :func:`~.cuda.fused_kernels`)
instead of a chain of 40-80 element-wise launches; the NumPy code here is its CPU twin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import cuda
from .xp import get_array_module

__all__ = ["rodrigues", "rodrigues_jvp", "rodrigues_vjp", "rotation_to_axis_angle", "skew"]

# Below this angle (radians) the Rodrigues coefficients use their Taylor series.
_TAYLOR_THETA = 1e-2


def _rodrigues_coeffs(theta: Any, xp: Any) -> tuple[Any, Any, Any, Any]:
    """Coefficients of R = I + a K + b K^2 and their scaled derivatives.

    Args:
        theta: ``(N,) float64`` rotation angles.

    Returns:
        a = sin t / t, b = (1 - cos t) / t^2, c = a'(t) / t, d = b'(t) / t, each ``(N,)``.
    """
    small = theta < _TAYLOR_THETA
    t = xp.where(small, 1.0, theta)  # avoid 0/0 on the unused branch
    t2 = theta * theta
    s, co = xp.sin(t), xp.cos(t)
    a = xp.where(small, 1.0 - t2 / 6.0 + t2 * t2 / 120.0, s / t)
    b = xp.where(small, 0.5 - t2 / 24.0 + t2 * t2 / 720.0, (1.0 - co) / (t * t))
    c = xp.where(small, -1.0 / 3.0 + t2 / 30.0 - t2 * t2 / 840.0, (t * co - s) / t**3)
    d = xp.where(small, -1.0 / 12.0 + t2 / 180.0 - t2 * t2 / 6720.0, (t * s - 2.0 * (1.0 - co)) / t**4)
    return a, b, c, d


def _fused(xp: Any, kernel: str, n_threads: int, arrays: tuple[Any, ...], ints: tuple[int, ...], out_shape: tuple[int, ...]) -> Any:
    """Run ``rot_<kernel>`` of ``rotation.cu`` on ``arrays`` (cast to one float type); returns its output."""
    f32 = all(a.dtype == xp.float32 for a in arrays)
    dt = xp.float32 if f32 else xp.float64
    args = [cuda.kernel_array(xp, a, dt) for a in arrays]
    out = xp.empty(out_shape, dtype=dt)
    tail = tuple(np.int32(v) for v in ints)
    cuda.launch("p3dmm.fitting.base", "rotation", f"rot_{kernel}_{'f32' if f32 else 'f64'}", n_threads, (*args, *tail, out))
    return out


def _cast(a: Any, dtype: Any) -> Any:
    """``a`` in ``dtype`` (no operation when it already is)."""
    return a if a.dtype == dtype else a.astype(dtype)


def skew(r: Any) -> Any:
    """``(N, 3)`` -> ``(N, 3, 3)`` cross-product matrices, ``skew(r) @ x = r x x``."""
    xp = get_array_module(r)
    z = xp.zeros_like(r[:, 0])
    x, y, w = r[:, 0], r[:, 1], r[:, 2]
    return xp.stack(
        [xp.stack([z, -w, y], -1), xp.stack([w, z, -x], -1), xp.stack([-y, x, z], -1)],
        axis=-2,
    )


def rodrigues(rvec: Any) -> Any:
    """Axis-angle vectors to rotation matrices.

    Args:
        rvec: ``(N, 3)`` axis-angle vectors (angle = norm, radians).

    Returns:
        ``(N, 3, 3)`` rotation matrices in the dtype of ``rvec``.
    """
    xp = get_array_module(rvec)
    if cuda.fused_kernels(xp):
        n = rvec.shape[0]
        return _cast(_fused(xp, "rodrigues", n, (rvec,), (n,), (n, 3, 3)), rvec.dtype)
    r = rvec.astype(xp.float64)
    theta = xp.sqrt((r * r).sum(-1))
    a, b, _, _ = _rodrigues_coeffs(theta, xp)
    K = skew(r)
    eye = xp.eye(3, dtype=xp.float64)
    R = eye + a[:, None, None] * K + b[:, None, None] * (K @ K)
    return R.astype(rvec.dtype)


def rodrigues_vjp(rvec: Any, grad_R: Any) -> Any:
    """Vector-Jacobian product of :func:`rodrigues`.

    With K = skew(r), R = I + a K + b K^2 and K^2 = r r^T - t^2 I:
    ``dL/dr = c <G,K> r + a w(G) + d <G,K^2> r + b (G r + G^T r - 2 tr(G) r)``
    where ``w(G) = (G21 - G12, G02 - G20, G10 - G01)`` satisfies ``<G, skew(v)> = v . w(G)``.

    Args:
        rvec: ``(N, 3)`` axis-angle vectors.
        grad_R: ``(N, 3, 3)`` dL/dR.

    Returns:
        ``(N, 3)`` dL/drvec in the dtype of ``rvec``.
    """
    xp = get_array_module(rvec)
    if cuda.fused_kernels(xp):
        n = rvec.shape[0]
        return _cast(_fused(xp, "rodrigues_vjp", n, (rvec, grad_R), (n,), (n, 3)), rvec.dtype)
    r = rvec.astype(xp.float64)
    G = grad_R.astype(xp.float64)
    theta = xp.sqrt((r * r).sum(-1))
    a, b, c, d = _rodrigues_coeffs(theta, xp)
    w = xp.stack([G[:, 2, 1] - G[:, 1, 2], G[:, 0, 2] - G[:, 2, 0], G[:, 1, 0] - G[:, 0, 1]], -1)
    trG = G[:, 0, 0] + G[:, 1, 1] + G[:, 2, 2]
    Gr = xp.einsum("nij,nj->ni", G, r)  # (G r)[n, i] = sum_j G[n, i, j] r[n, j]
    GTr = xp.einsum("nji,nj->ni", G, r)  # (G^T r)[n, i] = sum_j G[n, j, i] r[n, j]
    rGr = (r * Gr).sum(-1)
    g_K = (r * w).sum(-1)  # <G, K>
    g_K2 = rGr - theta * theta * trG  # <G, r r^T - t^2 I>
    out = (
        (c * g_K + d * g_K2 - 2.0 * b * trG)[:, None] * r
        + a[:, None] * w
        + b[:, None] * (Gr + GTr)
    )
    return out.astype(rvec.dtype)


def rodrigues_jvp(rvec: Any, direction: Any) -> Any:
    """Directional derivative of :func:`rodrigues`.

    Args:
        rvec: ``(N, 3)`` axis-angle vectors.
        direction: ``(D, N, 3)`` tangent directions.

    Returns:
        ``(D, N, 3, 3)``: ``dR = c (r.d) K + a [d]x + d_ (r.d) K^2 + b ([d]x K + K [d]x)``.
    """
    xp = get_array_module(rvec)
    if cuda.fused_kernels(xp):
        D, n = direction.shape[0], rvec.shape[0]
        out = _fused(xp, "rodrigues_jvp", D * n, (rvec, direction), (n, D), (D, n, 3, 3))
        return _cast(out, rvec.dtype)
    r = rvec.astype(xp.float64)
    dirs = direction.astype(xp.float64)
    theta = xp.sqrt((r * r).sum(-1))
    a, b, c, d = _rodrigues_coeffs(theta, xp)
    K = skew(r)  # (N, 3, 3)
    D = dirs.shape[0]
    Kd = skew(dirs.reshape(-1, 3)).reshape(D, -1, 3, 3)
    rd = (dirs * r).sum(-1)  # (D, N)
    out = (
        (c * rd)[..., None, None] * K
        + a[None, :, None, None] * Kd
        + (d * rd)[..., None, None] * (K @ K)
        + b[None, :, None, None] * (Kd @ K + K @ Kd)
    )
    return out.astype(rvec.dtype)


def rotation_to_axis_angle(R: Any) -> Any:
    """Inverse of :func:`rodrigues`: ``(..., 3, 3)`` rotations -> ``(..., 3)`` axis-angle.

    Through the unit quaternion (Shepperd's choice of the largest of w, x, y, z, made
    with array selects so that CuPy input is never read on the host); the angle is in
    [0, pi].
    """
    xp = get_array_module(R)
    lead = tuple(R.shape[:-2])
    if cuda.fused_kernels(xp):
        n = int(np.prod(lead, dtype=np.int64))
        out = _fused(xp, "axis_angle", n, (R.reshape(n, 3, 3),), (n,), (n, 3))
        return _cast(out.reshape(*lead, 3), R.dtype)
    r = R.astype(xp.float64)
    r00, r01, r02 = r[..., 0, 0], r[..., 0, 1], r[..., 0, 2]
    r10, r11, r12 = r[..., 1, 0], r[..., 1, 1], r[..., 1, 2]
    r20, r21, r22 = r[..., 2, 0], r[..., 2, 1], r[..., 2, 2]
    t = r00 + r11 + r22
    d = xp.stack([t, r00, r11, r22], -1)
    # candidate quaternions (w, x, y, z), one per largest component
    s0 = xp.sqrt(xp.maximum(1.0 + t, 1e-12)) * 2.0
    s1 = xp.sqrt(xp.maximum(1.0 + r00 - r11 - r22, 1e-12)) * 2.0
    s2 = xp.sqrt(xp.maximum(1.0 - r00 + r11 - r22, 1e-12)) * 2.0
    s3 = xp.sqrt(xp.maximum(1.0 - r00 - r11 + r22, 1e-12)) * 2.0
    cands = xp.stack(
        [
            xp.stack([0.25 * s0, (r21 - r12) / s0, (r02 - r20) / s0, (r10 - r01) / s0], -1),
            xp.stack([(r21 - r12) / s1, 0.25 * s1, (r01 + r10) / s1, (r02 + r20) / s1], -1),
            xp.stack([(r02 - r20) / s2, (r01 + r10) / s2, 0.25 * s2, (r12 + r21) / s2], -1),
            xp.stack([(r10 - r01) / s3, (r02 + r20) / s3, (r12 + r21) / s3, 0.25 * s3], -1),
        ],
        -2,
    )  # (..., 4 candidates, 4)
    q = xp.take_along_axis(cands, xp.argmax(d, -1)[..., None, None], axis=-2)[..., 0, :]
    q = q * xp.where(q[..., :1] < 0, -1.0, 1.0)  # w >= 0: angle in [0, pi]
    v = q[..., 1:]
    n_v = xp.sqrt((v * v).sum(-1, keepdims=True))
    w = q[..., :1]
    angle = 2.0 * xp.arctan2(n_v, w)
    scale = xp.where(n_v > 1e-12, angle / xp.maximum(n_v, 1e-300), 2.0 / xp.maximum(w, 1e-300))
    return (v * scale).astype(R.dtype)
