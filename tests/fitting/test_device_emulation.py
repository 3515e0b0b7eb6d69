"""The ``device="cuda"`` code paths, run on the CPU through :mod:`tests.device_emulation`.

CI has no GPU. These tests execute the CuPy branches of the fitter end to end (the CUDA
kernels compiled for the host, the fixed-shape LM system, device-side validation and
stopping) and check two things a GPU run must also satisfy:

* the results equal the NumPy path's (up to summation order);
* nothing makes the host wait for the device before the result is read: no implicit
  synchronisation at all, and exactly one blocking transfer (the result).

The same checks on a real device are the gpu-marked tests in ``test_fit.py``
(``cupyx.allow_synchronize(False)``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from p3dmm.fitting import (
    Camera,
    FitConfig,
    FittingError,
    FlameModel,
    InputError,
    Observation,
    fit,
    rasterize,
)
from p3dmm.fitting.base.xp import LaggedFlag
from p3dmm.fitting.fitter.uv_nn import uv_targets

from ..device_emulation import DArray, emulated_cuda
from .test_fit import _errors, _observe, _params

SIZE = 128


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


def test_the_emulation_catches_what_cupy_would(tmp_path: Path) -> None:
    """The harness must be able to fail: host conversions, mixing and hidden syncs."""
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        a = cp.arange(6, dtype=cp.float32)
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.asarray(a)
        with pytest.raises(TypeError, match="NumPy array"):
            _ = a + np.ones(6, np.float32)
        with pytest.raises(TypeError, match="NumPy array"):
            cp.concatenate([a, np.ones(2, np.float32)])
        assert rec.syncs == []
        float(a.sum())
        if a.max() > 3:  # bool() of a device array
            pass
        _ = a[a > 2]
        cp.nonzero(a)
        cp.bincount(cp.asarray([0, 1, 1]))
        cp.linalg.lstsq(cp.ones((4, 2)), cp.ones(4), rcond=None)
        kinds = [e.kind for e in rec.syncs]
        assert kinds == ["float()", "bool()", "boolean-mask indexing", "nonzero", "bincount", "cupy.linalg.lstsq"]
        assert all("test_device_emulation.py" in e.where for e in rec.syncs)
        assert isinstance(a.get(), np.ndarray) and rec.downloads == 1
        assert isinstance(a * 2, DArray) and isinstance(a.sum(), DArray)  # reductions stay on the device


def test_lagged_flag(tmp_path: Path) -> None:
    assert LaggedFlag(np).poll(np.bool_(True)) and not LaggedFlag(np).poll(np.bool_(False))
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        flag = LaggedFlag(cp)
        f = cp.zeros((), dtype=bool)
        seen = [flag.poll(f) for _ in range(4)]
        f = cp.ones((), dtype=bool)
        seen += [flag.poll(f) for _ in range(6)]
        assert not any(seen[:5]) and any(seen), seen  # True arrives, later than the device had it
        assert rec.syncs == [] and rec.downloads == 0 and rec.async_copies == flag.copies > 1


def test_rasterize_launch_code_on_emulated_device(tmp_path: Path) -> None:
    """``_rasterize_cuda`` (argument order, dtypes, buffers) through the host build of rasterize.cu."""
    import trimesh

    rng = np.random.default_rng(3)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = np.asarray(sphere.vertices) * (1.0 + 0.2 * rng.random((len(sphere.vertices), 1)))
    scenes = [
        ((v + [0.1, 0.0, 3.0]).astype(np.float32), np.asarray(sphere.faces)),
        ((rng.normal(size=(150, 3)) * [0.6, 0.6, 0.2] + [0, 0, 2.0]).astype(np.float32), rng.integers(0, 150, (600, 3))),
        ((v * 0.5 + [0, 0, 0.3]).astype(np.float32), np.asarray(sphere.faces)),  # crosses the near plane
    ]
    h, w = 37, 53
    cam = Camera(focal=np.float32(40.0), principal=np.array([26.0, 18.0], np.float32), R=np.eye(3), t=np.zeros(3),
                 width=w, height=h)  # fmt: skip
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        for verts, faces in scenes:
            for cull in (False, True):
                cpu = rasterize(verts, faces, cam, cull_backfaces=cull, near=0.05)
                dev = rasterize(cp.asarray(verts), cp.asarray(faces), cam, cull_backfaces=cull, near=0.05)
                assert isinstance(dev.face_id, DArray)
                assert_array_equal(dev.face_id.get(), cpu.face_id)
                assert_array_equal(dev.bary.get(), cpu.bary)
                assert_array_equal(dev.depth.get(), cpu.depth)
                assert cull or cpu.mask.sum() > 100  # (seen from inside, the near-plane sphere is all back faces)
        assert rec.syncs == []
        assert rec.host.launches == ["project_vertices", "raster_faces", "resolve_pixels"] * 6


def test_uv_targets_on_emulated_device(tmp_path: Path, head: FlameModel) -> None:
    obs = _observe(head, _params(head, 1, 0.8, 0.15, 20.0), size=SIZE)
    q = head.uv.vertex_uv.astype(np.float32)
    cpu_pix, cpu_valid = uv_targets(q, obs.uv, obs.mask)
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        pix, valid = uv_targets(cp.asarray(q), cp.asarray(obs.uv), cp.asarray(obs.mask))
        assert_array_equal(valid.get(), cpu_valid)
        assert_array_equal(pix.get(), cpu_pix)
        assert rec.syncs == [] and rec.host.launches == ["uvnn_bin_pixels", "uvnn_search"]
        # a stack of maps: one bin and one search launch for all of them
        uvs, masks = np.stack([obs.uv, obs.uv[:, ::-1]]), np.stack([obs.mask, obs.mask[:, ::-1]])
        pix_s, valid_s = uv_targets(cp.asarray(q), cp.asarray(uvs), cp.asarray(masks))
        assert rec.host.launches[2:] == ["uvnn_bin_pixels", "uvnn_search"]
        for b in range(2):
            ref_pix, ref_valid = uv_targets(q, uvs[b], masks[b])
            assert_array_equal(valid_s[b].get(), ref_valid)
            assert_array_equal(pix_s[b].get(), ref_pix)
    assert cpu_valid.sum() > 300


@pytest.mark.parametrize("solver", ["fast", "paper"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fit_on_emulated_device_matches_cpu_without_host_reads(
    tmp_path: Path, head: FlameModel, solver: str, dtype: str
) -> None:
    """float64: the device path's arithmetic equals the CPU's (the sums only differ in order);
    float32: those order differences grow over the iterations but stay far below the error."""
    p = _params(head, 12, 0.8, 0.15, 20.0)
    obs = _observe(head, p, size=SIZE)
    model = head.astype(np.dtype(dtype))
    cfg = FitConfig(solver=solver, render_size=64, paper_camera_steps=4, paper_steps=8, fast_iterations=10)
    cpu = fit(obs, model, cfg, device="cpu")
    with emulated_cuda(tmp_path) as rec:
        dev = fit(obs, model, cfg, device="cuda")
    # nothing waited for the device before the result: no implicit sync, one blocking transfer
    assert rec.syncs == [], "\n".join(str(e) for e in rec.syncs)
    assert rec.downloads == 1
    if solver == "fast":
        assert rec.async_copies > 0  # the stop flag travelled without blocking
    suf = "f64" if dtype == "float64" else "f32"
    fused = {f"rot_rodrigues_{suf}", f"rot_rodrigues_vjp_{suf}", "rot_axis_angle_f64", f"lbs_chain_{suf}",
             f"lbs_chain_vjp_{suf}"}  # fmt: skip
    fused.add(f"nrm_pixels_grad_{suf}")  # the normal term's residuals and gradient chain
    if solver == "fast":
        fused |= {f"rot_rodrigues_jvp_{suf}", f"lbs_jacobian_chain_{suf}", f"lbs_vertex_jacobian_{suf}"}
        fused |= {f"nrm_pixels_{suf}", f"irls_normal_rows_{suf}", f"irls_uv_rows_{suf}"}  # IRLS rows
    assert {"project_vertices", "raster_faces", "resolve_pixels", "uvnn_bin_pixels", "uvnn_search"} | fused <= set(
        rec.host.launches
    )
    # same fit (summation order differs: scatter-add vs bincount, fixed-shape vs gathered sums)
    assert isinstance(dev.vertices, np.ndarray) and dev.vertices.dtype == np.float32
    assert dev.n_targets == cpu.n_targets
    assert (dev.iterations, dev.stop_reason, dev.converged) == (cpu.iterations, cpu.stop_reason, cpu.converged)
    d_mm = np.linalg.norm(dev.vertices - cpu.vertices, axis=1) * 1e3
    tol_mm, tol_e = (1e-4, 1e-7) if dtype == "float64" else (0.1, 1e-2)
    assert d_mm.max() < tol_mm, (np.median(d_mm), d_mm.max())
    np.testing.assert_allclose(dev.energies["total"], cpu.energies["total"], rtol=tol_e)
    assert [(h["stage"], h["iteration"]) for h in dev.history] == [(h["stage"], h["iteration"]) for h in cpu.history]
    assert abs(dev.camera.focal - cpu.camera.focal) < 1e-3 * cpu.camera.focal
    posed, _ = _errors(head, p, dev)
    assert np.isfinite(posed)


def _nan_inside(obs: Observation) -> Observation:
    n = obs.normals.copy()
    ys, xs = np.nonzero(obs.mask)
    n[ys[:5], xs[:5]] = np.nan
    return Observation(normals=n, uv=obs.uv, mask=obs.mask)


def _tiny_mask(obs: Observation) -> Observation:
    m = np.zeros_like(obs.mask)
    m[60:63, 60:63] = True
    return Observation(normals=obs.normals, uv=obs.uv, mask=m)


def _wrong_uvs(obs: Observation) -> Observation:
    return Observation(normals=obs.normals, uv=np.full_like(obs.uv, 0.999), mask=obs.mask)


def _uv_out_of_range(obs: Observation) -> Observation:
    return Observation(normals=obs.normals, uv=np.full_like(obs.uv, 7.0), mask=obs.mask)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (_nan_inside, InputError, "5 masked pixels have NaN/inf"),
        (_tiny_mask, FittingError, "mask has 9 pixels, fewer than min_mask_pixels"),
        (_wrong_uvs, FittingError, "only 0 FLAME vertices found a pixel"),
        (_uv_out_of_range, InputError, r"masked pixels of observation.uv are outside \[0, 1\]"),
    ],
)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy warns where a GPU computes NaN silently
def test_bad_input_on_emulated_device_raises_the_cpu_error(tmp_path: Path, head: FlameModel, make, error, match) -> None:
    """On the device the data checks are read with the result; the error is the CPU's."""
    obs = make(_observe(head, _params(head, 1, 0.8, 0.15, 20.0), size=SIZE))
    cfg = FitConfig(render_size=64, fast_iterations=3)
    with pytest.raises(error, match=match) as cpu_err:
        fit(obs, head, cfg, device="cpu")
    with emulated_cuda(tmp_path) as rec, pytest.raises(error, match=match) as dev_err:
        fit(obs, head, cfg, device="cuda")
    assert str(dev_err.value) == str(cpu_err.value)
    # only the diagnosis of a failed check (after the one transfer) may read the device again
    assert [e for e in rec.syncs if "_correspondence_hint" not in e.where] == [] and rec.downloads == 1


def test_solver_steps_upload_nothing(tmp_path: Path, head: FlameModel) -> None:
    """Host constants reach the device once (``xp.constant``), not once per step."""
    obs = _observe(head, _params(head, 1, 0.8, 0.15, 20.0), size=SIZE)
    uploads = []
    for steps in (3, 9):
        cfg = FitConfig(solver="paper", render_size=64, paper_camera_steps=steps, paper_steps=steps)
        with emulated_cuda(tmp_path / str(steps)) as rec:
            fit(obs, head, cfg, device="cuda")
        uploads.append(rec.uploads)
    assert uploads[0] == uploads[1] and uploads[0] < 40, uploads


@pytest.mark.parametrize(("solver", "match"), [("fast", "non-finite energy at fast-solver iteration 3"),
                                               ("paper", "energy became non-finite first in the camera stage at step 5"),
                                               ("init", "non-finite energy in the UV initialisation")])  # fmt: skip
@pytest.mark.parametrize("device", ["cpu", "emulated"])
def test_non_finite_energy_during_the_solve_is_an_error(tmp_path, head, monkeypatch, solver, match, device):
    """A NaN energy never yields a result, on either device (on the GPU it is noticed at the end)."""
    from p3dmm.fitting.fitter import problem

    orig = problem.evaluate_energy
    calls = [0]

    def poisoned(*args, **kwargs):
        terms = orig(*args, **kwargs)
        calls[0] += 1
        if calls[0] > (5 if solver == "paper" else 4):  # LM: 2 evaluations per pass; Adam: 1 per step
            terms.uv = terms.uv * np.nan
        return terms

    monkeypatch.setattr(problem, "evaluate_energy", poisoned)
    obs = _observe(head, _params(head, 1, 0.8, 0.15, 20.0), size=SIZE)
    init = 6 if solver == "init" else 0  # poison the initialisation's UV stage, or the solver
    # the poison counts Python calls: a CUDA graph replays a step without calling Python
    # (test_non_finite_maps_stop_a_captured_solve covers the captured steps)
    cfg = FitConfig(solver="fast" if solver == "init" else solver, render_size=64, paper_camera_steps=8, paper_steps=4,
                    fast_iterations=6, init_uv_iterations=init, cuda_graphs=False)  # fmt: skip
    if device == "cpu":
        with pytest.raises(FittingError, match=match):
            fit(obs, head, cfg, device="cpu")
    else:
        with emulated_cuda(tmp_path) as rec, pytest.raises(FittingError, match=match):
            fit(obs, head, cfg, device="cuda")
        assert rec.syncs == []


def test_gpu_check_script_runs_on_the_emulated_device(tmp_path: Path) -> None:
    """benchmarks/gpu_check.py end to end on the CuPy emulation (the script a GPU machine runs)."""
    import importlib.util
    import json
    import sys

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu_check.json"
    argv = sys.argv
    sys.argv = ["gpu_check.py", "--quick", "--skip-predictors", "--size", "128", "--json", str(out)]
    try:
        with emulated_cuda(tmp_path / "build"):
            rc = module.main()
    finally:
        sys.argv = argv
    rows = json.loads(out.read_text())["rows"]
    assert rc == 0, rows
    assert [r["passed"] for r in rows] == [True] * 6, rows
    assert rows[4]["check"].startswith("batched fast fit, fit_batch B=2")
