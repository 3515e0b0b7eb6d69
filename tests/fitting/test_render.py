"""render_maps: normals, UV, masks and the photo-like RGB of a posed head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from p3dmm.fitting import Camera, FlameModel, FlameParams, InputError
from p3dmm.fitting.base.camera import FLAME_TO_OPENCV
from p3dmm.fitting.base.geometry import vertex_normals
from p3dmm.fitting.model.lbs import flame_forward
from p3dmm.fitting.render.appearance import Appearance
from p3dmm.fitting.render.maps import render_maps, render_mesh_maps
from p3dmm.fitting.render.sh import sh_basis

SIZE = 96


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


def posed_params(model: FlameModel, global_pose=(0.0, 0.0, 0.0)) -> FlameParams:
    """A moderately posed head: identity, expression, open jaw, neck turn, gaze."""
    rng = np.random.default_rng(3)
    p = model.zero_params()
    p.shape[:20] = rng.normal(0, 1, 20)
    p.expr[:10] = rng.normal(0, 0.8, 10)
    p.pose[0] = global_pose
    p.pose[1] = (0.05, 0.1, 0.0)
    p.pose[2] = (0.2, 0.0, 0.0)
    p.pose[3:] = (0.05, 0.1, 0.0)
    return p


def camera_on_root_axis(model: FlameModel, params: FlameParams, size: int = SIZE, distance: float = 0.9) -> Camera:
    """Frontal camera whose optical axis is FLAME's z axis through the root joint."""
    _, cache = flame_forward(model, params)
    j0 = np.asarray(cache.posed_joints[0], dtype=np.float64) + np.asarray(params.transl, dtype=np.float64)
    R = FLAME_TO_OPENCV
    centre = j0 + np.array([0.0, 0.0, distance])
    return Camera(
        focal=np.float32(size * distance / 0.32),
        principal=np.array([(size - 1) / 2, (size - 1) / 2], dtype=np.float32),
        R=R.astype(np.float32),
        t=(-R @ centre).astype(np.float32),
        width=size,
        height=size,
    )


@pytest.fixture(scope="module")
def rendered(head):
    p = posed_params(head, global_pose=(0.1, 0.4, 0.05))
    cam = camera_on_root_axis(head, p)
    return p, cam, render_maps(head, p, cam, normal_space="camera", rng=np.random.default_rng(7))


def test_vertex_normals_point_outward_on_a_sphere():
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=2, radius=0.1)
    v = np.asarray(s.vertices)
    n = vertex_normals(v, np.asarray(s.faces))
    radial = v / np.linalg.norm(v, axis=1, keepdims=True)
    assert (n * radial).sum(1).min() > 0.99


def test_normals_unit_and_facing_the_camera(rendered):
    _, cam, m = rendered
    cov = m.coverage
    assert 0.1 < cov.mean() < 0.9
    n = m.normals[cov]
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-5)
    assert np.all(m.normals[~cov] == 0)
    # OpenCV camera: z points away from the camera into the scene, so the outward
    # normal of a surface seen from the front points back at the camera: n_z < 0.
    assert (n[:, 2] < 0).mean() > 0.9
    # stricter: n . (ray to the pixel's 3D point) < 0 wherever a front face is visible
    rows, cols = np.nonzero(cov)
    K = cam.K
    rays = np.stack([(cols - K[0, 2]) / K[0, 0], (rows - K[1, 2]) / K[1, 1], np.ones(len(rows))], 1)
    front = (n * rays).sum(1) < 0
    assert front.mean() > 0.95  # the rest: silhouettes and the mouth cavity's back faces


def test_uv_masks_and_regions(rendered, head):
    _, _, m = rendered
    cov = m.coverage
    assert m.uv.dtype == np.float32 and m.uv.shape == (SIZE, SIZE, 2)
    assert m.uv.min() >= 0 and m.uv.max() <= 1
    assert np.all(m.uv[~cov] == 0)
    # per-face UVs through ft: recompute a few pixels by hand
    rows, cols = np.nonzero(cov)
    for r, c in list(zip(rows, cols))[:: max(1, len(rows) // 25)]:
        f = m.face_id[r, c]
        want = (m.bary[r, c, :, None] * head.uv.vt[head.uv.ft[f]]).sum(0)
        np.testing.assert_allclose(m.uv[r, c], np.clip(want, 0, 1), atol=1e-6)
    assert set(m.regions) == set(head.masks)
    np.testing.assert_array_equal(m.mask, m.regions["face"])
    assert m.mask.any() and not np.any(m.mask & ~cov)
    for name, reg in m.regions.items():
        assert reg.dtype == bool and not np.any(reg & ~cov), name
    assert m.depth[cov].min() > 0 and np.all(m.depth[~cov] == 0)


def test_head_space_normals_invariant_to_global_rotation(head):
    """A 90-degree global roll about the camera axis just rotates the image.

    The camera's optical axis is FLAME's z axis through the root joint, so rotating the
    head by +90 degrees about z (pose[0] = (0, 0, pi/2)) maps pixel (r, c) of the
    unrotated render to (W-1-c, r): image B = rot90(image A). Head-space normals must be
    equal there; camera-space normals rotate: (nx, ny, nz) -> (ny, -nx, nz).
    """
    pa = posed_params(head)
    pb = posed_params(head, global_pose=(0.0, 0.0, np.pi / 2))
    cam = camera_on_root_axis(head, pa)
    a_head = render_maps(head, pa, cam, normal_space="head", rgb=False)
    b_head = render_maps(head, pb, cam, normal_space="head", rgb=False)
    a_cam = render_maps(head, pa, cam, normal_space="camera", rgb=False)
    b_cam = render_maps(head, pb, cam, normal_space="camera", rgb=False)
    fa = np.rot90(a_head.face_id)
    same = (fa == b_head.face_id) & (fa >= 0)
    both = (fa >= 0) & (b_head.face_id >= 0)
    assert same.sum() > 0.99 * both.sum() and both.sum() > 500
    np.testing.assert_allclose(b_head.normals[same], np.rot90(a_head.normals)[same], atol=2e-4)
    ra = np.rot90(a_cam.normals)[same]
    want = np.stack([ra[:, 1], -ra[:, 0], ra[:, 2]], 1)
    np.testing.assert_allclose(b_cam.normals[same], want, atol=2e-4)
    assert np.abs(b_cam.normals[same] - ra).max() > 0.5  # camera space does change
    # with no global rotation and a FLAME_TO_OPENCV camera: n_head = diag(1, -1, -1) n_cam
    np.testing.assert_allclose(a_head.normals, a_cam.normals * np.array([1, -1, -1], np.float32), atol=1e-6)


def test_rgb_looks_like_an_image_and_is_deterministic(rendered, head):
    p, cam, m = rendered
    img = m.rgb
    assert img.dtype == np.uint8 and img.shape == (SIZE, SIZE, 3)
    assert img.std() > 10
    face = img[m.mask].astype(float)
    assert face.std(0).mean() > 3  # shading and texture, not a flat colour
    again = render_maps(head, p, cam, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(again.rgb, img)
    fixed = render_maps(head, p, cam, appearance=Appearance.from_dict(m.appearance.to_dict()))
    np.testing.assert_array_equal(fixed.rgb, img)
    other = render_maps(head, p, cam, rng=np.random.default_rng(8))
    assert np.abs(other.rgb.astype(int) - img).mean() > 5
    np.testing.assert_array_equal(other.normals, m.normals)  # maps don't depend on the appearance


def test_appearances_vary(head):
    apps = [Appearance.sample(np.random.default_rng(s)) for s in range(20)]
    skin = np.array([a.skin for a in apps])
    assert skin[:, 0].max() - skin[:, 0].min() > 0.3  # light to dark skin
    assert len({a.background for a in apps}) >= 3
    assert all(np.asarray(a.lips)[0] > np.asarray(a.lips)[1] for a in apps)  # reddish lips
    d = np.array([a.key_dir for a in apps])
    assert np.all(d[:, 2] < 0) and np.all(d[:, 1] < 0)  # from the camera side, from above
    with pytest.raises(InputError, match="missing fields"):
        Appearance.from_dict({"seed": 1})


def test_sh_basis_key_lobe_approximates_clamped_cosine():
    n = np.random.default_rng(0).normal(size=(500, 3))
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    d = np.array([[0.0, 0.0, 1.0]])
    A = np.pi * np.array([1, 2 / 3, 2 / 3, 2 / 3, 1 / 4, 1 / 4, 1 / 4, 1 / 4, 1 / 4])
    lobe = sh_basis(n) @ (A * sh_basis(d)[0])
    assert np.abs(lobe - np.maximum(n[:, 2], 0)).max() < 0.11  # band-2 truncation error


def test_texture_albedo_and_size_scaling(head):
    p = posed_params(head)
    cam = camera_on_root_axis(head, p, size=128)
    tex = np.zeros((32, 32, 3), np.uint8)
    tex[..., 0] = 200
    verts = head.vertices(p)
    app = dataclasses.replace(Appearance.sample(np.random.default_rng(1)), jpeg_quality=0, noise_sigma=0.0)
    m = render_mesh_maps(head, verts, cam, size=64, appearance=app, albedo_texture=tex)
    assert m.rgb.shape == (64, 64, 3) and m.camera.width == 64
    skin = m.rgb[m.mask & ~m.regions.get("left_eyeball", np.zeros_like(m.mask))].astype(float)
    assert skin[:, 0].mean() > 4 * skin[:, 1].mean() + 1  # a red texture gives red skin
    full = render_maps(head, p, cam, rgb=False)
    assert abs(full.coverage.mean() - m.coverage.mean()) < 0.02  # same framing at half size


def test_bad_inputs(head):
    p = head.zero_params()
    cam = Camera.frontal(width=32, height=32)
    with pytest.raises(InputError, match="normal_space"):
        render_maps(head, p, cam, normal_space="world")
    with pytest.raises(InputError, match="vertices have shape"):
        render_mesh_maps(head, np.zeros((10, 3)), cam)
    with pytest.raises(InputError, match="no UV layout"):
        render_maps(dataclasses.replace(head, uv=None), p, cam)
    with pytest.raises(InputError, match="size"):
        render_maps(head, p, cam, size=0)
