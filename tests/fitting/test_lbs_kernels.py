"""The fused FLAME kernels (``model/lbs.cu``) against their NumPy twins.

Runs the real launch code of :mod:`p3dmm.fitting.model.lbs` on the CuPy emulation (the
``.cu`` file compiled for the host, :mod:`tests.host_cuda`) at a random pose and shape:
the kinematic chain, its VJP, and the vertex Jacobian (all vertices and a subset), in
float32 and float64 models; and the fused Jacobian against finite differences.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose
from p3dmm.fitting import FlameModel
from p3dmm.fitting.base.rotation import rodrigues
from p3dmm.fitting.model.lbs import flame_forward, flame_jacobian, flame_vjp, rigid_transforms, rigid_transforms_vjp
from p3dmm.fitting.model.params import FlameParams

from ..device_emulation import emulated_cuda


def _params(model: FlameModel, seed: int = 0) -> FlameParams:
    rng = np.random.default_rng(seed)
    dt = model.v_template.dtype
    return FlameParams(
        shape=(rng.normal(size=model.n_shape) * 0.5).astype(dt),
        expr=(rng.normal(size=model.n_expr) * 0.5).astype(dt),
        pose=(rng.normal(size=(5, 3)) * 0.3).astype(dt),
        transl=np.array([0.01, -0.02, 0.03], dt),
    )


def _device_params(cp, p: FlameParams) -> FlameParams:  # type: ignore[no-untyped-def]
    return FlameParams(*(cp.asarray(getattr(p, k)) for k in ("shape", "expr", "pose", "transl")))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chain_and_its_vjp_match_numpy(tmp_path: Path, dtype: type) -> None:
    rng = np.random.default_rng(1)
    parents = np.array([-1, 0, 1, 1, 1])
    R = rodrigues(rng.normal(size=(5, 3)) * 0.5).astype(dtype)
    J = rng.normal(size=(5, 3)).astype(dtype)
    gAR, gAt = rng.normal(size=(5, 3, 3)).astype(dtype), rng.normal(size=(5, 3)).astype(dtype)
    want = rigid_transforms(R, J, parents)
    want_vjp = rigid_transforms_vjp(R, J, parents, want[0], gAR, gAt)
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        n0 = len(rec.host.launches)
        got = rigid_transforms(cp.asarray(R), cp.asarray(J), parents)
        got_vjp = rigid_transforms_vjp(cp.asarray(R), cp.asarray(J), parents, got[0], cp.asarray(gAR), cp.asarray(gAt))
        suf = "f32" if dtype == np.float32 else "f64"
        assert rec.host.launches[n0:] == [f"lbs_chain_{suf}", f"lbs_chain_vjp_{suf}"]
        got, got_vjp = [cp.asnumpy(a) for a in got], [cp.asnumpy(a) for a in got_vjp]
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for g, w in zip(got + got_vjp, list(want) + list(want_vjp)):
        assert g.dtype == dtype
        assert_allclose(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flame_forward_vjp_and_jacobian_match_numpy(tmp_path: Path, dtype: type) -> None:
    model = FlameModel.synthetic(seed=0, dtype=dtype)
    p = _params(model)
    verts, cache = flame_forward(model, p)
    g = np.random.default_rng(3).normal(size=verts.shape).astype(dtype)
    want_grad = flame_vjp(model, cache, g).to_vector()
    ids = np.array([0, 7, 7, 4000, model.n_vertices - 1])
    want_all, want_sub = flame_jacobian(model, cache), flame_jacobian(model, cache, ids)
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        dm = model.to(cp)
        v_d, c_d = flame_forward(dm, _device_params(cp, p))
        grad = cp.asnumpy(flame_vjp(dm, c_d, cp.asarray(g)).to_vector())
        n0 = len(rec.host.launches)
        J_all = cp.asnumpy(flame_jacobian(dm, c_d))
        assert len(rec.host.launches) - n0 == 3  # Rodrigues JVP, chain, assembly
        J_sub = cp.asnumpy(flame_jacobian(dm, c_d, cp.asarray(ids)))
        v_d = cp.asnumpy(v_d)
    scale = np.abs(want_all).max()
    tol = 1e-11 if dtype == np.float64 else 1e-5
    assert_allclose(v_d, verts, atol=tol * 10)
    assert_allclose(grad, want_grad, rtol=tol * 10, atol=tol * np.abs(want_grad).max())
    assert J_all.dtype == dtype and J_all.shape == want_all.shape
    assert_allclose(J_all, want_all, rtol=0, atol=tol * scale)
    assert_allclose(J_sub, want_sub, rtol=0, atol=tol * scale)
    assert_allclose(J_sub, J_all[ids], rtol=0, atol=0)


def test_fused_jacobian_against_finite_differences(tmp_path: Path) -> None:
    model = FlameModel.synthetic(seed=0, dtype=np.float64)
    p = _params(model, seed=5)
    ids = np.array([10, 1234, 3000])
    with emulated_cuda(tmp_path):
        import cupy as cp

        dm = model.to(cp)
        _, c_d = flame_forward(dm, _device_params(cp, p))
        Jk = cp.asnumpy(flame_jacobian(dm, c_d, cp.asarray(ids)))
    x = np.concatenate([p.shape, p.expr, p.pose.reshape(-1)])
    ns, ne = model.n_shape, model.n_expr
    h = 1e-6
    for col in (0, ns + 3, ns + ne + 1, ns + ne + 7, ns + ne + 14):  # shape, expression, global, jaw, eye
        e = np.zeros_like(x)
        e[col] = h

        def at(v: np.ndarray) -> np.ndarray:
            q = FlameParams(shape=v[:ns], expr=v[ns : ns + ne], pose=v[ns + ne :].reshape(5, 3), transl=p.transl)
            return flame_forward(model, q)[0][ids]

        fd = (at(x + e) - at(x - e)) / (2 * h)
        assert_allclose(Jk[:, :, col], fd, atol=1e-7)
