"""The fused kernels of ``fitter/irls.cu`` against their NumPy twins (no GPU needed).

The real launch code (:mod:`p3dmm.fitting.fitter.fast`, :mod:`p3dmm.fitting.fitter.energy`)
runs under :func:`tests.device_emulation.emulated_cuda`, so the kernels are the host builds
of the exact source CuPy would compile (:mod:`tests.host_cuda`: every thread in a shuffled
order, argument dtypes checked against the C signatures, buffers guarded). Each kernel is
compared with the NumPy code it replaces on random inputs with the edge cases (inactive
rows, residuals below the IRLS floor, non-finite Jacobian rows of inactive UV targets,
empty pixels with face id -1, pixels outside the mask, vertices in no face, zero
barycentrics), in float64 (to 1e-12 relative) and float32 (a few ulps); the structure is
checked exactly (zero rows where inactive, which a wrong index or mask would break).

The NumPy reference gets its device scalars (n_pixels, eps_scale, n_targets) as 0-d
arrays of the model's dtype, as the GPU path has them, so NumPy does the same arithmetic
in that dtype.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from p3dmm.fitting import FitConfig
from p3dmm.fitting.base.geometry import normalize_vjp, vertex_normal_sums
from p3dmm.fitting.base.rotation import rodrigues
from p3dmm.fitting.fitter import energy, fast
from p3dmm.fitting.fitter.energy import EnergyWeights, evaluate_energy, normal_residuals, output_rotation
from p3dmm.fitting.fitter.problem import FitProblem
from p3dmm.fitting.fitter.state import FitState, Frame, NormalTargets, UVTargets
from p3dmm.fitting.model.lbs import flame_forward

from ..device_emulation import emulated_cuda
from .flame_fixtures import random_flame_model
from .test_energy import _setup

DTYPES = [np.float64, np.float32]


def _suffix(dt: Any) -> str:
    return "f32" if np.dtype(dt) == np.float32 else "f64"


def _assert_close(got: np.ndarray, ref: np.ndarray, dt: Any, what: str) -> None:
    """float64: 1e-12 relative; float32: 4 ulps; both relative to the array's scale where an
    entry is a cancellation (the 3 x 3 products are BLAS matmuls in the twins)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, ref.dtype, got.shape, ref.shape)
    rtol = 1e-12 if np.dtype(dt) == np.float64 else 4 * float(np.finfo(np.float32).eps)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=what)
    scale = float(np.abs(ref[finite]).max()) if finite.any() else 0.0
    np.testing.assert_allclose(got[finite], ref[finite], rtol=rtol, atol=rtol * scale, err_msg=what)


# ------------------------------------------------------------------ IRLS rows
@pytest.mark.parametrize("dtype", DTYPES)
def test_irls_normal_rows_kernel_matches_numpy(tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    P, nf = 97, 23
    Jn = rng.normal(size=(P, 3, nf)).astype(dt)
    d = rng.normal(scale=0.2, size=(P, 3)).astype(dt)
    d[:10] = rng.normal(scale=1e-3, size=(10, 3))  # below the floor _EPS_N * eps_scale
    d[10, 0], d[11, 1], d[12, 2] = 0.0, -0.0, -1e-30
    keep = rng.random(P) < 0.7
    keep[:3] = False
    n_pixels, eps_scale, w = np.array(40, dt), np.array(1.7, dt), 200.0
    # the twin (fast._add_normal_rows on NumPy), with the GPU path's 0-d scalars
    wt = keep[:, None] * (w / n_pixels) / np.maximum(np.abs(d), fast._EPS_N * eps_scale)
    ref = Jn.reshape(-1, nf) * np.sqrt(wt).reshape(-1)[:, None]
    H_ref = np.zeros((nf + 6, nf + 6))
    fast._add_normal_rows(H_ref, Jn, d, keep[:, None], w, n_pixels, eps_scale, nf)
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        dn, de = cp.asarray(n_pixels), cp.asarray(eps_scale)
        args = (cp.asarray(Jn), cp.asarray(d), cp.asarray(keep[:, None]), w, dn, de)
        Jw = fast._normal_rows_fused(*args, nf)
        assert rec.host.launches == [f"irls_normal_rows_{_suffix(dt)}"]
        Jw_h = Jw.get()
        H_dev = cp.zeros((nf + 6, nf + 6))
        fast._add_normal_rows(H_dev, *args, nf)
        H_h = H_dev.get()
    _assert_close(Jw_h, ref, dt, "Jw")
    rows = np.repeat(keep, 3)
    assert (Jw_h[~rows] == 0).all() and (Jw_h[rows] != 0).all()
    # below the floor every component weighs exactly w / n_pixels / floor
    floor = dt.type(fast._EPS_N) * eps_scale
    s = np.sqrt((w / n_pixels) / floor)
    small = rows & (np.abs(d).reshape(-1) < floor)
    assert small.sum() > 10
    np.testing.assert_array_equal(Jw_h[small], Jn.reshape(-1, nf)[small] * s)
    np.testing.assert_allclose(H_h, H_ref, rtol=1e-5 if dt == np.float32 else 1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_irls_uv_rows_kernel_matches_numpy(tmp_path: Path, dtype: Any) -> None:
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    A, n = 61, 29
    J = rng.normal(size=(2 * A, n)).astype(dt)
    rho = np.abs(rng.normal(scale=0.02, size=A)).astype(dt)
    rho[:8] = rng.random(8) * 1e-4  # below the floor _EPS_UV * eps_scale
    active = rng.random(A) < 0.75
    active[:2] = True
    active[8:12] = False
    # inactive targets behind the camera: non-finite Jacobian rows and residuals
    J[2 * 8] = np.inf
    J[2 * 9 + 1, 3] = np.nan
    rho[10] = np.inf
    n_targets, eps_scale, w = np.array(A - 3, dt), np.array(2.5, dt), 2000.0
    # the twin (the dense branch of fast.normal_equations), with the GPU path's 0-d scalars
    wt = (w / np.maximum(n_targets, 1)) / np.maximum(rho, fast._EPS_UV * eps_scale)
    wt = wt * active
    ref = np.where(np.repeat(active, 2)[:, None], J, 0.0) * np.repeat(np.sqrt(wt), 2)[:, None]
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        Jw = fast._uv_rows_fused(cp.asarray(J), cp.asarray(rho), cp.asarray(active), w, cp.asarray(n_targets),
                                 cp.asarray(eps_scale))  # fmt: skip
        assert rec.host.launches == [f"irls_uv_rows_{_suffix(dt)}"]
        Jw_h = Jw.get()
        # a Python number for n_targets is filled on the device (the 4 uploads are J, rho, active, eps)
        ups = rec.uploads
        Jw2 = fast._uv_rows_fused(cp.asarray(J), cp.asarray(rho), cp.asarray(active), w, A - 3, cp.asarray(eps_scale))
        assert rec.uploads == ups + 4 and (Jw2.get() == Jw_h).all()
    _assert_close(Jw_h, ref, dt, "Jw")
    rows = np.repeat(active, 2)
    assert np.isfinite(Jw_h).all() and (Jw_h[~rows] == 0).all() and (Jw_h[rows] != 0).all()
    floor = dt.type(fast._EPS_UV) * eps_scale
    small = np.repeat(active & (rho < floor), 2)
    assert small.sum() >= 4
    np.testing.assert_array_equal(Jw_h[small], J[small] * np.sqrt((w / n_targets) / floor))


# ------------------------------------------------------------------ normal-loss pixels
def _pixel_case(dt: Any, space: str, seed: int = 3):
    """A random mesh with vertices in no face, and a 16 x 16 frame with every edge case."""
    rng = np.random.default_rng(seed)
    model = random_flame_model(seed=seed, V=300, F=150, dtype=dt)
    verts = model.v_template
    faces = model.faces
    assert np.setdiff1d(np.arange(300), faces).size > 0  # vertices in no face: zero normals
    H = W = 16
    face_id = rng.integers(-1, model.n_faces, size=(H, W)).astype(np.int32)
    face_id[0, :5] = -1
    bary = rng.random((H, W, 3))
    bary /= bary.sum(-1, keepdims=True)
    bary[1, :3] = 0.0  # u = 0 there: n = 0 / 1e-12
    obs = rng.normal(size=(H, W, 3))
    obs /= np.linalg.norm(obs, axis=-1, keepdims=True)
    mask = rng.random((H, W)) < 0.8
    normals = NormalTargets(normals=obs.astype(dt), mask=mask, space=space)
    frame = Frame(face_id=face_id, bary=bary.astype(dt), visible=np.ones(1, bool))
    R_out = rodrigues(rng.normal(size=(1, 3)))[0].astype(dt)
    # every pixel, shuffled, some twice
    pix = np.concatenate([rng.permutation(H * W), rng.integers(0, H * W, 20)]).astype(np.int64)
    weights = EnergyWeights(normal_outlier=0.9)  # random normals: some pixels are cut
    return verts, faces, frame, normals, pix, R_out, weights


def _on(cp: Any, frame: Frame, normals: NormalTargets) -> tuple[Frame, NormalTargets]:
    f = Frame(cp.asarray(frame.face_id), cp.asarray(frame.bary), cp.asarray(frame.visible))
    n = NormalTargets(cp.asarray(normals.normals), cp.asarray(normals.mask), normals.space)
    return f, n


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_pixel_kernel_matches_numpy(tmp_path: Path, dtype: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    dt = np.dtype(dtype)
    verts, faces, frame, normals, pix, R_out, w = _pixel_case(dt, "camera")
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        dframe, dnormals = _on(cp, frame, normals)
        args = (cp.asarray(verts), cp.asarray(faces), dframe, dnormals, cp.asarray(pix), cp.asarray(R_out), w)
        res = energy._normal_pixels_fused(*args, grad=False)
        grad = energy._normal_pixels_fused(*args, grad=True)
        nr = normal_residuals(*args[:5], cp.asarray(R_out), w)
        suf = _suffix(dt)
        assert rec.host.launches == [f"nrm_pixels_{suf}", f"nrm_pixels_grad_{suf}", f"nrm_pixels_{suf}"]
        host = {
            k: v.get()
            for k, v in dict(
                d=res.nr.d, keep=res.nr.keep, u=res.nr.u, vsums=res.nr.vertex_sums, corners=res.nr.corners,
                explained=res.explained, gd=grad.nr.d, gkeep=grad.nr.keep, gexplained=grad.explained,
                n_world=grad.n_world, g_nout=grad.g_nout, contrib=grad.contrib, nr_d=nr.d, nr_keep=nr.keep,
            ).items()
        }  # fmt: skip
    # the vertex-normal sums are not fused: scatter-adds in float32 on the device, a float64
    # bincount on NumPy. The twin gets the device's sums so that the rest compares tightly.
    _assert_close(host["vsums"], vertex_normal_sums(verts, faces), dt, "vertex sums")
    monkeypatch.setattr(energy, "vertex_normal_sums", lambda v, f: host["vsums"])
    ref = normal_residuals(verts, faces, frame, normals, pix, R_out, w)  # the twin
    ref_explained = np.abs(ref.d).sum(-1) * ref.keep
    # the twin of the gradient chain (evaluate_energy), with n_pixels as the GPU path has it
    n_pixels = np.array(normals.n_pixels, dt)
    g_nout = -(w.normal / n_pixels) * np.sign(ref.d) * ref.keep[:, None]
    u = ref.u
    n_world = u / np.maximum(np.sqrt((u * u).sum(-1, keepdims=True)), 1e-12)
    b = frame.bary.reshape(-1, 3)[pix]
    contrib = b[:, :, None] * normalize_vjp(u, g_nout @ R_out)[:, None, :]
    keep = ref.keep
    np.testing.assert_array_equal(host["keep"], keep)
    np.testing.assert_array_equal(host["gkeep"], keep)
    np.testing.assert_array_equal(host["nr_keep"], keep)
    assert host["keep"].dtype == bool and host["corners"].dtype == np.int64
    np.testing.assert_array_equal(host["corners"], ref.corners)
    _assert_close(host["u"], ref.u, dt, "u")
    for k in ("d", "gd", "nr_d"):
        _assert_close(host[k], ref.d, dt, k)
    _assert_close(host["explained"], ref_explained, dt, "explained")
    _assert_close(host["gexplained"], ref_explained, dt, "explained (grad)")
    _assert_close(host["n_world"], n_world, dt, "n_world")
    _assert_close(host["g_nout"], g_nout, dt, "g_nout")
    _assert_close(host["contrib"], contrib, dt, "contrib")
    # structure: every case occurs, and what is not kept contributes exactly nothing
    fid = frame.face_id.reshape(-1)[pix]
    m = normals.mask.reshape(-1)[pix]
    assert (fid < 0).any() and (~m & (fid >= 0)).any() and (m & (fid >= 0) & ~keep).any() and keep.sum() > 50
    assert not keep[(fid < 0) | ~m].any()
    np.testing.assert_array_equal(host["corners"][fid < 0], np.broadcast_to(faces[0], ((fid < 0).sum(), 3)))
    assert (host["explained"][~keep] == 0).all() and (host["explained"][keep] > 0).all()
    assert (host["g_nout"][~keep] == 0).all() and (host["contrib"][~keep] == 0).all()
    zero_b = (frame.bary.reshape(-1, 3)[pix] == 0).all(-1)
    assert zero_b.any() and (host["u"][zero_b] == 0).all()
    np.testing.assert_array_equal(host["d"][zero_b], normals.normals.reshape(-1, 3)[pix][zero_b])


def test_fused_paths_need_one_float_type(tmp_path: Path) -> None:
    """Mixed float types promote in the op chains; the kernels (one type) are not used there."""
    verts, faces, frame, normals, pix, R_out, w = _pixel_case(np.float32, "camera")
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        dframe, dnormals = _on(cp, frame, normals)
        dframe64 = dataclasses.replace(dframe, bary=dframe.bary.astype(cp.float64))
        args = (cp.asarray(verts), cp.asarray(faces), dframe64, dnormals, cp.asarray(pix), cp.asarray(R_out), w)
        assert energy._normal_pixels_fused(*args, grad=False) is None
        assert normal_residuals(*args).u.dtype == np.float64  # the chain's promotion
        J = cp.ones((4, 3), dtype=cp.float32)
        assert fast._uv_rows_fused(J, cp.ones(2), cp.ones(2, dtype=bool), 1.0, 2, cp.asarray(np.float32(1))) is None
        assert fast._uv_rows_fused(J, cp.ones(2, cp.float32), cp.ones(2, dtype=bool), 1.0, 2, cp.ones(())) is None
        assert rec.host.launches == []


# ------------------------------------------------------------------ whole calls
def _problem_case(dt: Any, space: str):
    model, state, uv, normals, frame, _, size = _setup(space, seed=6)
    rng = np.random.default_rng(6)
    valid = rng.random(uv.vertex_ids.shape[0]) < 0.8
    model = model.astype(dt)
    state = FitState(*(np.asarray(getattr(state, k)).astype(dt) for k in FitState.NAMES))
    uv = UVTargets(uv.vertex_ids, uv.pixels.astype(dt), n_targets=int(valid.sum()), valid=valid)
    normals = NormalTargets(normals.normals.astype(dt), normals.mask, space)
    frame = Frame(frame.face_id, frame.bary.astype(dt), frame.visible)
    w = EnergyWeights(normal_outlier=0.9)
    return model, state, uv, normals, frame, w, size


def _device_case(cp: Any, case: tuple, dt: Any):
    model, state, uv, normals, frame, w, size = case
    dmodel = model.to(cp)
    dstate = FitState(*(cp.asarray(getattr(state, k)) for k in FitState.NAMES))
    duv = UVTargets(cp.asarray(uv.vertex_ids), cp.asarray(uv.pixels), n_targets=cp.asarray(np.array(uv.n_targets, dt)),
                    valid=cp.asarray(uv.valid))  # fmt: skip
    dframe, dnormals = _on(cp, frame, normals)
    pp = cp.asarray(np.array([32.0, 32.0], dt))
    problem = FitProblem(dmodel, FitConfig(weights=w), duv, dnormals, size, None, 0.0, pp, host_faces=model.faces)
    return problem, dstate, dframe


def _one_call(cp: Any, rec: Any, problem: FitProblem, state: FitState, frame: Frame, eps: Any) -> tuple[dict, dict]:
    """evaluate_energy (with its gradient), normal_equations and normal_residuals at
    ``state``: host numbers, and the device operations each launched (FLAME's forward
    pass excluded)."""
    fwd = flame_forward(problem.model, state.params())
    R_out = output_rotation(state, problem.normals.space)
    pix = cp.arange(problem.normals.mask.size)
    k = rec.ops
    normal_residuals(fwd[0], problem.model.faces, frame, problem.normals, pix, R_out, problem.config.weights)
    ops_r = rec.ops - k
    k = rec.ops
    e = evaluate_energy(problem.model, state, problem.uv, problem.normals, frame, problem.config.weights, problem.size,
                        pp_prior=problem.pp_prior, forward=fwd)  # fmt: skip
    ops_e = rec.ops - k
    k = rec.ops
    H, g = fast.normal_equations(problem, state, frame, problem.normals, e, forward=fwd, eps_scale=eps, dense=True)
    ops_h = rec.ops - k
    out = {"e": e.to_vector().get(), "grad": e.grad.to_vector().get(), "H": H.get(), "g": g.get()}
    return out, {"residuals": ops_r, "energy": ops_e, "system": ops_h}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("space", ["camera", "head"])
def test_fused_kernels_launch_fewer_ops_for_the_same_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: Any, space: str
) -> None:
    """One evaluate_energy + normal_equations on the emulated device, fused vs
    ``P3DMM_FUSED_KERNELS=0`` (every fused kernel off: rotation and LBS too) vs the CPU."""
    dt = np.dtype(dtype)
    case = _problem_case(dt, space)
    model, state, uv, normals, frame, w, size = case
    cpu_problem = FitProblem(model, FitConfig(weights=w), uv, normals, size, None, 0.0, np.array([32.0, 32.0], dt))
    e = cpu_problem.energy(state, frame)
    H_cpu, g_cpu = fast.normal_equations(cpu_problem, state, frame, normals, e, eps_scale=dt.type(1.3), dense=True)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("P3DMM_FUSED_KERNELS", flag)
        with emulated_cuda(tmp_path / flag) as rec:
            import cupy as cp

            problem, dstate, dframe = _device_case(cp, case, dt)
            eps = cp.asarray(np.array(1.3, dt))
            runs[flag] = (*_one_call(cp, rec, problem, dstate, dframe, eps), rec.host.launches)
    (a, ops1, launches1), (b, ops0, launches0) = runs["1"], runs["0"]
    suf = _suffix(dt)
    assert {f"nrm_pixels_grad_{suf}", f"nrm_pixels_{suf}", f"irls_normal_rows_{suf}", f"irls_uv_rows_{suf}"} <= set(
        launches1
    )
    assert not any(k.startswith(("irls_", "nrm_")) for k in launches0)
    # each kernel replaces a chain. normal_residuals runs no other fused kernel: its count
    # is this file's alone (measured 10 vs 36); the whole calls also gain from the rotation
    # and LBS kernels
    assert ops1["residuals"] + 20 <= ops0["residuals"], (ops1, ops0)
    assert ops1["energy"] + 40 <= ops0["energy"] and ops1["system"] + 40 <= ops0["system"], (ops1, ops0)
    rtol = 1e-12 if dt == np.float64 else 2e-5
    np.testing.assert_allclose(a["e"], b["e"], rtol=rtol, atol=0)
    for k in ("grad", "g", "H"):
        ref = b[k]
        np.testing.assert_allclose(a[k], ref, rtol=rtol, atol=rtol * np.abs(ref).max(), err_msg=k)
    # and the CPU's numbers
    np.testing.assert_allclose(a["g"], g_cpu, rtol=rtol, atol=rtol * np.abs(g_cpu).max())
    np.testing.assert_allclose(a["H"], H_cpu, rtol=rtol, atol=rtol * np.abs(H_cpu).max())
