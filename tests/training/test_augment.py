"""Augmentation: the UV mirror map, flips that match a render of the mirrored head, photometric ops."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from p3dmm.fitting import Camera, FlameModel
from p3dmm.fitting.base.errors import InputError
from p3dmm.fitting.base.rotation import rodrigues
from p3dmm.fitting.model.synthetic_head import mirror_vertex_map
from p3dmm.fitting.render.maps import render_maps, render_mesh_maps
from p3dmm.fitting.render.sensor import jpeg_roundtrip, to_uint8
from p3dmm.training.augment import (
    AugmentConfig,
    UVMirror,
    adjust_colour,
    augment_sample,
    hflip_sample,
    mirror_vertex_map_from_template,
    paint_occluders,
    swap_background,
)
from p3dmm.training.synth import sample_flame_params
from scipy.ndimage import binary_erosion

SIZE = 128
M = np.diag([-1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


@pytest.fixture(scope="module")
def uv_mirror(head: FlameModel) -> UVMirror:
    return UVMirror.from_model(head)


def _uv_points(head: FlameModel, n: int, seed: int) -> np.ndarray:
    """Random points inside the UV triangles of the layout, ``(n, 2)``."""
    rng = np.random.default_rng(seed)
    f = rng.integers(0, head.n_faces, n)
    b = rng.dirichlet([1.0, 1.0, 1.0], n)
    # uv[n, c] = sum_k b[n, k] * vt[ft[f[n], k], c]
    return np.einsum("nk,nkc->nc", b, head.uv.vt[head.uv.ft[f]].astype(np.float64))


def test_vertex_map_from_template_matches_the_exact_map(head: FlameModel) -> None:
    exact = mirror_vertex_map(head)
    assert_array_equal(mirror_vertex_map_from_template(head.v_template), exact)
    # a template that is symmetric only up to 20 micrometres (as real FLAME) gives the same map
    noisy = head.v_template + np.random.default_rng(0).normal(0.0, 2e-5, head.v_template.shape)
    assert_array_equal(mirror_vertex_map_from_template(noisy), exact)
    with pytest.raises(InputError, match="v_template"):
        mirror_vertex_map_from_template(np.zeros((4, 2)))


def test_uv_mirror_is_an_involution(head: FlameModel, uv_mirror: UVMirror) -> None:
    assert uv_mirror.unmatched_faces == 0
    assert uv_mirror.table.shape == (1024, 1024, 2) and uv_mirror.table.dtype == np.float32
    uv = _uv_points(head, 20000, seed=1)
    once = uv_mirror(uv)
    twice = uv_mirror(once)
    err = np.abs(twice - uv).max(axis=1)
    # exact up to bilinear sampling; points within a texel of a triangle edge err by < 1 texel
    assert np.median(err) < 1e-6
    assert np.quantile(err, 0.99) < 1e-5
    assert err.max() < 1.5 / 1024
    # the synthetic layout is symmetric about u = 0.5, so its mirror is u -> 1 - u
    assert_allclose(once, np.stack([1.0 - uv[:, 0], uv[:, 1]], axis=1), atol=1.5 / 1024)


def test_uv_mirror_with_identity_vertex_map_is_the_identity(head: FlameModel) -> None:
    ident = UVMirror.from_model(head, resolution=256, vertex_map=np.arange(head.n_vertices))
    uv = _uv_points(head, 2000, seed=2)
    assert ident.unmatched_faces == 0
    err = np.abs(ident(uv) - uv).max(1)
    assert np.median(err) < 1e-6 and err.max() < 1.5 / 256


def _frontal_camera(size: int) -> Camera:
    """A camera symmetric under x -> -x (t_x = 0, centred principal point)."""
    cam = Camera.frontal(distance=0.9, width=size, height=size)
    return Camera(cam.focal, cam.principal, cam.R, np.array([0.0, 0.0, 0.9], np.float32), size, size)


@pytest.mark.parametrize("normal_space", ["camera", "head"])
def test_flip_matches_a_render_of_the_mirrored_head(head: FlameModel, uv_mirror: UVMirror, normal_space: str) -> None:
    params = sample_flame_params(np.random.default_rng(3), head)
    cam = _frontal_camera(SIZE)
    maps = render_maps(head, params, cam, normal_space=normal_space, rgb=False)
    # The mirrored head: vertex i sits at the mirror image of vertex m[i], so every face
    # keeps its UVs and regions; its global rotation is M Rg M.
    m = mirror_vertex_map(head)
    verts = np.asarray(head.vertices(params), dtype=np.float64)
    Rg = rodrigues(np.asarray(params.pose[:1], dtype=np.float64))[0]
    mirrored = render_mesh_maps(
        head, (verts @ M)[m], cam, normal_space=normal_space, head_rotation=M @ Rg @ M, rgb=False
    )
    sample = {
        "image": np.zeros((SIZE, SIZE, 3), np.float32),
        "normals": maps.normals,
        "uv": maps.uv,
        "mask": maps.mask,
        "coverage": maps.coverage,
        "regions": maps.regions,
    }
    flipped = hflip_sample(sample, uv_mirror)
    assert_array_equal(flipped["coverage"], mirrored.coverage)
    assert_array_equal(flipped["mask"], mirrored.mask)
    for name, region in mirrored.regions.items():
        assert_array_equal(flipped["regions"][name], region, err_msg=name)
    assert mirrored.coverage.sum() > 3000
    inner = binary_erosion(mirrored.coverage, iterations=1)
    assert_allclose(flipped["normals"][inner], mirrored.normals[inner], atol=1e-6)
    assert_allclose(flipped["uv"][inner], mirrored.uv[inner], atol=1.5 / 1024)
    assert np.all(flipped["normals"][~mirrored.coverage] == 0) and np.all(flipped["uv"][~mirrored.coverage] == 0)


def test_flip_twice_is_the_identity(head: FlameModel, uv_mirror: UVMirror) -> None:
    params = sample_flame_params(np.random.default_rng(5), head)
    maps = render_maps(head, params, _frontal_camera(64), rgb=True)
    sample = {"rgb": maps.rgb, "normals": maps.normals, "uv": maps.uv, "mask": maps.mask, "coverage": maps.coverage}
    back = hflip_sample(hflip_sample(sample, uv_mirror), uv_mirror)
    for key in ("rgb", "normals", "mask", "coverage"):
        assert_array_equal(back[key], sample[key], err_msg=key)
    assert_allclose(back["uv"], sample["uv"], atol=1.5 / 1024)
    with pytest.raises(InputError, match="UVMirror"):
        hflip_sample(sample, None)


@pytest.fixture(scope="module")
def rendered(head: FlameModel) -> dict:
    params = sample_flame_params(np.random.default_rng(7), head)
    maps = render_maps(head, params, _frontal_camera(96), rgb=True)
    return {"rgb": maps.rgb, "normals": maps.normals, "uv": maps.uv, "mask": maps.mask, "coverage": maps.coverage}


def test_augment_sample_is_deterministic_and_keeps_targets(rendered: dict, uv_mirror: UVMirror) -> None:
    cfg = AugmentConfig(flip_prob=0.0, background_prob=1.0, occluder_prob=1.0, colour_prob=1.0, blur_prob=1.0,
                        noise_prob=1.0, jpeg_prob=1.0)
    a = augment_sample(rendered, np.random.default_rng([0, 1, 2]), cfg, uv_mirror)
    b = augment_sample(rendered, np.random.default_rng([0, 1, 2]), cfg, uv_mirror)
    c = augment_sample(rendered, np.random.default_rng([0, 2, 2]), cfg, uv_mirror)
    assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].dtype == np.float32 and a["image"].shape == (96, 96, 3) and "rgb" not in a
    assert 0.0 <= a["image"].min() and a["image"].max() <= 1.0
    for key in ("normals", "uv", "mask", "coverage"):  # photometric changes and occluders keep the targets
        assert_array_equal(a[key], rendered[key], err_msg=key)
    assert a["occluder"].dtype == bool and a["occluder"].any() and not a["flipped"]


def test_augment_sample_flips_with_the_targets(rendered: dict, uv_mirror: UVMirror) -> None:
    cfg = AugmentConfig.disabled()
    plain = augment_sample(rendered, np.random.default_rng(0), cfg, uv_mirror)
    assert_allclose(plain["image"], rendered["rgb"] / 255.0, atol=1e-7)
    cfg = AugmentConfig(flip_prob=1.0, background_prob=0.0, occluder_prob=0.0, colour_prob=0.0, blur_prob=0.0,
                        noise_prob=0.0, jpeg_prob=0.0)
    out = augment_sample(rendered, np.random.default_rng(0), cfg, uv_mirror)
    ref = hflip_sample(rendered, uv_mirror)
    assert out["flipped"]
    assert_allclose(out["image"], ref["rgb"] / 255.0, atol=1e-7)
    for key in ("normals", "uv", "mask", "coverage"):
        assert_array_equal(out[key], ref[key], err_msg=key)


def test_background_swap_and_occluders(rendered: dict) -> None:
    img = rendered["rgb"].astype(np.float32) / 255.0
    cov = rendered["coverage"]
    swapped = swap_background(img, cov, np.random.default_rng(1))
    assert_array_equal(swapped[cov], img[cov])
    assert not np.allclose(swapped[~cov], img[~cov])
    painted, occ = paint_occluders(img, cov, np.random.default_rng(2), AugmentConfig(occluder_size=(0.3, 0.4)))
    assert (occ & cov).any()
    changed = np.abs(painted - img).max(-1) > 1e-6
    assert not changed[~occ].sum() > 0.05 * changed.size  # only soft edges change outside the mask
    assert painted.dtype == np.float32


def test_photometric_ops() -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (32, 32, 3)).astype(np.float32)
    grey = np.repeat(img[..., :1], 3, axis=2)
    cfg = AugmentConfig(brightness=0.0, contrast=0.0, saturation=0.5, gamma=(1.0, 1.0))
    # saturation and hue change nothing on a grey image
    assert_allclose(adjust_colour(grey, np.random.default_rng(1), cfg), grey, atol=1e-6)
    out = jpeg_roundtrip(to_uint8(img), 40).astype(np.float32) / 255.0
    assert out.shape == img.shape and out.dtype == np.float32
    assert 0.0 < np.abs(out - img).mean() < 0.3


def test_config_validation_and_round_trip() -> None:
    cfg = AugmentConfig(flip_prob=0.25, jpeg_quality=(50, 90))
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="flip_prob"):
        AugmentConfig(flip_prob=1.5)
    with pytest.raises(InputError, match="gamma"):
        AugmentConfig(gamma=(1.5, 1.0))


def test_augment_imports_without_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
        "import p3dmm.training.augment\n"
        "import p3dmm.training.train_cli\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
