"""Synthetic data: random draws, determinism across workers and resume, mesh rendering, CLI."""

from __future__ import annotations

import argparse
import logging
import shutil

import numpy as np
import pytest
import trimesh
from p3dmm.fitting import FlameModel
from p3dmm.fitting.base.mesh_io import save_mesh
from p3dmm.training.dataset_format import DatasetReader, read_manifest
from p3dmm.training.synth import (
    SynthConfig,
    load_flame_mesh,
    render_dataset,
    sample_camera,
    sample_flame_params,
    synthesize,
)
from p3dmm.training.synth_cli import add_parsers
from PIL import Image

SIZE = 48


@pytest.fixture(scope="module")
def head() -> FlameModel:
    return FlameModel.synthetic(seed=0)


def test_param_and_camera_draws(head):
    cfg = SynthConfig()
    yaws, fills = [], []
    for i in range(30):
        rng = np.random.default_rng([9, i])
        p = sample_flame_params(rng, head, cfg)
        assert p.shape.dtype == np.float32 and p.shape.shape == (300,)
        assert np.all(p.shape[cfg.n_identity :] == 0) and np.all(p.expr[cfg.n_expression :] == 0)
        assert np.abs(p.expr).max() <= cfg.expr_clip
        assert 0.0 <= p.pose[2, 0] <= 0.5  # jaw opening
        R = _rotation(p.pose[0])
        fwd = R @ np.array([0.0, 0.0, 1.0])
        yaws.append(np.degrees(np.arctan2(fwd[0], fwd[2])))
        v = head.vertices(p)
        cam = sample_camera(rng, 128, v, head.masks["face"], fill_range=cfg.fill_range)
        uv = cam.project(v[head.masks["face"]].astype(np.float64))
        side = (uv.max(0) - uv.min(0)).max() / 128
        fills.append(side)
        centre = 0.5 * (uv.max(0) + uv.min(0)) / 128
        assert np.all(np.abs(centre - 0.5) < 0.1)
    assert max(np.abs(yaws)) < 70 and max(yaws) > 20 and min(yaws) < -20
    assert min(fills) > cfg.fill_range[0] - 0.02 and max(fills) < cfg.fill_range[1] + 0.02


def _rotation(rvec):
    from scipy.spatial.transform import Rotation

    return Rotation.from_rotvec(np.asarray(rvec, dtype=np.float64)).as_matrix()


def _files(root, sid):
    return {name: (root / sid / name).read_bytes() for name in ("normals.png", "uv.png", "rgb.png", "regions.png")}


def test_synthesize_is_deterministic_across_workers_and_resume(tmp_path, head):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = synthesize(a, n=4, seed=11, size=SIZE, workers=1, model=head)
    assert (ra.written, ra.skipped, ra.failed) == (4, 0, [])
    shutil.copytree(a, b)
    shutil.rmtree(b / "000002")  # a lost sample
    (b / "000003" / "sample.json").unlink()  # a half-written sample
    (b / "000003" / "uv.png").write_bytes(b"partial")
    rb = synthesize(b, n=4, seed=11, size=SIZE, workers=2, model=head)
    assert (rb.written, rb.skipped, rb.failed) == (2, 2, [])
    for sid in ("000000", "000001", "000002", "000003"):
        assert _files(a, sid) == _files(b, sid), sid
    m = read_manifest(b)
    assert m["ids"] == ["000000", "000001", "000002", "000003"] and m["count"] == 4
    assert m["generator"]["seed"] == 11 and m["image_size"] == SIZE
    s = DatasetReader(b)[2]
    assert s["meta"]["seed"] == [11, 2] and s["params"] is not None
    assert s["coverage"].mean() > 0.2 and s["mask"].any()
    # a different seed gives different data
    c = tmp_path / "c"
    synthesize(c, n=1, seed=12, size=SIZE, workers=1, model=head)
    assert _files(c, "000000")["normals.png"] != _files(a, "000000")["normals.png"]


def test_synthesize_head_space_and_mismatched_resume(tmp_path, head):
    from p3dmm.fitting import InputError

    r = synthesize(tmp_path / "h", n=1, seed=0, size=32, workers=1, model=head, normal_space="head")
    assert r.written == 1 and read_manifest(tmp_path / "h")["normal_space"] == "head"
    with pytest.raises(InputError, match="differs in"):
        synthesize(tmp_path / "h", n=1, seed=1, size=32, workers=1, model=head, normal_space="head")


def _write_mesh(path, verts, faces):
    trimesh.Trimesh(verts, faces, process=False).export(path)


def test_render_dataset_skips_a_bad_mesh_and_goes_on(tmp_path, head, caplog):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    rng = np.random.default_rng(0)
    p = head.zero_params()
    p.shape[:10] = rng.normal(size=10)
    v = np.asarray(head.vertices(p), dtype=np.float64)
    f = np.asarray(head.faces)
    save_mesh(meshes / "a_good.obj", v, f, uv=head.uv)  # OBJ with vt/ft: seams must not reorder vertices
    _write_mesh(meshes / "b_bad.ply", v[:100], np.array([[0, 1, 2]]))
    _write_mesh(meshes / "c_good.ply", v * 1.05, f)
    (meshes / "d_garbage.obj").write_text("this is not a mesh\n")
    tex = np.zeros((16, 16, 3), np.uint8)
    tex[..., 2] = 220
    Image.fromarray(tex).save(meshes / "c_good.png")
    # the vertex order of the files survives loading
    np.testing.assert_allclose(load_flame_mesh(meshes / "a_good.obj", 5023)[0], v, atol=1e-6)
    verts_c, tex_c = load_flame_mesh(meshes / "c_good.ply", 5023)
    np.testing.assert_allclose(verts_c, v * 1.05, atol=1e-6)
    assert tex_c is not None and tex_c.shape == (16, 16, 3)

    with caplog.at_level(logging.WARNING, logger="p3dmm.synth"):
        r = render_dataset(meshes, tmp_path / "out", views=2, size=SIZE, seed=3, model=head)
    assert r.written == 4
    failed = dict(r.failed)
    assert set(failed) == {str(meshes / "b_bad.ply"), str(meshes / "d_garbage.obj")}
    assert "100 vertices, expected 5023" in failed[str(meshes / "b_bad.ply")]
    assert any("b_bad.ply" in rec.getMessage() and "expected 5023" in rec.getMessage() for rec in caplog.records)
    reader = DatasetReader(tmp_path / "out")
    assert len(reader) == 4
    s = reader["00002-c_good-v01"]
    assert s["params"] is None and s["meta"]["source"]["textured"] is True
    skin = s["rgb"][s["mask"]].astype(float)
    assert skin[:, 2].mean() > skin[:, 0].mean() + 10  # the blue texture shows
    # resume: nothing left to do
    r2 = render_dataset(meshes, tmp_path / "out", views=2, size=SIZE, seed=3, model=head)
    assert (r2.written, r2.skipped) == (0, 4)


def test_cli_parsers(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser(prog="p3dmm")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", "--out", str(tmp_path / "d"), "--n", "1", "--seed", "4", "--size", "32"])
    assert (args.n, args.seed, args.size, args.workers, args.normal_space) == (1, 4, 32, None, "camera")
    args.workers = 1
    assert args.func(args) == 0
    assert len(DatasetReader(tmp_path / "d")) == 1
    args = parser.parse_args(
        ["render-dataset", "m1.obj", "dir", "--out", "o", "--views", "3", "--normal-space", "head"]
    )
    assert (args.meshes, args.views, args.normal_space, args.seed) == (["m1.obj", "dir"], 3, "head", 0)
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", "--out", "x", "--n", "-1", "--seed", "0"])
    args = parser.parse_args(
        ["render-dataset", str(tmp_path / "none.obj"), "--out", str(tmp_path / "o"), "--size", "32"]
    )
    assert args.func(args) == 1  # the missing mesh is reported, the command says so


def test_cli_yaw_range(tmp_path):
    """--yaw-max sets the head-yaw range (the embedded predictors train with +-75 degrees)."""
    import json

    parser = argparse.ArgumentParser(prog="p3dmm")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synth", "--out", str(tmp_path / "d"), "--n", "3", "--seed", "2", "--size", "32",
                              "--workers", "1", "--yaw-max", "75"])  # fmt: skip
    assert args.func(args) == 0
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["generator"]["config"]["yaw_deg"] == [-75.0, 75.0]
    for bad in ("91", "-5", "steep"):
        with pytest.raises(SystemExit):
            parser.parse_args(["synth", "--out", "x", "--n", "1", "--seed", "0", "--yaw-max", bad])
