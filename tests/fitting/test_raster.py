"""Tests of p3dmm.fitting.render.raster.rasterize (CPU numba path; GPU parity when a GPU exists)."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh
from numpy.testing import assert_allclose, assert_array_equal
from p3dmm.fitting import BackendUnavailableError, Camera, InputError
from p3dmm.fitting.base import cuda as _cuda
from p3dmm.fitting.base.camera import FLAME_TO_OPENCV
from p3dmm.fitting.render.raster import GUARD_BAND_PX, Fragments, rasterize

# ----------------------------------------------------------------------------- helpers


def pinhole(height: int, width: int, focal: float) -> Camera:
    """Identity-pose camera with a centred principal point."""
    return Camera(
        focal=np.float32(focal),
        principal=np.array([(width - 1) / 2, (height - 1) / 2], dtype=np.float32),
        R=np.eye(3, dtype=np.float32),
        t=np.zeros(3, dtype=np.float32),
        width=width,
        height=height,
    )


def unproject(pix: np.ndarray, z: np.ndarray, cam: Camera) -> np.ndarray:
    """Pixel positions ``(N, 2)`` at depths ``(N,)`` -> camera-frame points ``(N, 3) float32``."""
    f = float(cam.focal)
    c = np.asarray(cam.principal, dtype=np.float64)
    xy = (np.asarray(pix, np.float64) - c) * np.asarray(z, np.float64)[:, None] / f
    return np.column_stack([xy, z]).astype(np.float32)


def project64(points: np.ndarray, cam: Camera) -> np.ndarray:
    """Float64 projection ``(N, 3) -> (N, 2)``."""
    p = np.asarray(points, np.float64)
    return float(cam.focal) * p[:, :2] / p[:, 2:3] + np.asarray(cam.principal, np.float64)


def coverage_counts(verts: np.ndarray, faces: np.ndarray, cam: Camera, h: int, w: int) -> np.ndarray:
    """How many faces cover each pixel, each face rasterized on its own: ``(H, W) int``."""
    counts = np.zeros((h, w), dtype=np.int64)
    for k in range(len(faces)):
        counts += rasterize(verts, faces[k : k + 1], cam).face_id >= 0
    return counts


def interpolate(frags: Fragments, verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Surface points ``(N, 3) float64`` of the covered pixels (row-major order)."""
    m = frags.face_id >= 0
    tri = np.asarray(verts, np.float64)[faces[frags.face_id[m]]]  # (N, 3 corners, 3)
    # p[n, d] = sum_k bary[n, k] * tri[n, k, d]
    return np.einsum("nk,nkd->nd", frags.bary[m].astype(np.float64), tri)


def rotation(axis_angle: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(axis_angle).as_matrix()


def ray_cast(verts_cam: np.ndarray, faces: np.ndarray, cam: Camera, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: first hit of the ray through every pixel centre (trimesh).

    Returns ``face_id (H, W)`` (-1 for no hit) and ``depth (H, W)`` (camera z, 0 for no hit).
    """
    mesh = trimesh.Trimesh(np.asarray(verts_cam, np.float64), faces, process=False)
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    f = float(cam.focal)
    cx, cy = (float(v) for v in cam.principal)
    dirs = np.column_stack([((jj - cx) / f).ravel(), ((ii - cy) / f).ravel(), np.ones(h * w)])
    origins = np.zeros_like(dirs)
    intersector = trimesh.ray.ray_triangle.RayMeshIntersector(mesh)
    tri, ray, loc = intersector.intersects_id(origins, dirs, multiple_hits=False, return_locations=True)
    face_id = np.full(h * w, -1, dtype=np.int64)
    depth = np.zeros(h * w)
    face_id[ray] = tri
    depth[ray] = loc[:, 2]
    return face_id.reshape(h, w), depth.reshape(h, w)


def assert_matches_ray_cast(verts_cam: np.ndarray, faces: np.ndarray, cam: Camera, h: int, w: int) -> None:
    frags = rasterize(verts_cam, faces, cam)
    ref_id, ref_depth = ray_cast(verts_cam, faces, cam, h, w)
    ours = frags.face_id >= 0
    theirs = ref_id >= 0
    both = ours & theirs
    assert both.sum() > 0.05 * h * w, "mesh should cover a good part of the image"
    # coverage can only differ at silhouette pixels within 1/256 px of an edge
    assert (ours ^ theirs).sum() <= max(2, 0.005 * theirs.sum())
    agree = frags.face_id[both] == ref_id[both]
    assert agree.mean() >= 0.995, f"face ids agree on {agree.mean():.4f} of covered pixels"
    assert_allclose(frags.depth[both][agree], ref_depth[both][agree], rtol=1e-4)


# ------------------------------------------------------------------------ analytic checks


def test_single_triangle_coverage_matches_point_in_triangle() -> None:
    h, w = 40, 48
    cam = pinhole(h, w, focal=60.0)
    pix = np.array([[3.3, 4.7], [44.1, 11.2], [17.6, 37.9]])
    tri = unproject(pix, np.array([1.0, 1.6, 2.3]), cam)
    frags = rasterize(tri, np.array([[0, 1, 2]]), cam)

    # brute force on the float64 projection: signed distances of pixel centres to each edge
    p = project64(tri, cam)
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    sign = np.sign((p[1, 0] - p[0, 0]) * (p[2, 1] - p[0, 1]) - (p[1, 1] - p[0, 1]) * (p[2, 0] - p[0, 0]))
    dists = []
    for a, b in ((0, 1), (1, 2), (2, 0)):
        e = (p[b, 0] - p[a, 0]) * (ii - p[a, 1]) - (p[b, 1] - p[a, 1]) * (jj - p[a, 0])
        dists.append(sign * e / np.hypot(*(p[b] - p[a])))
    dist = np.min(dists, axis=0)  # > 0 inside
    clear = np.abs(dist) > 2.0**-7  # farther from every edge than the 1/256 px snapping can move it
    inside = dist > 0
    assert inside.sum() > 200
    assert_array_equal(frags.face_id[clear] == 0, inside[clear])
    assert (~clear).sum() < 10


def test_barycentrics_are_perspective_correct() -> None:
    h, w = 32, 32
    cam = pinhole(h, w, focal=40.0)
    tri = unproject(np.array([[1.2, 2.5], [30.4, 6.1], [9.7, 29.8]]), np.array([0.8, 2.5, 1.4]), cam)
    faces = np.array([[0, 1, 2]])
    frags = rasterize(tri, faces, cam)
    m = frags.mask
    assert m.sum() > 100
    points = interpolate(frags, tri, faces)
    # the interpolated 3D point projects onto the pixel centre ...
    ii, jj = np.nonzero(m)
    assert_allclose(project64(points, cam), np.column_stack([jj, ii]), atol=2e-4)
    # ... its z is the depth, and the weights sum to one
    assert_allclose(frags.depth[m], points[:, 2], rtol=1e-6)
    assert_allclose(frags.bary[m].sum(-1), 1.0, atol=1e-6)
    assert frags.bary[m].min() > -1e-2
    # empty pixels: documented background values
    assert_array_equal(frags.face_id[~m], -1)
    assert_array_equal(frags.depth[~m], 0.0)
    assert_array_equal(frags.bary[~m], 0.0)


def test_output_types_and_shapes() -> None:
    cam = pinhole(20, 30, 30.0)
    tri = unproject(np.array([[2.0, 2.0], [25.0, 3.0], [10.0, 18.0]]), np.ones(3), cam)
    frags = rasterize(tri, np.array([[0, 1, 2]], dtype=np.int32), cam)
    assert frags.face_id.shape == (20, 30) and frags.face_id.dtype == np.int32
    assert frags.bary.shape == (20, 30, 3) and frags.bary.dtype == np.float32
    assert frags.depth.shape == (20, 30) and frags.depth.dtype == np.float32
    # float64 vertices and int64 faces give the same result
    frags64 = rasterize(tri.astype(np.float64), np.array([[0, 1, 2]], dtype=np.int64), cam)
    assert_array_equal(frags64.face_id, frags.face_id)
    assert_array_equal(frags64.depth, frags.depth)


# ------------------------------------------------------------------------------ fill rule


@pytest.mark.parametrize("flip", [False, True], ids=["ccw", "cw"])
@pytest.mark.parametrize("diagonal", [0, 1])
def test_axis_aligned_quad_is_half_open(flip: bool, diagonal: int) -> None:
    """Corners on pixel centres: top and left edges are inside, bottom and right are not."""
    h, w = 16, 16
    cam = pinhole(h, w, 20.0)
    corners = np.array([[2.0, 2.0], [12.0, 2.0], [12.0, 10.0], [2.0, 10.0]])
    verts = unproject(corners, np.array([1.0, 1.3, 1.7, 1.2]), cam)
    faces = np.array([[0, 1, 2], [0, 2, 3]] if diagonal == 0 else [[0, 1, 3], [1, 2, 3]])
    if flip:
        faces = faces[:, ::-1].copy()
    counts = coverage_counts(verts, faces, cam, h, w)
    expected = np.zeros((h, w), dtype=np.int64)
    expected[2:10, 2:12] = 1
    assert_array_equal(counts, expected)
    assert_array_equal(rasterize(verts, faces, cam).mask, expected == 1)


@pytest.mark.parametrize("split", ["horizontal", "vertical"])
def test_diamond_shared_edge_no_cracks_no_overlap(split: str) -> None:
    """Shared diagonal through pixel centres: every pixel of it is covered exactly once."""
    h, w = 15, 15
    cam = pinhole(h, w, 20.0)
    corners = np.array([[7.0, 1.0], [13.0, 7.0], [7.0, 13.0], [1.0, 7.0]])  # top, right, bottom, left
    verts = unproject(corners, np.array([1.0, 1.1, 1.2, 1.3]), cam)
    faces = np.array([[3, 0, 1], [3, 1, 2]] if split == "horizontal" else [[0, 1, 2], [0, 2, 3]])
    counts = coverage_counts(verts, faces, cam, h, w)
    assert counts.max() == 1
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    strictly_inside = np.abs(jj - 7) + np.abs(ii - 7) < 6
    assert_array_equal(counts[strictly_inside], 1)
    diag = (ii == 7) if split == "horizontal" else (jj == 7)
    assert_array_equal(counts[diag & strictly_inside], 1)


@pytest.mark.parametrize("jitter", [0.0, 0.2], ids=["on_pixel_centres", "jittered"])
def test_dense_grid_covers_every_pixel_exactly_once(jitter: float) -> None:
    h, w, step = 24, 24, 3
    cam = pinhole(h, w, 30.0)
    rng = np.random.default_rng(7)
    g = np.arange(-step, w + 2 * step, step, dtype=np.float64)
    n = len(g)
    gx, gy = np.meshgrid(g, g)
    pix = np.column_stack([gx.ravel(), gy.ravel()])
    if jitter:
        # sub-pixel jitter, plus some vertices snapped exactly onto pixel centres
        pix += rng.uniform(-jitter * step, jitter * step, size=pix.shape)
        pix[::5] = np.round(pix[::5])
    verts = unproject(pix, rng.uniform(0.8, 1.5, size=len(pix)), cam)
    quads: list[list[int]] = []
    for r in range(n - 1):
        for c in range(n - 1):
            a, b, d, e = r * n + c, r * n + c + 1, (r + 1) * n + c, (r + 1) * n + c + 1
            if rng.random() < 0.5:
                quads += [[a, b, e], [a, e, d]]
            else:
                quads += [[a, b, d], [b, e, d]]
    faces = np.array(quads)
    p = pix[faces]
    area = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 1, 1] - p[:, 0, 1]) * (p[:, 2, 0] - p[:, 0, 0])
    assert (area > 0).all(), "precondition: the jitter folds no triangle over"
    faces[1::3] = faces[1::3, ::-1]  # mixed windings must not matter without culling
    counts = coverage_counts(verts, faces, cam, h, w)
    assert_array_equal(counts, np.ones((h, w), dtype=np.int64))
    assert rasterize(verts, faces, cam).mask.all()


def test_fan_around_a_pixel_centre() -> None:
    """Twelve faces meeting at a vertex on a pixel centre: that pixel is covered once."""
    h, w = 21, 21
    cam = pinhole(h, w, 25.0)
    ang = np.linspace(0, 2 * np.pi, 12, endpoint=False) + 0.1
    ring = np.column_stack([10 + 8 * np.cos(ang), 10 + 8 * np.sin(ang)])
    ring[::3] = np.round(ring[::3])
    pix = np.vstack([[10.0, 10.0], ring])
    verts = unproject(pix, np.linspace(1.0, 1.5, len(pix)), cam)
    faces = np.array([[0, 1 + k, 1 + (k + 1) % 12] for k in range(12)])
    counts = coverage_counts(verts, faces, cam, h, w)
    assert counts.max() == 1
    assert counts[10, 10] == 1
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    assert_array_equal(counts[np.hypot(jj - 10, ii - 10) < 6.5], 1)  # well inside the 12-gon


# ------------------------------------------------------------------ occlusion and culling


def test_nearest_depth_wins_regardless_of_face_order() -> None:
    h, w = 24, 24
    cam = pinhole(h, w, 30.0)
    near_tri = unproject(np.array([[2.0, 3.0], [20.0, 5.0], [6.0, 21.0]]), np.full(3, 1.0), cam)
    far_tri = unproject(np.array([[4.0, 2.0], [22.0, 20.0], [3.0, 19.0]]), np.full(3, 2.0), cam)
    verts = np.vstack([far_tri, near_tri])
    for faces, near_id in ((np.array([[0, 1, 2], [3, 4, 5]]), 1), (np.array([[3, 4, 5], [0, 1, 2]]), 0)):
        frags = rasterize(verts, faces, cam)
        alone_near = rasterize(verts, faces[near_id : near_id + 1], cam).mask
        alone_far = rasterize(verts, faces[1 - near_id : 2 - near_id], cam).mask
        overlap = alone_near & alone_far
        assert overlap.sum() > 50
        assert_array_equal(frags.face_id[alone_near], near_id)
        assert_array_equal(frags.face_id[alone_far & ~alone_near], 1 - near_id)
        assert_allclose(frags.depth[alone_near], 1.0, rtol=1e-6)
        assert_allclose(frags.depth[alone_far & ~alone_near], 2.0, rtol=1e-6)


def test_equal_depth_tie_goes_to_lowest_face_id() -> None:
    h, w = 16, 16
    cam = pinhole(h, w, 20.0)
    tri = unproject(np.array([[1.0, 1.0], [14.0, 2.0], [4.0, 14.0]]), np.array([1.0, 1.2, 1.4]), cam)
    verts = np.vstack([tri, tri])
    frags = rasterize(verts, np.array([[3, 4, 5], [0, 1, 2], [5, 3, 4]]), cam)
    assert frags.mask.sum() > 30
    assert set(np.unique(frags.face_id[frags.mask])) == {0}


def test_near_plane_skips_faces() -> None:
    cam = pinhole(16, 16, 20.0)
    tri = np.array([[-0.3, -0.3, 1.0], [0.3, -0.2, 1.0], [0.0, 0.3, 1.0]], dtype=np.float32)
    faces = np.array([[0, 1, 2]])
    assert rasterize(tri, faces, cam).mask.sum() > 20
    for z in (0.0, -1.0, 0.05):
        behind = tri.copy()
        behind[2, 2] = z
        assert not rasterize(behind, faces, cam, near=0.1).mask.any()
    nan_tri = tri.copy()
    nan_tri[1, 0] = np.nan
    assert not rasterize(nan_tri, faces, cam).mask.any()
    # a vertex projecting beyond the guard band skips its face (no clipping)
    far_out = tri.copy()
    far_out[1, 0] = 1.01 * GUARD_BAND_PX / 20.0
    assert not rasterize(far_out, faces, cam).mask.any()
    far_out[1, 0] = 0.99 * GUARD_BAND_PX / 20.0 - 10
    assert rasterize(far_out, faces, cam).mask.any()


def test_flame_winding_is_front_facing_through_the_opencv_camera() -> None:
    """A counter-clockwise face (seen from +z, y up) faces a frontal camera; culling keeps it."""
    cam = Camera.frontal(distance=1.0, width=32, height=32)
    tri_flame = np.array([[-0.1, -0.1, 0.0], [0.1, -0.1, 0.0], [0.0, 0.1, 0.0]], dtype=np.float32)
    n = np.cross(tri_flame[1] - tri_flame[0], tri_flame[2] - tri_flame[0])
    assert n[2] > 0  # counter-clockwise seen from +z, where the camera is
    verts_cam = cam.to_camera(tri_flame)
    ccw = np.array([[0, 1, 2]])
    culled = rasterize(verts_cam, ccw, cam, cull_backfaces=True)
    assert culled.mask.sum() > 50
    assert_array_equal(culled.face_id, rasterize(verts_cam, ccw, cam).face_id)
    assert not rasterize(verts_cam, ccw[:, ::-1].copy(), cam, cull_backfaces=True).mask.any()
    assert_allclose(FLAME_TO_OPENCV, np.diag([1.0, -1.0, -1.0]))


def test_culling_on_a_closed_sphere() -> None:
    h, w = 64, 64
    cam = pinhole(h, w, 60.0)
    sphere = trimesh.creation.icosphere(subdivisions=2)  # outward normals, counter-clockwise outside
    faces = np.asarray(sphere.faces)
    outside = (np.asarray(sphere.vertices) * 0.8 + [0.05, -0.1, 3.0]).astype(np.float32)
    all_faces = rasterize(outside, faces, cam)
    culled = rasterize(outside, faces, cam, cull_backfaces=True)
    assert all_faces.mask.sum() > 200
    assert_array_equal(culled.face_id, all_faces.face_id)  # a convex closed mesh shows front faces only
    # every visible face's normal points towards the camera: n . (centroid - 0) < 0
    visible = np.unique(all_faces.face_id[all_faces.mask])
    tri = outside[faces[visible]].astype(np.float64)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    assert (np.einsum("fd,fd->f", normals, tri.mean(1)) < 0).all()
    # from inside the sphere every face is seen from its back
    inside = (np.asarray(sphere.vertices) * 2.0).astype(np.float32)
    assert rasterize(inside, faces, cam).mask.all()
    assert not rasterize(inside, faces, cam, cull_backfaces=True).mask.any()


# --------------------------------------------------------------- independent ray casting


@pytest.mark.parametrize(
    "rotvec, distance, size",
    [((0.0, 0.0, 0.0), 3.0, 64), ((0.4, -0.7, 0.2), 2.6, 80), ((-1.2, 0.3, 2.0), 2.2, 96)],
)
def test_perturbed_icosphere_matches_ray_casting(rotvec: tuple, distance: float, size: int) -> None:
    rng = np.random.default_rng(3)
    sphere = trimesh.creation.icosphere(subdivisions=3)
    v = np.asarray(sphere.vertices) * (1.0 + 0.25 * rng.random((len(sphere.vertices), 1)))  # non-convex
    verts_cam = (v @ rotation(np.array(rotvec)).T + [0.1, -0.05, distance]).astype(np.float32)
    cam = pinhole(size, size, focal=0.55 * size)
    assert_matches_ray_cast(verts_cam, np.asarray(sphere.faces), cam, size, size)


def test_uv_sphere_matches_ray_casting() -> None:
    sphere = trimesh.creation.uv_sphere(radius=1.0, count=[24, 24])
    verts_cam = (np.asarray(sphere.vertices) @ rotation(np.array([0.9, 0.1, 0.0])).T + [0, 0, 3.0]).astype(np.float32)
    cam = pinhole(64, 80, focal=50.0)
    assert_matches_ray_cast(verts_cam, np.asarray(sphere.faces), cam, 64, 80)


@pytest.mark.parametrize("yaw_deg", [0.0, 35.0, -70.0])
def test_synthetic_head_matches_ray_casting(yaw_deg: float) -> None:
    from p3dmm.fitting import FlameModel

    try:
        model = FlameModel.synthetic(seed=0)
    except (NotImplementedError, ImportError) as e:
        pytest.skip(f"FlameModel.synthetic() unavailable: {type(e).__name__}: {e}")
    yaw = rotation(np.array([0.0, np.deg2rad(yaw_deg), 0.0]))
    verts = np.asarray(model.v_template, np.float64) @ yaw.T
    cam = Camera.frontal(distance=1.0, width=96, height=96)
    verts_cam = np.asarray(cam.to_camera(verts.astype(np.float32)), np.float32)
    assert_matches_ray_cast(verts_cam, np.asarray(model.faces), cam, 96, 96)


# ---------------------------------------------------------------------- validation / misc


def test_empty_mesh() -> None:
    cam = pinhole(8, 8, 10.0)
    frags = rasterize(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64), cam)
    assert_array_equal(frags.face_id, -1)
    assert_array_equal(frags.depth, 0.0)


def test_deterministic() -> None:
    rng = np.random.default_rng(0)
    cam = pinhole(48, 48, 40.0)
    verts = (rng.normal(size=(60, 3)) * [0.5, 0.5, 0.3] + [0, 0, 2.0]).astype(np.float32)
    faces = rng.integers(0, 60, size=(150, 3))
    a = rasterize(verts, faces, cam)
    b = rasterize(verts, faces, cam)
    assert a.mask.sum() > 100
    assert_array_equal(a.face_id, b.face_id)
    assert_array_equal(a.bary, b.bary)
    assert_array_equal(a.depth, b.depth)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"verts_cam": np.zeros((4, 2), np.float32)}, r"rasterize: verts_cam has shape \(4, 2\), expected \(V, 3\)"),
        ({"verts_cam": np.zeros((4, 3), np.int32)}, r"rasterize: verts_cam has dtype int32, expected float32"),
        ({"verts_cam": [[0.0, 0.0, 1.0]]}, r"rasterize: verts_cam must be a NumPy or CuPy array"),
        ({"faces": np.zeros((2, 4), np.int64)}, r"rasterize: faces has shape \(2, 4\), expected \(F, 3\)"),
        ({"faces": np.zeros((2, 3), np.float32)}, r"rasterize: faces has dtype float32, expected an integer"),
        ({"faces": np.array([[0, 1, 4]])}, r"rasterize: faces index range \[0, 4\], expected within \[0, 3\]"),
        ({"faces": np.array([[0, 1, -1]])}, r"rasterize: faces index range"),
        ({"height": 0, "width": 8}, r"rasterize: height, width = 0, 8, expected positive integers"),
        ({"height": 8, "width": 8.0}, r"rasterize: height, width"),
        ({"height": 8, "width": 16}, r"rasterize: height, width = 8, 16 differ from the camera's 8x8"),
        ({"camera": "cam"}, r"rasterize: camera is a str, expected p3dmm.fitting.Camera"),
        ({"near": 0.0}, r"rasterize: near is 0.0, expected a finite positive"),
    ],
)
def test_validation_errors(kwargs: dict, match: str) -> None:
    args = {
        "verts_cam": np.array([[0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.float32),
        "faces": np.array([[0, 1, 2]]),
        "camera": pinhole(8, 8, 10.0),
    }
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        rasterize(**args)


def test_image_size_comes_from_the_camera() -> None:
    """The camera carries the size; the old (height, width) arguments still work, with a warning."""
    verts = np.array([[-1, -1, 2], [1, -1, 2], [0, 1, 2]], np.float32)
    faces = np.array([[0, 1, 2]])
    cam = pinhole(12, 20, 10.0)
    frags = rasterize(verts, faces, cam)
    assert frags.face_id.shape == (12, 20)
    with pytest.warns(DeprecationWarning, match="the camera carries the image size"):
        old = rasterize(verts, faces, cam, 12, 20)
    assert_array_equal(old.face_id, frags.face_id)
    bigger = rasterize(verts, faces, cam.scaled(40, 24))
    assert bigger.face_id.shape == (24, 40) and bigger.mask.sum() > 3 * frags.mask.sum()


def test_bad_focal_is_rejected() -> None:
    cam = pinhole(8, 8, 10.0)
    cam.focal = np.float32(-5.0)
    with pytest.raises(InputError, match=r"rasterize: camera.focal is -5.0"):
        rasterize(np.ones((3, 3), np.float32), np.array([[0, 1, 2]]), cam)


# ------------------------------------------------------------------------ CUDA helper text
RENDER = "p3dmm.fitting.render"  # the package that ships rasterize.cu


def test_kernel_source_preamble() -> None:
    src = _cuda.kernel_source(RENDER, "rasterize", {"SUBPIXEL_BITS": 8, "GUARD_BAND_PX": 2.0**21, "FLAG": True, "NEG": -0.5})
    head = src.split("\n")
    assert head[:5] == [
        "#define FLAG 1",
        "#define GUARD_BAND_PX 2097152.0",
        "#define NEG (-0.5)",
        "#define SUBPIXEL_BITS 8",
        '#line 1 "rasterize.cu"',
    ]
    assert src.endswith(_cuda.read_kernel_file(RENDER, "rasterize"))
    assert _cuda.kernel_source(RENDER, "rasterize") == '#line 1 "rasterize.cu"\n' + _cuda.read_kernel_file(RENDER, "rasterize")
    assert _cuda.define_preamble({"EPS": 1e-6, "N": np.int32(3)}) == "#define EPS 1e-06\n#define N 3\n"


@pytest.mark.parametrize(
    "name, defines, match",
    [
        ("rasterize", {"1BAD": 1}, "define name must be a C identifier"),
        ("rasterize", {"X": float("inf")}, "expected a finite number"),
        ("rasterize", {"X": "3"}, "expected int, float or bool"),
        ("../raster", None, "kernel name must be a file stem"),
        ("no_such_kernel", None, "no CUDA source no_such_kernel.cu"),
    ],
)
def test_kernel_source_rejects_bad_input(name: str, defines: dict | None, match: str) -> None:
    with pytest.raises(InputError, match=match):
        _cuda.kernel_source(RENDER, name, defines)


def test_load_module_without_gpu_says_why() -> None:
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a CUDA device is present")
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - CUDARuntimeError without a driver: the case under test
        pass
    with pytest.raises(BackendUnavailableError):
        _cuda.load_module(RENDER, "rasterize")


# -------------------------------------------------- CUDA source, run on the host (no GPU)
# render/rasterize.cu compiled as host C++ and launched through rasterize()'s own CuPy
# code: tests/fitting/test_device_emulation.py::test_rasterize_launch_code_on_emulated_device


# ----------------------------------------------------------------------------- GPU parity


@pytest.mark.gpu
@pytest.mark.parametrize("cull", [False, True])
def test_gpu_matches_cpu(cull: bool) -> None:
    import cupy as cp

    rng = np.random.default_rng(11)
    sphere = trimesh.creation.icosphere(subdivisions=4)
    v = np.asarray(sphere.vertices) * (1.0 + 0.2 * rng.random((len(sphere.vertices), 1)))
    scenes = [
        ((v @ rotation(np.array([0.3, -0.5, 0.1])).T + [0.1, 0.0, 3.0]).astype(np.float32), np.asarray(sphere.faces)),
        # random overlapping soup with depth ties and shared vertices
        ((rng.normal(size=(300, 3)) * [0.6, 0.6, 0.2] + [0, 0, 2.0]).astype(np.float32), rng.integers(0, 300, (2000, 3))),
    ]
    for verts, faces in scenes:
        for h, w in ((64, 64), (97, 131)):
            cam = pinhole(h, w, 0.6 * w)
            cpu = rasterize(verts, faces, cam, cull_backfaces=cull)
            gpu = rasterize(cp.asarray(verts), cp.asarray(faces), cam, cull_backfaces=cull)
            assert isinstance(gpu.face_id, cp.ndarray)
            assert cpu.mask.sum() > 0.1 * h * w
            assert_array_equal(cp.asnumpy(gpu.face_id), cpu.face_id)
            assert_allclose(cp.asnumpy(gpu.depth), cpu.depth, rtol=1e-6, atol=1e-6)
            assert_allclose(cp.asnumpy(gpu.bary), cpu.bary, rtol=0, atol=1e-6)
