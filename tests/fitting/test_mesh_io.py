from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting import FlameUV, InputError
from p3dmm.fitting.base.mesh_io import read_obj_with_uv, save_mesh

trimesh = pytest.importorskip("trimesh")


def _mesh():
    m = trimesh.creation.icosphere(subdivisions=1)
    v = np.asarray(m.vertices, np.float32)
    f = np.asarray(m.faces, np.int64)
    # per-corner UVs with a seam: each face gets its own three vt entries
    vt = np.random.default_rng(0).random((3 * len(f), 2)).astype(np.float32)
    ft = np.arange(3 * len(f)).reshape(-1, 3)
    return v, f, FlameUV.from_faces(vt, ft, f, len(v))


def test_obj_with_uv_keeps_vertex_order(tmp_path):
    v, f, uv = _mesh()
    p = save_mesh(tmp_path / "m.obj", v, f, uv=uv)
    v2, vt2, f2, ft2 = read_obj_with_uv(p)
    np.testing.assert_allclose(v2, v, atol=1e-6)
    np.testing.assert_array_equal(f2, f)
    np.testing.assert_allclose(vt2[ft2], uv.vt[uv.ft], atol=1e-6)


@pytest.mark.parametrize("ext", [".ply", ".obj", ".glb"])
def test_trimesh_formats_round_trip(tmp_path, ext):
    v, f, _ = _mesh()
    colors = np.full((len(v), 4), 200, np.uint8)
    p = save_mesh(tmp_path / f"m{ext}", v, f, vertex_colors=colors if ext != ".obj" else None)
    m = trimesh.load(p, process=False, force="mesh")
    np.testing.assert_allclose(np.asarray(m.vertices), v, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(m.faces), f)
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_inputs(tmp_path):
    v, f, _ = _mesh()
    with pytest.raises(InputError, match="unsupported suffix"):
        save_mesh(tmp_path / "m.xyz", v, f)
    with pytest.raises(InputError, match="faces"):
        save_mesh(tmp_path / "m.ply", v, f + 1000)
    with pytest.raises(InputError, match=r"vertices has shape"):
        save_mesh(tmp_path / "m.ply", v[:, :2], f)
