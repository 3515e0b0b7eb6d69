"""The fast solver's Gauss-Newton system: Jacobians against finite differences, fixed-shape vs gathered."""

from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting import FitConfig
from p3dmm.fitting.base.camera import FLAME_TO_OPENCV
from p3dmm.fitting.base.rotation import rodrigues
from p3dmm.fitting.fitter.energy import rendered_normals
from p3dmm.fitting.fitter.fast import normal_equations, normal_jacobian
from p3dmm.fitting.fitter.problem import FitProblem
from p3dmm.fitting.model.lbs import flame_forward

from .test_energy import _setup


@pytest.mark.parametrize("space", ["camera", "head"])
def test_normal_jacobian_matches_finite_differences(space):
    model, state, uv, normals, frame, w, size = _setup(space, seed=4)
    problem = FitProblem(model, FitConfig(weights=w), uv, normals, size, None, 0.0, np.array([32.0, 32.0]))
    cover = (frame.face_id >= 0) & normals.mask
    pix = np.nonzero(cover.reshape(-1))[0]

    def n_out(st):
        verts = flame_forward(model, st.params())[0]
        R_out = rodrigues(st.pose[:1])[0].T if space == "head" else FLAME_TO_OPENCV
        return rendered_normals(verts, model.faces, frame.face_id, frame.bary, pix, R_out)

    verts, cache = flame_forward(model, state.params())
    R_out = rodrigues(state.pose[:1])[0].T if space == "head" else FLAME_TO_OPENCV
    _, u, _, corners = n_out(state)
    from p3dmm.fitting.fitter.fast import VertexJacobian

    Jn = normal_jacobian(problem, verts, VertexJacobian(model, cache), frame, pix, corners, u, R_out, state, space)
    nf = model.n_shape + model.n_expr + 15
    assert Jn.shape == (pix.size, 3, nf)
    x0 = state.to_vector()
    eps = 1e-6
    for k in range(nf):
        d = np.zeros_like(x0)
        d[k] = eps
        num = (n_out(state.from_vector(x0 + d))[0] - n_out(state.from_vector(x0 - d))[0]) / (2 * eps)
        np.testing.assert_allclose(-Jn[:, :, k], num, rtol=1e-5, atol=1e-7, err_msg=f"column {k}")


def test_gauss_newton_hessian_is_symmetric_psd_and_gradient_consistent():
    model, state, uv, normals, frame, w, size = _setup("camera", seed=5)
    problem = FitProblem(model, FitConfig(weights=w), uv, normals, size, None, 0.0, np.array([32.0, 32.0]))
    e = problem.energy(state, frame)
    H, g = normal_equations(problem, state, frame, normals, e)
    np.testing.assert_allclose(H, H.T, atol=1e-9 * np.abs(H).max())
    assert np.linalg.eigvalsh(H).min() > -1e-9 * np.abs(H).max()
    # a small Gauss-Newton step along -H^-1 g decreases the energy
    step = -np.linalg.solve(H + 1e-6 * np.eye(len(g)), g)
    cand = state.from_vector(state.to_vector() + 0.1 * step)
    assert problem.energy(cand, frame, with_grad=False).total < e.total


@pytest.mark.parametrize("space", ["camera", "head"])
def test_fixed_shape_system_equals_gathered_system(space):
    """The GPU's fixed-shape system (all rows, zero weights) is the CPU's gathered one."""
    from dataclasses import replace

    from p3dmm.fitting.fitter.energy import EnergyWeights
    from p3dmm.fitting.fitter.state import NormalTargets, UVTargets

    model, state, uv, normals, frame, _, size = _setup(space, seed=6)
    rng = np.random.default_rng(6)
    valid = rng.random(uv.vertex_ids.shape[0]) < 0.8
    uv = UVTargets(uv.vertex_ids, uv.pixels, n_targets=int(valid.sum()), valid=valid)
    # a strided grid as the LM uses, and the default outlier cut (some pixels drop out)
    k = 2
    mask = np.zeros_like(normals.mask)
    mask[::k, ::k] = normals.mask[::k, ::k]
    grid = (np.arange(0, 16, k)[:, None] * 16 + np.arange(0, 16, k)[None, :]).reshape(-1)
    normals = NormalTargets(normals.normals, mask, space, grid=grid)
    w = replace(EnergyWeights(), normal_outlier=0.9)
    problem = FitProblem(model, FitConfig(weights=w), uv, normals, size, None, 0.0, np.array([32.0, 32.0]))
    e = problem.energy(state, frame, normals=normals)
    assert 0 < int(e.n_normal_active) < int(mask.sum())  # the outlier cut is exercised
    H0, g0 = normal_equations(problem, state, frame, normals, e, eps_scale=1.7, dense=False)
    H1, g1 = normal_equations(problem, state, frame, normals, e, eps_scale=1.7, dense=True)
    np.testing.assert_allclose(g1, g0, rtol=0, atol=0)
    np.testing.assert_allclose(H1, H0, rtol=1e-10, atol=1e-10 * np.abs(H0).max())
    # dense energy evaluation over the grid only equals the gathered one
    e_dense = problem.energy(state, frame, normals=normals, with_grad=False)
    from p3dmm.fitting.fitter.energy import evaluate_energy

    e_d = evaluate_energy(model, state, uv, normals, frame, w, size, focal_prior=0.0, pp_prior=np.array([32.0, 32.0]),
                          with_grad=False, dense_pixels=True)  # fmt: skip
    np.testing.assert_allclose(float(e_d.total), float(e_dense.total), rtol=1e-12)
