"""Fitter robustness: extreme poses, no degenerate optimum, the fitted camera, any map size,
convention mistakes, predictor-like errors, and the quality report."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from p3dmm.fitting import Camera, FitConfig, FittingError, FlameModel, InputError, Observation, fit, render_maps
from p3dmm.fitting.base.errors import ConventionWarning, FitQualityWarning
from p3dmm.fitting.base.rotation import rotation_to_axis_angle
from p3dmm.fitting.fitter.problem import prepare
from p3dmm.fitting.fitter.state import FitState
from p3dmm.fitting.metrics import vertex_errors
from p3dmm.training.synth import rotation_from_euler

from . import corruption


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


def _face(model, seed, yaw=20.0, pitch=5.0, roll=3.0, expr=0.5, jaw=0.1):
    rng = np.random.default_rng(seed)
    p = model.zero_params()
    p.shape[:50] = rng.normal(size=50)
    p.expr[:50] = np.clip(rng.normal(size=50) * expr, -3 * expr, 3 * expr)
    p.pose[0] = rotation_to_axis_angle(rotation_from_euler(*np.radians([yaw, pitch, roll])))
    p.pose[2, 0] = jaw
    return p


def _observe(model, params, size=256, focal=1200.0, space="camera", distance=1.0):
    cam = Camera.frontal(distance=distance, focal=focal * size / 512, width=size, height=size)
    maps = render_maps(model, params, cam, normal_space=space, rgb=False)
    return cam, Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask, normal_space=space)


def _err(model, params, r):
    return vertex_errors(r.vertices, model.vertices(params), model.masks["face"])["mean_mm"]


def _camera_err(model, params, cam, r):
    """Mean face-vertex distance in the camera frame, no alignment (mm)."""
    face = model.masks["face"]
    a = r.camera.to_camera(r.vertices.astype(np.float64))[face]
    b = cam.to_camera(np.asarray(model.vertices(params), np.float64))[face]
    return 1000.0 * float(np.linalg.norm(a - b, axis=1).mean())


# ------------------------------------------------------------------ extreme poses
@pytest.mark.parametrize(
    ("yaw", "pitch", "roll", "expr", "jaw"),
    [(-75, 10, -8, 0.0, 0.05), (75, -20, 15, 1.5, 0.35), (-30, 28, 18, 1.2, 0.2), (45, -28, -18, 0.8, 0.4)],
)
def test_fast_solver_at_extreme_poses(head, yaw, pitch, roll, expr, jaw):
    p = _face(head, 100 + yaw, yaw, pitch, roll, expr, jaw)
    _, obs = _observe(head, p)
    r = fit(obs, head, FitConfig())
    assert _err(head, p, r) < 1.6, (r.report, _err(head, p, r))
    assert r.converged and not r.issues and r.quality["confidence"] > 0.8


# ------------------------------------------------------------ no degenerate optimum
def test_losing_correspondences_never_lowers_the_energy(head):
    """Moving the head out of the image, or turning it away, costs at least as much as the truth."""
    p = _face(head, 3)
    _, obs = _observe(head, p, size=128)
    problem, state0, _ = prepare(obs, head, FitConfig(render_size=64), np)
    truth = FitState(shape=p.shape.copy(), expr=p.expr.copy(), pose=p.pose.copy(), t=np.array([0, 0, 1.0], np.float32),
                     log_f=np.array(np.log(1200.0 * 128 / 512), np.float32), pp=np.array([63.5, 63.5], np.float32))  # fmt: skip
    def energy(s):  # noqa: E306 - a re-render per state: visibility and coverage follow the head
        return problem.energy(s, problem.render(s), with_grad=False)

    e_true = energy(truth)
    away = truth.copy()
    away.t = np.array([1.0, 0.0, 1.0], np.float32)  # far out of the image
    e_away = energy(away)
    assert int(e_away.n_uv_active) == 0 and int(e_away.n_normal_active) == 0
    w = problem.config.weights
    # every target and mask pixel pays its cap: the data terms are at their maximum
    np.testing.assert_allclose(float(e_away.uv), w.uv * w.uv_cap, rtol=1e-5)
    np.testing.assert_allclose(float(e_away.normal), w.normal * w.normal_cap, rtol=1e-5)
    def data(e):  # noqa: E306
        return float(e.uv) + float(e.normal)

    assert data(e_true) < 0.1 * data(e_away)
    turned = truth.copy()
    turned.pose[0] = rotation_to_axis_angle(rotation_from_euler(np.radians(160.0), 0.0, 0.0))
    assert data(energy(turned)) > 5 * data(e_true)


# ------------------------------------------------------------------------ camera
def test_known_focal_gives_a_metric_camera_frame_mesh(head):
    """With the focal length known, depth is fixed up to the head's size, which the image
    cannot tell from its distance: for a head of mean size (what the identity prior
    assumes) the camera-frame mesh is right without any alignment."""
    p = _face(head, 8, yaw=-25)
    p.shape[:] = 0.0
    cam, obs = _observe(head, p, size=256, focal=2400.0, distance=2.0)
    f_true = float(cam.focal)
    known = fit(obs, head, FitConfig(focal=f_true, principal_point=(127.5, 127.5)))
    assert float(known.camera.focal) == pytest.approx(f_true, rel=1e-6)
    np.testing.assert_allclose(known.camera.principal, [127.5, 127.5], atol=1e-4)
    assert _camera_err(head, p, cam, known) < 15.0  # mm at 2 m, no alignment
    assert abs(float(known.camera.t[2]) - 2.0) < 0.02  # metres
    free = fit(obs, head, FitConfig())
    # without the focal length depth and focal trade off: the projection is what is determined
    f_ratio = float(free.camera.focal) / f_true
    z_ratio = float(free.camera.t[2]) / 2.0
    assert abs(f_ratio - z_ratio) < 0.05 * f_ratio
    face = head.masks["face"]
    reproj = free.camera.project(free.vertices.astype(np.float64))[face]
    true_px = cam.project(np.asarray(head.vertices(p), np.float64))[face]
    assert float(np.linalg.norm(reproj - true_px, axis=1).mean()) < 1.0  # px at 256
    assert _camera_err(head, p, cam, known) < _camera_err(head, p, cam, free)


def test_bad_known_camera_values_are_input_errors():
    with pytest.raises(InputError, match="focal must be a positive"):
        FitConfig(focal=-3.0)
    with pytest.raises(InputError, match=r"principal_point must be \(cx, cy\)"):
        FitConfig(principal_point=(1.0,))


# ------------------------------------------------------------------- map sizes
@pytest.mark.parametrize("size", [64, 128, 200, 1024, 2048])
def test_any_map_size_fits(head, size):
    p = _face(head, 11)
    _, obs = _observe(head, p, size=size)
    r = fit(obs, head, FitConfig())
    assert _err(head, p, r) < (1.5 if size < 128 else 1.0)
    assert r.camera.width == size and r.camera.height == size


def test_render_size_above_the_map_size(head):
    p = _face(head, 11)
    _, obs = _observe(head, p, size=128)
    r = fit(obs, head, FitConfig(render_size=1000))
    assert _err(head, p, r) < 1.0


def test_accuracy_does_not_depend_on_the_map_size(head):
    """Pins the observation -> render rescale (its half pixel) and the 512 px-relative UV cap."""
    errs = {}
    for size in (256, 512):
        p = _face(head, 12)
        _, obs = _observe(head, p, size=size)
        errs[size] = _err(head, p, fit(obs, head, FitConfig()))
    assert abs(errs[512] - errs[256]) < 0.15, errs
    assert max(errs.values()) < 0.8, errs


# ------------------------------------------------------------------ conventions
@pytest.mark.parametrize(
    ("mistake", "match"),
    [
        ("negated", "normals look like they have a flipped sign"),
        ("head_as_camera", "normals look like they are in head space, not camera space"),
        ("camera_as_head", "normals look like they are in camera space, not head space"),
        ("swapped_uv", "uv looks like it has its u and v channels swapped"),
        ("uv_minus_one_one", r"outside \[0, 1\]; expected FLAME UV"),
    ],
)
def test_convention_mistakes_are_named(head, mistake, match):
    p = _face(head, 13)
    cam, obs = _observe(head, p)
    if mistake == "negated":
        obs = Observation(-obs.normals, obs.uv, obs.mask)
    elif mistake == "head_as_camera":
        obs = Observation(_observe(head, p, space="head")[1].normals, obs.uv, obs.mask)
    elif mistake == "camera_as_head":
        obs = Observation(obs.normals, obs.uv, obs.mask, normal_space="head")
    elif mistake == "swapped_uv":
        obs = Observation(obs.normals, np.ascontiguousarray(obs.uv[..., ::-1]), obs.mask)
    else:
        obs = Observation(obs.normals, obs.uv * 2 - 1, obs.mask)
    with pytest.raises(InputError, match=match):
        fit(obs, head, FitConfig())


def test_with_the_convention_check_off_a_mistake_is_a_collapsed_fit(head):
    """The runtime knows its conventions (manifest), so it turns the check off: negated
    normals then give a result marked as collapsed, not an InputError."""
    p = _face(head, 13)
    _, obs = _observe(head, p)
    with pytest.warns(FitQualityWarning):
        r = fit(Observation(-obs.normals, obs.uv, obs.mask), head, FitConfig(check_conventions=False))
    assert not r.converged and r.quality["normal_agreement"] < 0.15 and r.issues


def test_uv_off_the_atlas_is_a_named_issue(head):
    """UV normalised to its own min/max (a visualisation mistake) reads off the UV atlas."""
    p = _face(head, 13)
    _, obs = _observe(head, p)
    u = obs.uv[obs.mask]
    lo, hi = u.min(0), u.max(0)
    uv = np.where(obs.mask[..., None], (obs.uv - lo) / (hi - lo), 0).astype(np.float32)
    with pytest.warns(ConventionWarning, match="observation.uv is not in this model's UV layout"):
        r = fit(Observation(obs.normals, uv, obs.mask), head, FitConfig())
    assert not r.converged and r.quality["uv_in_atlas"] < 0.7
    assert any("UV atlas" in s for s in r.issues)
    # the model's own layout, also with a predictor's errors and an occluder: on the atlas
    rng = np.random.default_rng(1)
    noisy = corruption.occluder(corruption.uv_error(obs, rng), rng)
    for o in (obs, noisy):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConventionWarning)
            r = fit(o, head, FitConfig())
        assert r.quality["uv_in_atlas"] > 0.8 and not any("UV atlas" in s for s in r.issues)


def test_flipped_v_is_named_when_nothing_corresponds(head):
    p = _face(head, 13)
    _, obs = _observe(head, p)
    uv = np.where(obs.mask[..., None], np.stack([obs.uv[..., 0], 1 - obs.uv[..., 1]], -1), 0).astype(np.float32)
    with pytest.raises(FittingError, match="looks like it has a flipped v axis"):
        fit(Observation(obs.normals, uv, obs.mask), head, FitConfig())


# ----------------------------------------------------------------- quality report
def test_quality_of_a_good_and_a_bad_fit(head):
    p = _face(head, 14)
    _, obs = _observe(head, p)
    good = fit(obs, head, FitConfig())
    assert good.converged and not good.issues
    assert good.quality["uv_explained"] > 0.9 and good.quality["normal_agreement"] > 0.95
    assert 0.9 < good.quality["confidence"] <= 1.0
    assert good.report["quality"] == good.quality
    # garbage normals (no reading of them agrees): the fit says so
    n = np.random.default_rng(0).normal(size=obs.normals.shape)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    bad_obs = Observation(n.astype(np.float32), obs.uv, obs.mask)
    with pytest.warns(FitQualityWarning, match="does not match the normal map"):
        bad = fit(bad_obs, head, FitConfig())
    assert not bad.converged and any("normal map" in s for s in bad.issues)
    assert bad.quality["normal_agreement"] < 0.15 and bad.quality["confidence"] < good.quality["confidence"] - 0.5


def test_degenerate_inputs_give_a_result_or_a_p3dmm_error(head):
    one = Observation(np.array([[[0, 0, -1.0]]], np.float32), np.full((1, 1, 2), 0.5, np.float32), np.ones((1, 1), bool))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitQualityWarning)
        for solver in ("fast", "paper"):
            r = fit(one, head, FitConfig(solver=solver, min_mask_pixels=0, min_targets=0, paper_camera_steps=2, paper_steps=2))
            assert not r.converged and r.issues and np.isfinite(r.vertices).all()
    p = _face(head, 16)
    _, obs = _observe(head, p, size=128)
    r = fit(obs, head, FitConfig(solver="paper", paper_camera_steps=0, paper_steps=0))
    assert r.stop_reason == "schedule" and r.iterations == 0


# ------------------------------------------------------------ predictor-like errors
def test_error_grows_with_the_corruption_without_catastrophe(head):
    p = _face(head, 17, yaw=25, expr=0.8)
    _, obs = _observe(head, p)
    errs, conf = [], []
    for level in (0.0, 0.5, 1.0):
        r = fit(corruption.predictor_like(obs, np.random.default_rng(5), level), head, FitConfig())
        errs.append(_err(head, p, r))
        conf.append(r.quality["confidence"])
    assert errs[0] < errs[1] < errs[2] < 7.0, errs
    assert conf[0] > conf[1] > conf[2], conf


@pytest.mark.parametrize(
    "name",
    ["uv_error", "normal_error", "erode", "dilate", "occluder", "missing_region"],
)
def test_each_predictor_like_error_alone_is_survivable(head, name):
    p = _face(head, 18, yaw=-15)
    _, obs = _observe(head, p)
    rng = np.random.default_rng(9)
    fn = getattr(corruption, name)
    bad = fn(obs, 3) if name in ("erode", "dilate") else fn(obs, rng)
    r = fit(bad, head, FitConfig())
    limit = {"normal_error": 5.0, "uv_error": 2.5, "occluder": 3.5, "missing_region": 2.0}.get(name, 1.0)
    assert _err(head, p, r) < limit, (name, _err(head, p, r))
    assert r.converged


@pytest.mark.slow
def test_fast_is_not_clearly_worse_than_paper_under_predictor_like_errors(head):
    p = _face(head, 19, yaw=25, expr=0.8)
    _, obs = _observe(head, p)
    bad = corruption.predictor_like(obs, np.random.default_rng(22), 1.0)
    fast = _err(head, p, fit(bad, head, FitConfig()))
    paper = _err(head, p, fit(bad, head, FitConfig(solver="paper")))
    assert fast < 1.2 * paper + 0.3, (fast, paper)
