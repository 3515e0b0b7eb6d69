"""FLAME forward model as pure functions over an array module, with analytic VJPs.

Every function takes all arrays it needs as arguments and works on NumPy or CuPy
(``xp = get_array_module(x)``). Semantics are those of the reference FLAME layer
(smplx ``FLAME`` + ``lbs``):

    v_shaped = v_template + shapedirs . [shape, expr]
    J        = J_regressor . v_shaped                       (expression moves joints)
    R_j      = rodrigues(pose_j)
    v_posed  = v_shaped + posedirs . concat_{j=1..4} vec(R_j - I)
    G_j      = G_parent(j) . [R_j | J_j - J_parent(j)]       (G_0 = [R_0 | J_0])
    A_j      = G_j . [I | -J_j]
    v        = sum_j w_vj A_j [v_posed; 1] + transl

The only deliberate difference from smplx is Rodrigues (:mod:`p3dmm.fitting.base.rotation`):
small angles use a Taylor series instead of adding 1e-8 to the rotation vector.

The functions take a :class:`~p3dmm.fitting.model.arrays.FlameArrays` (the arrays of a
model file) and :class:`~p3dmm.fitting.model.params.FlameParams`; the model object users
hold, :class:`~p3dmm.fitting.model.flame_model.FlameModel`, calls them.

On CuPy the kinematic chain, its VJP and the vertex Jacobian's assembly are fused
kernels (``lbs.cu``, :func:`~p3dmm.fitting.base.cuda.fused_kernels`); the NumPy code
here is their CPU twin.

The backward functions are vector-Jacobian products: given dL/dv they return dL/d
(shape, expr, pose, transl) without forming Jacobians. Cost is one transposed basis
product (15069 x 400) plus O(V) work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import cuda
from ..base.errors import InputError
from ..base.rotation import rodrigues, rodrigues_jvp, rodrigues_vjp
from ..base.xp import constant, get_array_module, to_numpy
from .arrays import FlameArrays
from .params import FLAME_PARENTS, FlameParams

__all__ = [
    "ForwardCache",
    "ParamGrads",
    "blend_shapes",
    "blend_shapes_vjp",
    "flame_forward",
    "flame_vjp",
    "landmarks_from_embedding",
    "lbs_skinning",
    "regress_joints",
    "rigid_transforms",
    "rigid_transforms_vjp",
    "shaped_vertices",
    "dynamic_contour_bins",
]


# -------------------------------------------------------------------- blend shapes
def blend_shapes(coeffs: Any, basis: Any) -> Any:
    """Linear blend shapes.

    Args:
        coeffs: ``(K,)`` coefficients.
        basis: ``(V, 3, K)`` blend-shape basis.

    Returns:
        ``(V, 3)`` offsets; ``out[v, i] = sum_k basis[v, i, k] * coeffs[k]``.
    """
    V = basis.shape[0]
    # out[(v, i)] = sum_k B[(v, i), k] * c[k]
    return (basis.reshape(V * 3, -1) @ coeffs).reshape(V, 3)


def blend_shapes_vjp(grad_offsets: Any, basis: Any) -> Any:
    """VJP of :func:`blend_shapes`: ``(V, 3)`` dL/doffsets -> ``(K,)`` dL/dcoeffs."""
    V = basis.shape[0]
    # g[k] = sum_(v, i) B[(v, i), k] * G[(v, i)]
    return grad_offsets.reshape(V * 3) @ basis.reshape(V * 3, -1)


def regress_joints(J_regressor: Any, vertices: Any) -> Any:
    """``(J, V) @ (V, 3) -> (J, 3)`` joint locations."""
    # J[j, i] = sum_v Jr[j, v] * verts[v, i]
    return J_regressor @ vertices


# -------------------------------------------------------------- kinematic chain
_MAX_JOINTS = 16  # LBS_MAX_JOINTS of lbs.cu


def _kernel_args(xp: Any, *arrays: Any) -> tuple[Any, str]:
    """``arrays`` as C-contiguous arrays of one float type, and that type's kernel suffix."""
    dt = arrays[0].dtype
    if any(a.dtype != dt for a in arrays) or dt not in (np.float32, np.float64):
        dt = np.dtype(np.float64)
    return tuple(cuda.kernel_array(xp, a, dt) for a in arrays), ("f32" if dt == np.float32 else "f64")


def _fuse_chain(xp: Any, parents: np.ndarray) -> bool:
    return cuda.fused_kernels(xp) and parents.shape[0] <= _MAX_JOINTS


def rigid_transforms(R: Any, J: Any, parents: np.ndarray) -> tuple[Any, Any, Any]:
    """World transforms of the joints and the skinning transforms.

    Args:
        R: ``(N, 3, 3)`` local joint rotations.
        J: ``(N, 3)`` rest joint locations.
        parents: ``(N,)`` host int array, ``parents[0] == -1`` and ``parents[i] < i``.

    Returns:
        (GR ``(N,3,3)``, Gt ``(N,3)``, At ``(N,3)``): the posed joint frames (Gt are the
        posed joint locations) and the translation of the skinning transforms
        ``A_j = G_j [I | -J_j] = [GR_j | At_j]`` (their rotation part is GR).
    """
    xp = get_array_module(R)
    n = R.shape[0]
    if _fuse_chain(xp, parents):
        (Rc, Jc), suf = _kernel_args(xp, R, J)
        GRk, Gtk, Atk = xp.empty((n, 3, 3), Rc.dtype), xp.empty((n, 3), Rc.dtype), xp.empty((n, 3), Rc.dtype)
        pa = constant(xp, parents, np.int32)
        cuda.launch("p3dmm.fitting.model", "lbs", f"lbs_chain_{suf}", 1, (Rc, Jc, pa, np.int32(n), GRk, Gtk, Atk))
        return GRk, Gtk, Atk
    GR = [None] * n
    Gt = [None] * n
    GR[0], Gt[0] = R[0], J[0]
    for i in range(1, n):
        p = int(parents[i])
        GR[i] = GR[p] @ R[i]
        Gt[i] = GR[p] @ (J[i] - J[p]) + Gt[p]
    GRa = xp.stack(GR)
    Gta = xp.stack(Gt)
    # At[j, i] = Gt[j, i] - sum_k GR[j, i, k] * J[j, k]
    At = Gta - xp.einsum("jik,jk->ji", GRa, J)
    return GRa, Gta, At


def rigid_transforms_vjp(
    R: Any, J: Any, parents: np.ndarray, GR: Any, grad_AR: Any, grad_At: Any, grad_Gt: Any | None = None
) -> tuple[Any, Any]:
    """VJP of :func:`rigid_transforms` w.r.t. ``R`` and ``J``.

    Args:
        R, J, parents: forward inputs.
        GR: ``(N, 3, 3)`` posed joint rotations from the forward pass.
        grad_AR: ``(N, 3, 3)`` dL/dAR.
        grad_At: ``(N, 3)`` dL/dAt.
        grad_Gt: optional ``(N, 3)`` dL/d(posed joint locations).

    Returns:
        (dL/dR ``(N, 3, 3)``, dL/dJ ``(N, 3)``).
    """
    xp = get_array_module(R)
    n = R.shape[0]
    if grad_Gt is None and _fuse_chain(xp, parents):
        (Rc, Jc, GRc, gARc, gAtc), suf = _kernel_args(xp, R, J, GR, grad_AR, grad_At)
        gR_k, gJ_k = xp.empty((n, 3, 3), Rc.dtype), xp.empty((n, 3), Rc.dtype)
        pa = constant(xp, parents, np.int32)
        args = (Rc, Jc, pa, GRc, gARc, gAtc, np.int32(n), gR_k, gJ_k)
        cuda.launch("p3dmm.fitting.model", "lbs", f"lbs_chain_vjp_{suf}", 1, args)
        return gR_k, gJ_k
    # A_t = Gt - GR J  ->  dGt += gAt ; dGR += gAR - gAt J^T ; dJ -= GR^T gAt
    gGt = [grad_At[j] + (grad_Gt[j] if grad_Gt is not None else 0.0) for j in range(n)]
    gGR = [grad_AR[j] - xp.outer(grad_At[j], J[j]) for j in range(n)]
    gJ = [-(GR[j].T @ grad_At[j]) for j in range(n)]
    gR = [None] * n
    for i in range(n - 1, 0, -1):
        p = int(parents[i])
        t_rel = J[i] - J[p]
        # GR_i = GR_p R_i ; Gt_i = GR_p t_rel + Gt_p
        gR[i] = GR[p].T @ gGR[i]
        g_trel = GR[p].T @ gGt[i]
        gGR[p] = gGR[p] + gGR[i] @ R[i].T + xp.outer(gGt[i], t_rel)
        gGt[p] = gGt[p] + gGt[i]
        gJ[i] = gJ[i] + g_trel
        gJ[p] = gJ[p] - g_trel
    gR[0] = gGR[0]
    gJ[0] = gJ[0] + gGt[0]
    return xp.stack(gR), xp.stack(gJ)


# ------------------------------------------------------------------- skinning
def lbs_skinning(weights: Any, AR: Any, At: Any, v_posed: Any) -> tuple[Any, Any, Any]:
    """Linear blend skinning.

    Args:
        weights: ``(V, N)`` skinning weights.
        AR: ``(N, 3, 3)``, At: ``(N, 3)`` skinning transforms.
        v_posed: ``(V, 3)`` rest-pose vertices with pose correctives.

    Returns:
        (vertices ``(V, 3)``, TR ``(V, 3, 3)``, Tt ``(V, 3)``) with the blended transforms.
    """
    n = AR.shape[0]
    V = v_posed.shape[0]
    # T[v, (i, k)] = sum_j w[v, j] * A[j, (i, k)]
    TR = (weights @ AR.reshape(n, 9)).reshape(V, 3, 3)
    Tt = weights @ At
    # out[v, i] = sum_k TR[v, i, k] * vp[v, k] + Tt[v, i]
    out = (TR * v_posed[:, None, :]).sum(-1) + Tt
    return out, TR, Tt


# ------------------------------------------------------------------ full model
@dataclass
class ForwardCache:
    """Intermediates of :func:`flame_forward` needed by :func:`flame_vjp`."""

    pose: Any
    R: Any
    J: Any
    GR: Any
    posed_joints: Any
    v_posed: Any
    TR: Any


@dataclass
class ParamGrads:
    """Gradients w.r.t. FLAME parameters (same layout as :class:`FlameParams`)."""

    shape: Any
    expr: Any
    pose: Any
    transl: Any

    def to_vector(self) -> Any:
        xp = get_array_module(self.shape)
        return xp.concatenate([self.shape.ravel(), self.expr.ravel(), self.pose.ravel(), self.transl.ravel()])


def _check_params(model: FlameArrays, params: FlameParams) -> None:
    want = {
        "shape": (model.n_shape,),
        "expr": (model.n_expr,),
        "pose": (model.parents.shape[0], 3),
        "transl": (3,),
    }
    for name, shp in want.items():
        got = tuple(getattr(params, name).shape)
        if got != shp:
            raise InputError(f"flame_forward: params.{name} has shape {got}, expected {shp} for {model.name!r}")


def flame_forward(
    model: FlameArrays, params: FlameParams, shaped: tuple[Any, Any] | None = None
) -> tuple[Any, ForwardCache]:
    """Posed FLAME vertices.

    Args:
        model: the FLAME arrays (NumPy or CuPy).
        params: parameters in the model's array module; cast to the model dtype.
        shaped: optional precomputed ``(v_shaped, J)`` from :func:`shaped_vertices` for
            these params' shape and expression (saves the basis product when only the
            pose changes).

    Returns:
        (vertices ``(V, 3)``, cache for :func:`flame_vjp`). ``cache.posed_joints`` are
        the posed joint locations without translation.
    """
    _check_params(model, params)
    xp = get_array_module(model.v_template)
    dt = model.v_template.dtype
    pose = params.pose.astype(dt)
    v_shaped, J = shaped if shaped is not None else shaped_vertices(model, params)
    R = rodrigues(pose)
    eye = xp.eye(3, dtype=dt)
    pose_feature = (R[1:] - eye).reshape(-1)
    v_posed = v_shaped + blend_shapes(pose_feature, model.posedirs)
    GR, Gt, At = rigid_transforms(R, J, model.parents)
    verts, TR, _ = lbs_skinning(model.lbs_weights, GR, At, v_posed)
    verts = verts + params.transl.astype(dt)
    return verts, ForwardCache(pose=pose, R=R, J=J, GR=GR, posed_joints=Gt, v_posed=v_posed, TR=TR)


def shaped_vertices(model: FlameArrays, params: FlameParams) -> tuple[Any, Any]:
    """Identity + expression shaped template ``(V, 3)`` and its joints ``(5, 3)``."""
    xp = get_array_module(model.v_template)
    dt = model.v_template.dtype
    coeffs = xp.concatenate([params.shape.astype(dt), params.expr.astype(dt)])
    v_shaped = model.v_template + blend_shapes(coeffs, model.shapedirs)
    return v_shaped, regress_joints(model.J_regressor, v_shaped)


def flame_vjp(model: FlameArrays, cache: ForwardCache, grad_vertices: Any) -> ParamGrads:
    """Vector-Jacobian product of :func:`flame_forward`.

    Args:
        model: the model used in the forward pass.
        cache: the forward cache.
        grad_vertices: ``(V, 3)`` dL/dvertices.

    Returns:
        dL/d(shape ``(n_shape,)``, expr ``(n_expr,)``, pose ``(5, 3)``, transl ``(3,)``).
    """
    xp = get_array_module(grad_vertices)
    V = model.n_vertices
    n = model.parents.shape[0]
    if tuple(grad_vertices.shape) != (V, 3):
        raise InputError(f"flame_vjp: grad_vertices has shape {tuple(grad_vertices.shape)}, expected ({V}, 3)")
    gV = grad_vertices.astype(model.v_template.dtype)
    g_transl = gV.sum(0)
    # v[v, i] = sum_k TR[v, i, k] vp[v, k] + Tt[v, i]
    g_vposed = (cache.TR * gV[:, :, None]).sum(1)  # g_vp[v, k] = sum_i TR[v, i, k] gV[v, i]
    # dL/dT[v, i, k] = gV[v, i] * vp[v, k] ;  dL/dA[j] = sum_v w[v, j] dL/dT[v]
    g_TR = (gV[:, :, None] * cache.v_posed[:, None, :]).reshape(V, 9)
    g_AR = (model.lbs_weights.T @ g_TR).reshape(n, 3, 3)
    g_At = model.lbs_weights.T @ gV
    g_R, g_J = rigid_transforms_vjp(cache.R, cache.J, model.parents, cache.GR, g_AR, g_At)
    # pose feature = vec(R_j - I), j = 1..n-1
    g_pf = blend_shapes_vjp(g_vposed, model.posedirs)
    g_R = g_R + xp.concatenate([xp.zeros((1, 3, 3), dtype=g_R.dtype), g_pf.reshape(n - 1, 3, 3)])
    g_pose = rodrigues_vjp(cache.pose, g_R)
    # v_shaped feeds v_posed directly and the joints through J = Jr v_shaped
    g_vshaped = g_vposed + model.J_regressor.T @ g_J
    g_coeffs = blend_shapes_vjp(g_vshaped, model.shapedirs)
    return ParamGrads(
        shape=g_coeffs[: model.n_shape],
        expr=g_coeffs[model.n_shape :],
        pose=g_pose,
        transl=g_transl,
    )


# ------------------------------------------------------------------ landmarks
def landmarks_from_embedding(vertices: Any, faces: Any, lmk_faces: Any, lmk_bary: Any) -> Any:
    """Barycentric landmarks.

    Args:
        vertices: ``(V, 3)``.
        faces: ``(F, 3)`` int.
        lmk_faces: ``(L,)`` face index per landmark.
        lmk_bary: ``(L, 3)`` barycentric weights.

    Returns:
        ``(L, 3)``; ``out[l] = sum_k bary[l, k] * vertices[faces[lmk_faces[l], k]]``.
    """
    xp = get_array_module(vertices)
    tri = vertices[faces[xp.asarray(lmk_faces)]]  # (L, 3, 3): corner k, coordinate i
    bary = xp.asarray(lmk_bary, dtype=vertices.dtype)
    return (bary[:, :, None] * tri).sum(1)


def dynamic_contour_bins(pose: Any, parents: np.ndarray = FLAME_PARENTS) -> int:
    """Yaw bin (0..78) of the dynamic contour embedding for a head pose.

    The yaw is taken from the composed rotation of the root and the neck (the chain
    from the neck up to the root), as DECA/FLAME's dynamic landmark selection does:
    yaw angle ``atan2(-R20, sqrt(R00^2 + R10^2))`` in degrees, negated, rounded and
    clipped to [-39, 39]; non-negative angles map to bins 0..39 and negative angles
    to 40..78 (``39 - angle``).

    Args:
        pose: ``(5, 3)`` axis-angle pose.

    Returns:
        The bin index as a Python int.
    """
    p = to_numpy(pose).astype(np.float64)
    Rs = rodrigues(p[:2])
    Rrel = Rs[0] @ Rs[1]
    sy = np.sqrt(Rrel[0, 0] ** 2 + Rrel[1, 0] ** 2)
    yaw = -np.degrees(np.arctan2(-Rrel[2, 0], sy))
    angle = int(np.round(min(yaw, 39.0)))
    if angle < 0:
        angle = 78 if angle < -39 else 39 - angle
    return angle


# ------------------------------------------------------------------ Jacobians
_JS_CACHE: "dict[int, tuple[Any, Any]]" = {}


def _joint_shape_basis(model: FlameArrays) -> Any:
    """``(5, 3, K)`` derivative of the joints w.r.t. the blend-shape coefficients (cached)."""
    key = id(model.shapedirs)
    hit = _JS_CACHE.get(key)
    if hit is not None and hit[0] is model.shapedirs:
        return hit[1]
    V = model.n_vertices
    # dJ[j, i, k] = sum_v Jr[j, v] * S[v, i, k]
    js = (model.J_regressor @ model.shapedirs.reshape(V, -1)).reshape(model.J_regressor.shape[0], 3, -1)
    _JS_CACHE.clear()
    _JS_CACHE[key] = (model.shapedirs, js)
    return js


def flame_jacobian(model: FlameArrays, cache: ForwardCache, vertex_ids: Any = None) -> Any:
    """Exact Jacobian of posed vertices w.r.t. ``[shape, expr, pose (15)]``.

    Forward-mode differentiation of :func:`flame_forward` (translation columns are the
    identity and are omitted). The coefficient columns include the joints' dependence on
    shape and expression through ``J_regressor``.

    Args:
        model: the model of the forward pass.
        cache: its :class:`ForwardCache`.
        vertex_ids: optional ``(M,)`` vertex subset (default: all vertices).

    Returns:
        ``(M, 3, n_shape + n_expr + 15)`` in the model dtype.
    """
    xp = get_array_module(model.v_template)
    dt = model.v_template.dtype
    n = model.parents.shape[0]
    parents = model.parents
    sel = slice(None) if vertex_ids is None else vertex_ids
    W = model.lbs_weights[sel]
    TR = cache.TR[sel]
    vp = cache.v_posed[sel]
    M = W.shape[0]
    R, J, GR = cache.R, cache.J, cache.GR

    # --- blend-shape coefficients: rotations fixed, joints move (dJ = Jr S)
    dJ = _joint_shape_basis(model)  # (n, 3, K)
    if _fuse_chain(xp, parents):
        return _flame_jacobian_fused(model, cache, vertex_ids, dJ)
    dGt = [dJ[0]] + [None] * (n - 1)
    for i in range(1, n):
        p = int(parents[i])
        dGt[i] = GR[p] @ (dJ[i] - dJ[p]) + dGt[p]
    dAt = xp.stack([dGt[j] - GR[j] @ dJ[j] for j in range(n)])  # (n, 3, K)
    K = dAt.shape[-1]
    # Jc[v, i, k] = sum_l TR[v, i, l] S[v, l, k] + sum_j W[v, j] dAt[j, i, k]
    Jc = TR @ model.shapedirs[sel] + (W @ dAt.reshape(n, 3 * K)).reshape(M, 3, K)

    # --- pose: one direction per axis-angle component
    eye = xp.eye(3 * n, dtype=dt).reshape(3 * n, n, 3)
    dR = rodrigues_jvp(cache.pose, eye)  # (15, n, 3, 3), only joint i of direction 3i+a is non-zero
    dGR = [dR[:, 0]] + [None] * (n - 1)
    dGtp = [xp.zeros((3 * n, 3), dtype=dt)] + [None] * (n - 1)
    for i in range(1, n):
        p = int(parents[i])
        t_rel = J[i] - J[p]
        dGR[i] = dGR[p] @ R[i] + GR[p] @ dR[:, i]
        dGtp[i] = dGR[p] @ t_rel + dGtp[p]
    dGRa = xp.stack(dGR, 1)  # (15, n, 3, 3)
    dAtp = xp.stack(dGtp, 1) - (dGRa @ J[None, :, :, None])[..., 0]  # (15, n, 3)
    D = 3 * n
    # dTR[d, v] = sum_j W[v, j] dGR[d, j]
    dTR = (W @ dGRa.transpose(1, 0, 2, 3).reshape(n, D * 9)).reshape(M, D, 3, 3)
    dTt = (W @ dAtp.transpose(1, 0, 2).reshape(n, D * 3)).reshape(M, D, 3)
    dpf = dR[:, 1:].reshape(D, 9 * (n - 1))  # pose-feature derivative
    V = model.n_vertices
    dvp = (model.posedirs.reshape(V * 3, -1) @ dpf.T).reshape(V, 3, D)[sel]  # (M, 3, D)
    # dv[v, i, d] = sum_l dTR[v, d, i, l] vp[v, l] + dTt[v, d, i] + sum_l TR[v, i, l] dvp[v, l, d]
    Jp = (dTR @ vp[:, None, :, None])[..., 0].transpose(0, 2, 1) + dTt.transpose(0, 2, 1) + TR @ dvp
    return xp.concatenate([Jc, Jp], axis=2).astype(dt)


def _flame_jacobian_fused(model: FlameArrays, cache: ForwardCache, vertex_ids: Any, dJ: Any) -> Any:
    """:func:`flame_jacobian` on CuPy in five launches (``lbs.cu``): the Rodrigues JVP, the
    chain over the joints for every column, the pose correctives' product (cuBLAS) and
    the rows' assembly, written straight into the result."""
    xp = get_array_module(model.v_template)
    n, K = model.parents.shape[0], dJ.shape[-1]
    D = 3 * n
    V = model.n_vertices
    eye = constant(xp, np.eye(D).reshape(D, n, 3), model.v_template.dtype)
    dR = rodrigues_jvp(cache.pose, eye)  # (D, n, 3, 3)
    (R, J, GR, dJc, dRc), suf = _kernel_args(xp, cache.R, cache.J, cache.GR, dJ, dR)
    dt = R.dtype
    dAt, dGR, dAtp = xp.empty((n, 3, K), dt), xp.empty((D, n, 3, 3), dt), xp.empty((D, n, 3), dt)
    pa = constant(xp, model.parents, np.int32)
    args = (R, J, GR, dJc, dRc, pa, np.int32(n), np.int32(K), np.int32(D), dAt, dGR, dAtp)
    cuda.launch("p3dmm.fitting.model", "lbs", f"lbs_jacobian_chain_{suf}", K + D, args)
    dpf = dRc[:, 1:].reshape(D, 9 * (n - 1))  # pose-feature derivative
    dvp = (model.posedirs.reshape(V * 3, -1) @ dpf.T).reshape(V, 3, D)
    vids = constant(xp, np.arange(V), np.int64) if vertex_ids is None else vertex_ids
    M = vids.shape[0]
    (W, TR, vp, S, dvp), _ = _kernel_args(xp, model.lbs_weights, cache.TR, cache.v_posed, model.shapedirs, dvp)
    out = xp.empty((M, 3, K + D), dt)
    row_args = (cuda.kernel_array(xp, vids, np.int64), np.int32(M), np.int32(n), np.int32(K), np.int32(D),
                W, TR, vp, S, dAt, dGR, dAtp, dvp, out)  # fmt: skip
    cuda.launch("p3dmm.fitting.model", "lbs", f"lbs_vertex_jacobian_{suf}", M * 3 * (K + D), row_args)
    return out if out.dtype == model.v_template.dtype else out.astype(model.v_template.dtype)
