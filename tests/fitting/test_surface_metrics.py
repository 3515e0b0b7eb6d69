"""Point-to-surface metrics against analytic cases and an independent brute force, and the protocols."""

from __future__ import annotations

import numpy as np
import pytest

trimesh = pytest.importorskip("trimesh")
pytest.importorskip("rtree")

from p3dmm.fitting.base.errors import InputError  # noqa: E402
from p3dmm.fitting.metrics import (  # noqa: E402
    evaluate,
    facescape_errors,
    icp_align,
    now_errors,
    point_to_surface,
    surface_errors,
)


def _sphere(radius: float, subdivisions: int = 5):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices), np.asarray(m.faces)


def _point_triangle(p, a, b, c):
    """Ericson's closest point on a triangle (Real-Time Collision Detection, 5.1.5)."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return a
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return b
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return a + d1 / (d1 - d3) * ab
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return c
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return a + d2 / (d2 - d6) * ac
    va = d3 * d6 - d5 * d4
    if va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
        return b + (d4 - d3) / ((d4 - d3) + (d5 - d6)) * (c - b)
    denom = 1.0 / (va + vb + vc)
    return a + ab * vb * denom + ac * vc * denom


def test_point_to_surface_equals_brute_force():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(30, 3))
    f = np.array([rng.choice(30, 3, replace=False) for _ in range(40)])
    pts = rng.normal(size=(50, 3)) * 1.5
    d, closest = point_to_surface(pts, v, f)
    for p, dd, cc in zip(pts, d, closest):
        best = min((np.linalg.norm(p - _point_triangle(p, *v[tri])), tuple(tri)) for tri in f)
        assert dd == pytest.approx(best[0], abs=1e-9)
        assert np.linalg.norm(p - cc) == pytest.approx(dd, abs=1e-9)


def test_concentric_spheres():
    """Radius 0.1 m vs 0.103 m: every point is 3 mm from the other surface (up to the
    facets' chord error, which is under 0.02 mm at this subdivision)."""
    a, fa = _sphere(0.100)
    b, fb = _sphere(0.103)
    e = surface_errors(a, fa, b, fb)
    assert e["chamfer_mm"] == pytest.approx(3.0, abs=0.03)
    assert e["recall"] == 0.0 and e["precision"] == 0.0  # 3 mm > 2.5 mm
    e = surface_errors(a, fa, b * (0.1 + 0.002) / 0.103, fb)  # 2 mm apart: all within 2.5
    assert e["chamfer_mm"] == pytest.approx(2.0, abs=0.03) and e["recall"] == 1.0 and e["fscore"] == 1.0


def test_offset_sphere_and_point_cloud_ground_truth():
    a, fa = _sphere(0.1)
    shifted = a + [0.001, 0, 0]  # 1 mm shift: distance |(x + 1 mm) to sphere| varies in [0, 1] mm
    e = surface_errors(shifted, fa, a, fa)
    # mean over the sphere of |cos(theta)| * 1 mm = 0.5 mm, both directions
    assert e["chamfer_mm"] == pytest.approx(0.5, abs=0.02)
    cloud = surface_errors(shifted, fa, a, None)  # gt as points: pred->gt goes to the nearest point
    assert cloud["gt_to_pred_mm"] == pytest.approx(e["gt_to_pred_mm"], abs=1e-9)
    assert cloud["pred_to_gt_mm"] >= e["pred_to_gt_mm"]


def test_plane_vs_tilted_plane():
    """Points on z = 0 against the plane z = a x: distance |a x| / sqrt(1 + a^2)."""
    a = 0.05
    big = 1.0
    plane_v = np.array([[-big, -big, -a * big], [big, -big, a * big], [big, big, a * big], [-big, big, -a * big]])
    plane_f = np.array([[0, 1, 2], [0, 2, 3]])
    xs, ys = np.meshgrid(np.linspace(-0.1, 0.1, 21), np.linspace(-0.1, 0.1, 21))
    pts = np.stack([xs.ravel(), ys.ravel(), np.zeros(xs.size)], 1)
    d, _ = point_to_surface(pts, plane_v, plane_f)
    # trimesh's query is exact to ~1e-9 inside triangles (the brute-force test); for points
    # above the shared diagonal edge of this 2 m plane it is off by up to 1.6 um (0.06 %)
    np.testing.assert_allclose(d, np.abs(a * pts[:, 0]) / np.sqrt(1 + a * a), rtol=1e-3, atol=1e-12)


def test_icp_recovers_a_rigid_motion():
    a, fa = _sphere(0.1, 3)
    a = a * [1.0, 0.8, 0.6]  # an ellipsoid: the rotation is observable
    ang = np.radians(8.0)
    R = np.array([[np.cos(ang), -np.sin(ang), 0], [np.sin(ang), np.cos(ang), 0], [0, 0, 1]])
    target = a @ R.T + [0.004, -0.002, 0.003]
    moved, s, R_est, t = icp_align(a, fa, target, scale=False)
    assert np.abs(moved - target).max() < 1e-4 and s == 1.0
    np.testing.assert_allclose(R_est, R, atol=1e-3)


def test_pixel3dmm_protocol_aligns_a_similarity():
    from p3dmm.fitting import FlameModel

    m = FlameModel.synthetic(seed=0)
    gt = m.vertices(m.zero_params()).astype(np.float64)
    f = np.asarray(m.faces)
    ang = np.radians(20.0)
    R = np.array([[1, 0, 0], [0, np.cos(ang), -np.sin(ang)], [0, np.sin(ang), np.cos(ang)]])
    pred = 1.1 * gt @ R.T + [0.05, 0.0, 0.3]
    e = evaluate(pred, f, gt, f, region=m.masks["face"])
    assert e["chamfer_mm"] < 1e-3 and e["recall"] == 1.0
    noisy = pred + np.random.default_rng(0).normal(0, 0.001, pred.shape)
    e = evaluate(noisy, f, gt, f, region=m.masks["face"])
    assert 0.3 < e["chamfer_mm"] < 1.5 and e["recall"] > 0.9
    scan = evaluate(pred, f, gt, None)  # gt as a point cloud of another "topology"
    assert scan["chamfer_mm"] < 0.5


def test_now_protocol_crops_aligns_and_reports():
    from p3dmm.fitting import FlameModel

    m = FlameModel.synthetic(seed=0)
    gt = m.vertices(m.zero_params()).astype(np.float64)
    f = np.asarray(m.faces)
    rng = np.random.default_rng(1)
    lmk_ids = rng.choice(m.masks["face"], 7, replace=False)
    nose = int(np.argmax(gt[m.masks["face"], 2]))  # the most frontal face vertex as "nose tip"
    lmk_ids[4] = m.masks["face"][nose]
    scan = gt[m.masks["face"]] + rng.normal(0, 0.0005, (len(m.masks["face"]), 3))
    pred = 0.9 * gt + [0.1, 0.2, -0.3]
    e = now_errors(pred, f, pred[lmk_ids], scan, gt[lmk_ids])
    assert e["median_mm"] < 0.6 and e["n_points"] > 100
    with pytest.raises(InputError, match=r"\(7, 3\)"):
        now_errors(pred, f, pred[:5], scan, gt[lmk_ids])


def test_facescape_estimates_only_the_depth_shift():
    a, fa = _sphere(0.1, 4)
    a = a + [0, 0, 1.0]
    e = facescape_errors(a + [0, 0, 0.02], fa, a, fa)
    assert e["depth_shift_mm"] == pytest.approx(-20.0, abs=0.05) and e["chamfer_mm"] < 0.05
    e = facescape_errors(a + [0.003, 0, 0], fa, a, fa)  # a lateral error is not aligned away
    assert e["chamfer_mm"] > 1.0


def test_bad_inputs():
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        point_to_surface(np.zeros((3, 2)), np.zeros((3, 3)), np.array([[0, 1, 2]]))
    with pytest.raises(InputError, match="face indices"):
        point_to_surface(np.zeros((3, 3)), np.zeros((3, 3)), np.array([[0, 1, 5]]))
    with pytest.raises(InputError, match="protocol"):
        evaluate(np.zeros((3, 3)), np.array([[0, 1, 2]]), np.zeros((3, 3)), protocol="nowish")


def test_eval_command(tmp_path, capsys):
    import json

    from p3dmm.runtime.cli import main

    a, fa = _sphere(0.1, 4)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    trimesh.Trimesh(a * 1.02, fa, process=False).export(pred / "s1.obj")
    trimesh.Trimesh(a, fa, process=False).export(gt / "s1.obj")
    trimesh.Trimesh(a, fa, process=False).export(pred / "s2.ply")
    trimesh.PointCloud(a).export(gt / "s2.ply")  # a scan: points only
    trimesh.Trimesh(a, fa, process=False).export(pred / "lonely.obj")
    (pred / "broken.obj").write_text("v 0 0 0\nf 1 2 3\n")
    (gt / "broken.obj").write_text("garbage")
    out = tmp_path / "e.json"
    rc = main(["eval", str(pred), str(gt), "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1 and "| s1 |" in text and "| s2 |" in text and "mean of 2" in text
    assert "skipped lonely: no ground truth" in text and "skipped broken" in text
    data = json.loads(out.read_text())
    s1 = next(r for r in data["pairs"] if r["pair"] == "s1")
    assert s1["chamfer_mm"] < 0.05  # the similarity alignment removes the 2 % scale
    assert main(["eval", str(pred / "s1.obj"), str(gt / "s1.obj"), "--protocol", "facescape"]) == 0
    assert "depth_shift_mm" in capsys.readouterr().out
    assert main(["eval", str(pred), str(gt / "s1.obj")]) == 2
    assert main(["eval", str(pred), str(gt), "--protocol", "now"]) == 2


def test_map_errors_on_known_perturbations():
    from p3dmm.fitting.metrics import map_errors

    H = W = 64
    rng = np.random.default_rng(0)
    n = rng.normal(size=(H, W, 3))
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    axis = np.cross(n, [0.0, 0.0, 1.0])
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    t = np.radians(10.0)  # every normal turned by 10 degrees about an axis perpendicular to it
    turned = n * np.cos(t) + np.cross(axis, n) * np.sin(t)
    uv = rng.uniform(0.2, 0.8, (H, W, 2))
    gt_mask = np.zeros((H, W), bool)
    gt_mask[:, :32] = True
    pred_mask = np.zeros((H, W), bool)
    pred_mask[:, 16:48] = True  # IoU = 16 / 48
    e = map_errors({"normals": turned, "uv": uv + [0.03, 0.04], "mask": pred_mask},
                   {"normals": n, "uv": uv, "mask": gt_mask})  # fmt: skip
    assert e["normal_mean_deg"] == pytest.approx(10.0, abs=1e-6) and e["normal_median_deg"] == pytest.approx(10.0, abs=1e-6)
    assert e["uv_mean_px"] == pytest.approx(0.05 * W) and e["uv_median_px"] == pytest.approx(0.05 * W)
    assert e["mask_iou"] == pytest.approx(1 / 3) and e["pixels"] == 32 * H
    # scored only where asked
    sel = np.zeros((H, W), bool)
    sel[0, 0] = True
    assert map_errors({"uv": uv}, {"uv": uv}, mask=sel)["uv_mean_px"] == 0.0
    with pytest.raises(InputError, match="uv is"):
        map_errors({"uv": uv[:32]}, {"uv": uv})
    with pytest.raises(InputError, match="at least one"):
        map_errors({"uv": uv}, {"uv": uv}, mask=np.zeros((H, W), bool))
