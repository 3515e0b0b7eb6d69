"""FLAME forward and VJPs against torch.autograd (tests only) and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting import FlameParams
from p3dmm.fitting.model.lbs import (
    dynamic_contour_bins,
    flame_forward,
    flame_vjp,
    landmarks_from_embedding,
    rodrigues,
    rodrigues_vjp,
)

from .flame_fixtures import random_flame_model, random_params

torch = pytest.importorskip("torch")

from tests.torch_reference import torch_flame  # noqa: E402


def _as_torch(params: FlameParams):
    return [torch.tensor(np.asarray(getattr(params, n)), requires_grad=True) for n in ("shape", "expr", "pose", "transl")]


@pytest.mark.parametrize("pose_scale", [0.0, 1e-4, 0.4, 1.5])
def test_forward_and_vjp_match_torch_autograd(pose_scale):
    model = random_flame_model(seed=3, dtype=np.float64)
    params = random_params(model, seed=4, pose_scale=pose_scale)
    verts, cache = flame_forward(model, params)
    tp = _as_torch(params)
    tv = torch_flame(model, *tp)
    np.testing.assert_allclose(verts, tv.detach().numpy(), rtol=1e-10, atol=1e-12)

    g = np.random.default_rng(5).normal(size=verts.shape)
    (tv * torch.as_tensor(g)).sum().backward()
    ours = flame_vjp(model, cache, g)
    for name, t in zip(("shape", "expr", "pose", "transl"), tp):
        ref = t.grad.numpy()
        got = getattr(ours, name)
        err = np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-12)
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"


def test_vjp_matches_finite_differences():
    model = random_flame_model(seed=7, dtype=np.float64)
    params = random_params(model, seed=8, pose_scale=0.5)
    verts, cache = flame_forward(model, params)
    g = np.random.default_rng(9).normal(size=verts.shape)
    grad = flame_vjp(model, cache, g).to_vector()
    x0 = params.to_vector()
    eps = 1e-6
    num = np.empty_like(x0)
    for k in range(x0.size):
        xp_, xm = x0.copy(), x0.copy()
        xp_[k] += eps
        xm[k] -= eps
        fp = (flame_forward(model, FlameParams.from_vector(xp_, model.n_shape, model.n_expr))[0] * g).sum()
        fm = (flame_forward(model, FlameParams.from_vector(xm, model.n_shape, model.n_expr))[0] * g).sum()
        num[k] = (fp - fm) / (2 * eps)
    err = np.abs(grad - num).max() / np.abs(num).max()
    assert err <= 1e-5, err


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-3, 9e-3, 1.1e-2, 0.5, 3.0])
def test_rodrigues_and_vjp(scale):
    rng = np.random.default_rng(0)
    r = rng.normal(size=(6, 3)) * scale
    R = rodrigues(r)
    tr = torch.tensor(r, requires_grad=True)
    z = torch.zeros_like(tr[:, 0])
    K = torch.stack(
        [torch.stack([z, -tr[:, 2], tr[:, 1]], -1), torch.stack([tr[:, 2], z, -tr[:, 0]], -1),
         torch.stack([-tr[:, 1], tr[:, 0], z], -1)], -2)
    TR = torch.linalg.matrix_exp(K)
    np.testing.assert_allclose(R, TR.detach().numpy(), atol=1e-14)
    np.testing.assert_allclose(R @ np.swapaxes(R, 1, 2), np.broadcast_to(np.eye(3), R.shape), atol=1e-14)
    G = rng.normal(size=(6, 3, 3))
    (TR * torch.as_tensor(G)).sum().backward()
    np.testing.assert_allclose(rodrigues_vjp(r, G), tr.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_float32_default_path_close_to_float64():
    m64 = random_flame_model(seed=11, dtype=np.float64)
    m32 = m64.astype(np.float32)
    p = random_params(m64, seed=12)
    v64 = flame_forward(m64, p)[0]
    v32, cache = flame_forward(m32, p.astype(np, np.float32))
    assert v32.dtype == np.float32
    np.testing.assert_allclose(v32, v64, atol=2e-6)
    g = flame_vjp(m32, cache, np.ones_like(v32))
    assert g.shape.dtype == np.float32 and g.pose.dtype == np.float32


def test_zero_params_give_template_and_translation_is_rigid(small_model):
    p = small_model.zero_params()
    np.testing.assert_allclose(small_model.vertices(p), small_model.v_template, atol=1e-12)
    p.transl = np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(small_model.vertices(p), small_model.v_template + p.transl, atol=1e-12)


def test_neutral_vertices_drop_expression_and_pose(small_model):
    p = random_params(small_model)
    neutral = small_model.neutral_vertices(p)
    q = small_model.zero_params()
    q.shape = p.shape
    np.testing.assert_allclose(neutral, small_model.vertices(q))


def test_bad_param_shapes_raise_named_error(small_model):
    from p3dmm.fitting import InputError

    p = small_model.zero_params()
    p.expr = np.zeros(3)
    with pytest.raises(InputError, match=r"params\.expr has shape \(3,\), expected \(6,\)"):
        small_model.vertices(p)


def test_landmarks_are_barycentric_points(small_model):
    v = small_model.v_template
    faces = small_model.faces
    lf = np.array([0, 5, 9])
    bary = np.array([[1, 0, 0], [0.2, 0.3, 0.5], [0, 0, 1.0]])
    lm = landmarks_from_embedding(v, faces, lf, bary)
    np.testing.assert_allclose(lm[0], v[faces[0, 0]])
    np.testing.assert_allclose(lm[1], 0.2 * v[faces[5, 0]] + 0.3 * v[faces[5, 1]] + 0.5 * v[faces[5, 2]])
    np.testing.assert_allclose(lm[2], v[faces[9, 2]])


def test_dynamic_contour_bins():
    pose = np.zeros((5, 3))
    assert dynamic_contour_bins(pose) == 0
    pose[0, 1] = np.radians(-20)  # yaw about +y
    b_neg = dynamic_contour_bins(pose)
    pose[0, 1] = np.radians(20)
    b_pos = dynamic_contour_bins(pose)
    assert {b_neg, b_pos} == {20, 59}
    pose[0, 1] = np.radians(80)
    assert dynamic_contour_bins(pose) in (39, 78)


def test_flame_jacobian_matches_vjp_and_finite_differences():
    from p3dmm.fitting.model.lbs import flame_jacobian

    model = random_flame_model(seed=21, dtype=np.float64)
    params = random_params(model, seed=22, pose_scale=0.5)
    verts, cache = flame_forward(model, params)
    Jv = flame_jacobian(model, cache)
    n_c = model.n_shape + model.n_expr
    assert Jv.shape == (model.n_vertices, 3, n_c + 15)
    # J^T g equals the VJP (shape, expr, pose)
    g = np.random.default_rng(23).normal(size=verts.shape)
    vjp = flame_vjp(model, cache, g)
    JTg = np.einsum("vik,vi->k", Jv, g)
    ref = np.concatenate([vjp.shape, vjp.expr, vjp.pose.ravel()])
    np.testing.assert_allclose(JTg, ref, rtol=1e-9, atol=1e-12)
    # columns against central differences
    x0 = params.to_vector()
    eps = 1e-6
    for k in [0, 5, model.n_shape + 2, n_c, n_c + 4, n_c + 7, n_c + 14]:
        d = np.zeros_like(x0)
        d[k] = eps
        vp_ = flame_forward(model, FlameParams.from_vector(x0 + d, model.n_shape, model.n_expr))[0]
        vm = flame_forward(model, FlameParams.from_vector(x0 - d, model.n_shape, model.n_expr))[0]
        np.testing.assert_allclose(Jv[:, :, k], (vp_ - vm) / (2 * eps), rtol=1e-6, atol=1e-9)
    # subset of vertices
    ids = np.array([3, 7, 50])
    np.testing.assert_allclose(flame_jacobian(model, cache, ids), Jv[ids])


def test_rotation_to_axis_angle_inverts_rodrigues():
    from p3dmm.fitting.base.rotation import rotation_to_axis_angle

    rng = np.random.default_rng(30)
    axes = rng.normal(size=(40, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate([rng.uniform(0, np.pi, 34), [0.0, 1e-9, 1e-4, np.pi - 1e-6, np.pi, 2.0]])
    for axis, ang in zip(axes, angles):
        r = axis * ang
        R = rodrigues(r[None])[0]
        back = rotation_to_axis_angle(R)
        np.testing.assert_allclose(rodrigues(back[None])[0], R, atol=1e-9)
        assert np.linalg.norm(back) <= np.pi + 1e-9
        if 1e-6 < ang < np.pi - 1e-3:
            np.testing.assert_allclose(back, r, atol=1e-8)
