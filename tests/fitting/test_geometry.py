"""Vertex normals and their VJP against torch.autograd and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting.base.geometry import (
    scatter_add_rows,
    vertex_normals,
    vertex_normals_vjp,
)

torch = pytest.importorskip("torch")
trimesh = pytest.importorskip("trimesh")


def _mesh():
    m = trimesh.creation.icosphere(subdivisions=2)
    rng = np.random.default_rng(0)
    v = m.vertices * (1 + 0.1 * rng.random((len(m.vertices), 1)))
    return v.astype(np.float64), np.asarray(m.faces, dtype=np.int64)


def test_vertex_normals_match_trimesh_area_weighted():
    v, f = _mesh()
    n = vertex_normals(v, f)
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-12)
    # trimesh weights by angle by default; compare with an explicit area-weighted sum
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    ref = np.zeros_like(v)
    for k in range(3):
        np.add.at(ref, f[:, k], fn)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(n, ref, atol=1e-12)
    # outward on a sphere-like mesh
    assert (np.sum(n * v, axis=1) > 0).all()


def test_vertex_normals_vjp_matches_autograd():
    v, f = _mesh()
    g = np.random.default_rng(1).normal(size=v.shape)
    tv = torch.tensor(v, requires_grad=True)
    tf = torch.as_tensor(f)
    fn = torch.linalg.cross(tv[tf[:, 1]] - tv[tf[:, 0]], tv[tf[:, 2]] - tv[tf[:, 0]])
    m = torch.zeros_like(tv).index_add(0, tf[:, 0], fn).index_add(0, tf[:, 1], fn).index_add(0, tf[:, 2], fn)
    n = m / m.norm(dim=1, keepdim=True)
    (n * torch.as_tensor(g)).sum().backward()
    got = vertex_normals_vjp(v, f, g)
    err = np.abs(got - tv.grad.numpy()).max() / np.abs(tv.grad.numpy()).max()
    assert err < 1e-10


def test_vertex_normals_vjp_finite_differences():
    v, f = _mesh()
    g = np.random.default_rng(2).normal(size=v.shape)
    grad = vertex_normals_vjp(v, f, g)
    rng = np.random.default_rng(3)
    for _ in range(5):
        d = rng.normal(size=v.shape)
        eps = 1e-6
        num = ((vertex_normals(v + eps * d, f) - vertex_normals(v - eps * d, f)) * g).sum() / (2 * eps)
        np.testing.assert_allclose((grad * d).sum(), num, rtol=1e-6)


def test_scatter_add_rows():
    idx = np.array([0, 2, 2, 1])
    vals = np.arange(8.0).reshape(4, 2)
    np.testing.assert_array_equal(scatter_add_rows(idx, vals, 4), [[0, 1], [6, 7], [6, 8], [0, 0]])
