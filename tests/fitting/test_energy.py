"""Analytic gradient of every fitting energy term against finite differences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from p3dmm.fitting.fitter.energy import EnergyWeights, evaluate_energy
from p3dmm.fitting.fitter.state import FitState, Frame, NormalTargets, UVTargets

from .flame_fixtures import random_flame_model


def _setup(space: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    model = random_flame_model(seed=seed, dtype=np.float64)
    state = FitState(
        shape=rng.normal(size=model.n_shape),
        expr=rng.normal(size=model.n_expr),
        pose=rng.normal(scale=0.3, size=(5, 3)),
        t=np.array([0.01, -0.02, 1.0]),
        log_f=np.array(np.log(500.0)),
        pp=np.array([31.0, 33.0]),
    )
    H = W = 64
    ids = rng.choice(model.n_vertices, 40, replace=False)
    from p3dmm.fitting.model.lbs import flame_forward

    verts = flame_forward(model, state.params())[0]
    proj = state.camera(W, H).project(verts[ids])
    uv = UVTargets(vertex_ids=ids, pixels=proj + rng.normal(scale=3.0, size=proj.shape), n_targets=40)
    face_id = rng.integers(-1, model.n_faces, size=(16, 16)).astype(np.int32)
    bary = rng.random((16, 16, 3))
    bary /= bary.sum(-1, keepdims=True)
    n_obs = rng.normal(size=(16, 16, 3))
    n_obs /= np.linalg.norm(n_obs, axis=-1, keepdims=True)
    normals = NormalTargets(normals=n_obs, mask=rng.random((16, 16)) < 0.8, space=space)
    frame = Frame(face_id=face_id, bary=bary, visible=rng.random(40) < 0.9)
    # outlier cut off for random normals: every covered pixel takes part
    weights = EnergyWeights(normal_outlier=10.0)
    return model, state, uv, normals, frame, weights, (H, W)


@pytest.mark.parametrize("space", ["camera", "head"])
@pytest.mark.parametrize("term", ["uv", "normal", "reg"])
def test_energy_gradient_matches_finite_differences(space, term):
    model, state, uv, normals, frame, w, size = _setup(space)
    zero = dict(uv=0.0, normal=0.0, identity=0.0, expression=0.0, jaw=0.0, neck=0.0, eyes=0.0, principal=0.0, focal=0.0)
    keep = {"uv": ["uv"], "normal": ["normal"], "reg": ["identity", "expression", "jaw", "neck", "eyes", "principal", "focal"]}[term]
    for k in keep:
        zero.pop(k)
    from dataclasses import replace

    w = replace(w, **zero)
    prior = np.linspace(-1, 1, model.n_shape)
    kw = dict(shape_prior=prior, focal_prior=float(np.log(450.0)), pp_prior=np.array([32.0, 32.0]))
    e = evaluate_energy(model, state, uv, normals, frame, w, size, **kw)
    assert e.total > 0
    grad = e.grad.to_vector()
    x0 = state.to_vector()
    eps = 1e-6
    num = np.zeros_like(x0)
    for k in range(x0.size):
        xp_, xm = x0.copy(), x0.copy()
        xp_[k] += eps
        xm[k] -= eps
        ep = evaluate_energy(model, state.from_vector(xp_), uv, normals, frame, w, size, with_grad=False, **kw).total
        em = evaluate_energy(model, state.from_vector(xm), uv, normals, frame, w, size, with_grad=False, **kw).total
        num[k] = (ep - em) / (2 * eps)
    err = np.abs(grad - num).max() / np.abs(num).max()
    assert err < 1e-5, f"{term}/{space}: relative error {err:.2e}"


@pytest.mark.parametrize("space", ["camera", "head"])
def test_energy_and_gradient_match_torch_autograd(space):
    torch = pytest.importorskip("torch")
    from tests.torch_reference import torch_energy

    model, state, uv, normals, frame, w, size = _setup(space, seed=2)
    kw = dict(shape_prior=np.linspace(-1, 1, model.n_shape), focal_prior=float(np.log(450.0)), pp_prior=np.array([32.0, 32.0]))
    e = evaluate_energy(model, state, uv, normals, frame, w, size, **kw)
    tens = {n: torch.tensor(np.asarray(getattr(state, n), dtype=np.float64), requires_grad=True) for n in FitState.NAMES}
    te = torch_energy(model, *(tens[n] for n in FitState.NAMES), uv, normals, frame, w, size, **kw)
    te.backward()
    assert e.total == pytest.approx(float(te.detach()), rel=1e-10)
    for n in FitState.NAMES:
        ref = tens[n].grad.numpy()
        got = np.asarray(getattr(e.grad, n))
        np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-9 * max(np.abs(ref).max(), 1e-3), err_msg=n)


@pytest.mark.parametrize("space", ["camera", "head"])
def test_dense_pixel_mode_equals_gathered_pixels(space):
    """The GPU's sync-free dense evaluation of L_n (all pixels, 0/1 weights) equals the
    CPU's gather of covered pixels, value and gradient."""
    model, state, uv, normals, frame, w, size = _setup(space, seed=6)
    w = dataclasses.replace(w, normal_outlier=0.9)  # some pixels cut as outliers too
    a = evaluate_energy(model, state, uv, normals, frame, w, size, dense_pixels=False)
    b = evaluate_energy(model, state, uv, normals, frame, w, size, dense_pixels=True)
    assert a.to_dict() == pytest.approx(b.to_dict(), rel=1e-12)
    assert 0 < a.to_dict()["n_normal_active"] < int(normals.mask.sum())
    np.testing.assert_allclose(b.grad.to_vector(), a.grad.to_vector(), rtol=1e-10, atol=1e-14)
