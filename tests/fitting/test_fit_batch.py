"""Batched fitting (``fit_batch``) and the CUDA-graph capture of solver steps (``StepGraph``).

On the CPU and on the CuPy emulation: a batch gives each image its own fit's result; the
captured steps replay exactly what eager steps compute; the emulation's capture behaves
like CUDA's (nothing runs at capture, Python values are frozen, a host read cannot be
captured) so that these checks mean something without a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from p3dmm.fitting import Camera, FitConfig, FlameModel, Observation, fit, fit_batch, render_maps
from p3dmm.fitting.base.errors import FittingError, InputError
from p3dmm.fitting.base.graph import StepGraph, graphs_enabled
from p3dmm.fitting.base.errors import FitQualityWarning

from ..device_emulation import CaptureError, emulated_cuda

SIZE = 96


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


def _observations(head: FlameModel, n: int = 3) -> list[Observation]:
    from p3dmm.runtime.demo import demo_params

    out = []
    for seed in range(n):
        p = demo_params(head, seed=seed)
        cam = Camera.frontal(distance=1.0, focal=1200.0 * SIZE / 512, width=SIZE, height=SIZE)
        m = render_maps(head, p, cam, size=SIZE, rgb=False)
        out.append(Observation(normals=m.normals, uv=m.uv, mask=m.mask))
    return out


CFG = FitConfig(render_size=48, fast_iterations=12, init_uv_iterations=4)
SHORT = dataclasses.replace(CFG, fast_iterations=5, init_uv_iterations=2)  # for the slower emulated checks


def _same(a, b, tol: float = 0.0) -> None:
    assert a.iterations == b.iterations and a.stop_reason == b.stop_reason
    np.testing.assert_allclose(a.vertices, b.vertices, atol=tol, rtol=0)
    np.testing.assert_allclose(a.camera.t, b.camera.t, atol=tol, rtol=0)
    np.testing.assert_allclose(float(a.camera.focal), float(b.camera.focal), rtol=max(tol, 1e-12))
    np.testing.assert_allclose(a.camera.principal, b.camera.principal, atol=max(tol, 1e-9) * 512)
    assert [h["iteration"] for h in a.history] == [h["iteration"] for h in b.history]
    np.testing.assert_allclose([h["total"] for h in a.history], [h["total"] for h in b.history], rtol=max(tol, 1e-12))


@pytest.mark.parametrize("solver", ["fast", "paper"])
def test_fit_batch_equals_single_fits_on_the_cpu(head: FlameModel, solver: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each image of a batch gets its own fit's result (the images stop after different pass
    counts); the batched CPU solver (compact systems, per-image re-linearisation) runs too."""
    from p3dmm.fitting.fitter import fit as fit_module

    monkeypatch.setattr(fit_module, "_CPU_CHUNK", 8)
    obs = _observations(head)
    cfg = dataclasses.replace(CFG, solver=solver, paper_camera_steps=3, paper_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        single = [fit(o, head, cfg) for o in obs]
        batch = fit_batch(obs, head, cfg)
    for a, b in zip(single, batch):
        _same(a, b, tol=1e-6)
    if solver == "fast":
        assert len({r.iterations for r in single}) > 1, "the batch should mix images that stop at different passes"


def test_fit_batch_reports_the_bad_item_and_goes_on(head: FlameModel) -> None:
    obs = _observations(head, 2)
    bad = Observation(normals=obs[0].normals, uv=obs[0].uv, mask=np.zeros_like(obs[0].mask))  # empty mask
    wrong = Observation(normals=obs[0].normals[:10], uv=obs[0].uv, mask=obs[0].mask)  # mismatched shapes
    res = fit_batch([obs[0], bad, obs[1], wrong], head, CFG, errors="return")
    assert isinstance(res[1], FittingError) and isinstance(res[3], InputError)
    assert "observations[1]" in " ".join(res[1].__notes__) and "observations[3]" in " ".join(res[3].__notes__)
    _same(res[0], fit(obs[0], head, CFG), tol=1e-6)
    _same(res[2], fit(obs[1], head, CFG), tol=1e-6)
    with pytest.raises(FittingError) as ei:
        fit_batch([obs[0], bad], head, CFG)
    assert "observations[1]" in " ".join(ei.value.__notes__)
    with pytest.raises(InputError, match="errors="):
        fit_batch(obs, head, CFG, errors="ignore")


def _fresh_result_evaluation(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Make each result evaluate its state afresh (forward pass and render) instead of reusing
    the solver's; returns a list recording, per result, whether the solver had kept one."""
    from p3dmm.fitting.fitter import fit as fit_module

    kept: list[bool] = []
    original = fit_module._result_arrays

    def fresh(problem, state, *args, **kwargs):
        kept.append(problem.evaluated is not None and problem.evaluated[0] is state)
        problem.evaluated = None
        return original(problem, state, *args, **kwargs)

    monkeypatch.setattr(fit_module, "_result_arrays", fresh)
    return kept


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_results_reuse_the_solvers_render_of_the_best_state(
    tmp_path: Path, head: FlameModel, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fast fit's result takes the vertices and render of its best state from the solver:
    they give exactly the energies, vertices and quality of a fresh evaluation."""
    from p3dmm.fitting.fitter import fit as fit_module

    monkeypatch.setattr(fit_module, "_CPU_CHUNK", 8)
    model = head.astype(np.dtype("float64"))
    obs = _observations(head, 2)
    runs = {}
    for reuse in (True, False):
        with monkeypatch.context() as m:
            kept = [] if reuse else _fresh_result_evaluation(m)
            with emulated_cuda(tmp_path / str(reuse)) if device == "cuda" else contextlib.nullcontext():
                runs[reuse] = fit_batch(obs, model, CFG, device=device)
        if not reuse:
            assert kept == [True] * len(obs), "the solver should have kept each best state's render"
    for a, b in zip(runs[True], runs[False]):
        _same(a, b)
        assert a.energies == b.energies and a.quality == b.quality
    # meaningful only if some image's last linearisation is not its best (else any kept render would do)
    totals = [[h["total"] for h in r.history if h["stage"] == "fast"] for r in runs[True]]
    assert any(t[-1] > min(t) for t in totals), totals


@pytest.mark.parametrize("path", ["cpu", "cpu_batched", "cuda"])
def test_a_mixed_batch_reports_each_bad_item_and_fits_the_rest(
    tmp_path: Path, head: FlameModel, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked preparation (images grouped by map size, checks run on the stack) gives
    each bad image its own error and each good one its own fit, on every path: NaN and
    out-of-range UV inside the mask, an empty mask, mismatched shapes, and a second map size."""
    from p3dmm.fitting.fitter import fit as fit_module

    if path == "cpu_batched":
        monkeypatch.setattr(fit_module, "_CPU_CHUNK", 8)
    model = head.astype(np.dtype("float64"))
    good = _observations(head, 2)
    from p3dmm.runtime.demo import demo_params

    p = demo_params(head, seed=5)
    cam = Camera.frontal(distance=1.0, focal=1200.0 * 64 / 512, width=64, height=64)
    m = render_maps(head, p, cam, size=64, rgb=False)
    small = Observation(normals=m.normals, uv=m.uv, mask=m.mask)
    o = good[0]
    nan_normals = o.normals.copy()
    nan_normals[np.argwhere(o.mask)[0][0], np.argwhere(o.mask)[0][1]] = np.nan
    uv_raw = o.uv * 2.0 - 1.0  # a raw [-1, 1] network output
    batch = [
        good[0],
        Observation(normals=o.normals, uv=o.uv, mask=np.zeros_like(o.mask)),  # empty mask
        small,
        Observation(normals=nan_normals, uv=o.uv, mask=o.mask),
        Observation(normals=o.normals[:10], uv=o.uv, mask=o.mask),  # mismatched shapes
        Observation(normals=o.normals, uv=uv_raw, mask=o.mask),
        good[1],
    ]
    with emulated_cuda(tmp_path) if path == "cuda" else contextlib.nullcontext():
        res = fit_batch(batch, model, SHORT, device="cuda" if path == "cuda" else "cpu", errors="return")
    expected = {1: (FittingError, "min_mask_pixels"), 3: (InputError, "NaN/inf"), 4: (InputError, "shape"),
                5: (InputError, r"outside \[0, 1\]")}  # fmt: skip
    for i, (kind, pattern) in expected.items():
        assert isinstance(res[i], kind), (i, res[i])
        assert re.search(pattern, str(res[i])), (i, str(res[i]))
        assert f"observations[{i}]" in " ".join(res[i].__notes__)
    for i, ob in ((0, good[0]), (2, small), (6, good[1])):
        _same(res[i], fit(ob, model, SHORT), tol=1e-6)
        assert res[i].camera.width == ob.mask.shape[1]


def test_fit_batch_on_the_emulated_device_matches_the_cpu(tmp_path: Path, head: FlameModel) -> None:
    """The batched GPU path: no host reads, one graph launch per pass for the whole batch,
    the CPU's results (float64: the arithmetic is the same up to summation order)."""
    model = head.astype(np.dtype("float64"))
    obs = _observations(head)
    cpu = fit_batch(obs, model, CFG)
    with emulated_cuda(tmp_path) as rec:
        dev = fit_batch(obs, model, CFG, device="cuda")
    assert rec.syncs == []
    # the rigid initialisation, the UV stage and the fast solver: one graph each for all images
    assert rec.captures == 3
    assert rec.downloads == 1  # the results of the whole batch in one transfer
    for a, b in zip(cpu, dev):
        _same(a, b, tol=1e-6)


def test_captured_solves_equal_eager_solves_on_the_emulated_device(tmp_path: Path, head: FlameModel) -> None:
    """Replaying the captured LM passes and Adam steps computes exactly what running them does."""
    obs = _observations(head, 1)[0]
    for solver in ("fast", "paper"):
        cfg = dataclasses.replace(CFG, solver=solver, paper_camera_steps=4, paper_steps=5, rerender_every=2)
        runs = {}
        for graphs in (True, False):
            with emulated_cuda(tmp_path / f"{solver}{graphs}") as rec:
                runs[graphs] = fit(obs, head, dataclasses.replace(cfg, cuda_graphs=graphs), device="cuda")
                launches = rec.graph_launches
            assert (launches > 0) == graphs
        _same(runs[True], runs[False])


def test_non_finite_maps_stop_a_captured_solve(tmp_path: Path, head: FlameModel) -> None:
    """A NaN that appears inside the replayed passes is still reported (the stop code is device state)."""
    obs = _observations(head, 1)[0]
    normals = obs.normals.copy()
    normals[~obs.mask] = np.nan  # outside the mask: validation accepts it; the strided L_n never reads it
    with emulated_cuda(tmp_path) as rec:
        r = fit(dataclasses.replace(obs, normals=normals), head, CFG, device="cuda")
        assert rec.graph_launches > 0
    assert np.isfinite(r.vertices).all()


# ------------------------------------------------------------------ StepGraph
def test_step_graph_on_numpy_just_calls_the_step() -> None:
    calls = []
    g = StepGraph(np, lambda: calls.append(1), "numpy step")
    for _ in range(3):
        g()
    assert calls == [1, 1, 1] and g.launches == 0 and g.mode == "eager"


def test_step_graph_warms_up_captures_then_replays(tmp_path: Path) -> None:
    """First call eager, second captured and launched, the rest launched; a Python counter
    inside the step is frozen at capture, exactly as in a real graph."""
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        x = cp.zeros(3)
        seen = []

        def step() -> None:
            seen.append(len(seen))
            x[...] = x * 2.0 + 1.0 + len(seen)  # the Python number is a kernel argument: frozen

        g = StepGraph(cp, step, "test step")
        for _ in range(4):
            g()
        assert g.mode == "graph" and g.launches == 3 and rec.captures == 1 and rec.graph_launches == 3
        assert seen == [0, 1]  # Python ran at the warm-up and at the capture only
        want = 0.0
        for k in (1, 2, 2, 2):  # the replays keep the value captured at the second call
            want = want * 2.0 + 1.0 + k
        assert np.allclose(x.get(), want)


def test_emulated_capture_runs_nothing_and_leaves_temporaries_unwritten(tmp_path: Path) -> None:
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        x = cp.ones(4)
        s = cp.cuda.Stream(non_blocking=True)
        s.begin_capture()
        y = x + 1.0
        x[...] = y * 3.0
        graph = s.end_capture()
        assert np.allclose(x.get(), 1.0)  # the capture did not write x
        assert not np.allclose(y.get(), 2.0)  # a captured temporary holds garbage until a launch
        graph.launch()
        assert np.allclose(x.get(), 6.0) and np.allclose(y.get(), 2.0)
        graph.launch()
        assert np.allclose(x.get(), 21.0)
        assert rec.graph_nodes == 3 and rec.graph_launches == 2  # x + 1, * 3, the write into x


def test_step_graph_falls_back_when_the_step_cannot_be_captured(tmp_path: Path) -> None:
    """A host read inside the step fails the capture (as in CUDA): one warning, eager from then on."""
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        x = cp.zeros(())
        calls = []

        def step() -> None:
            calls.append(1)
            x[...] = x + 1.0
            if float(x) > 100:  # a host read: not capturable
                x[...] = 0.0

        g = StepGraph(cp, step, "reading step")
        with pytest.warns(RuntimeWarning, match="reading step: CUDA graph capture failed"):
            for _ in range(4):
                g()
        assert g.mode == "fallback" and g.launches == 0 and rec.graph_launches == 0
        assert float(x) == 4.0  # every call ran once (the failed capture wrote nothing)


def test_graphs_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("P3DMM_CUDA_GRAPHS", "0")
    assert not graphs_enabled()
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        g = StepGraph(cp, lambda: None, "off")
        g(), g()
        assert g.mode == "eager" and rec.captures == 0
    monkeypatch.delenv("P3DMM_CUDA_GRAPHS")
    assert graphs_enabled() and not graphs_enabled(False)


def test_capture_error_is_what_cupy_raises_for_uploads(tmp_path: Path) -> None:
    with emulated_cuda(tmp_path):
        import cupy as cp

        s = cp.cuda.Stream(non_blocking=True)
        s.begin_capture()
        with pytest.raises(CaptureError, match="host-to-device"):
            cp.asarray(np.ones(3))
        s.end_capture()
