"""Mesh geometry on NumPy/CuPy with analytic VJPs: face and vertex normals, scatter-add.

Scatter-adds use ``numpy.bincount(index, weights)`` on the CPU (far faster than
``add.at``) and ``cupyx.scatter_add`` (atomics) on the GPU, where ``cupy.bincount``
would synchronise twice (it reads ``x.min()`` and ``x.max()`` to size its output).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .xp import get_array_module

__all__ = [
    "face_normals_unnormalized",
    "scatter_add_rows",
    "vertex_normal_sums",
    "vertex_normals",
    "vertex_normals_vjp",
    "normalize_vjp",
]

_EPS = 1e-12


def scatter_add_rows(index: Any, values: Any, n_rows: int) -> Any:
    """``out[index[k]] += values[k]`` for ``values (K, C)``; returns ``(n_rows, C)``."""
    xp = get_array_module(values)
    C = values.shape[1]
    if xp is not np:
        import cupyx

        out = xp.zeros((n_rows, C), dtype=values.dtype)
        cupyx.scatter_add(out, index, values)
        return out
    # one bincount over (row, column) cells: cell = index * C + c
    cells = (index[:, None] * C + xp.arange(C)).reshape(-1)
    out = xp.bincount(cells, weights=values.reshape(-1), minlength=n_rows * C)
    return out.reshape(n_rows, C).astype(values.dtype)


def face_normals_unnormalized(verts: Any, faces: Any) -> Any:
    """``(F, 3)`` cross products ``(v1 - v0) x (v2 - v0)`` (length = twice the area)."""
    xp = get_array_module(verts)
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return xp.cross(v1 - v0, v2 - v0)


def vertex_normal_sums(verts: Any, faces: Any) -> Any:
    """``(V, 3)`` unnormalised vertex normals: sums of the adjacent faces' cross products."""
    xp = get_array_module(verts)
    fn = face_normals_unnormalized(verts, faces)
    idx = faces.T.reshape(-1)  # corner-major: all corner-0 vertices, then corner-1, ...
    return scatter_add_rows(idx, xp.concatenate([fn, fn, fn]), verts.shape[0])


def vertex_normals(verts: Any, faces: Any) -> Any:
    """Area-weighted unit vertex normals.

    Args:
        verts: ``(V, 3)`` float.
        faces: ``(F, 3)`` int, counter-clockwise seen from outside.

    Returns:
        ``(V, 3)`` unit normals (zero for vertices in no face).
    """
    xp = get_array_module(verts)
    m = vertex_normal_sums(verts, faces)
    norm = xp.sqrt((m * m).sum(-1, keepdims=True))
    return m / xp.maximum(norm, _EPS)


def normalize_vjp(m: Any, grad_n: Any) -> Any:
    """VJP of ``n = m / |m|`` row-wise: ``(g - n (n . g)) / |m|``."""
    xp = get_array_module(m)
    norm = xp.maximum(xp.sqrt((m * m).sum(-1, keepdims=True)), _EPS)
    n = m / norm
    return (grad_n - n * (n * grad_n).sum(-1, keepdims=True)) / norm


def vertex_normals_vjp(verts: Any, faces: Any, grad_normals: Any, sums: Any = None) -> Any:
    """VJP of :func:`vertex_normals`.

    Args:
        verts: ``(V, 3)``.
        faces: ``(F, 3)``.
        grad_normals: ``(V, 3)`` dL/d(vertex normals).
        sums: optional :func:`vertex_normal_sums` of ``verts`` from the forward pass.

    Returns:
        ``(V, 3)`` dL/dverts.
    """
    xp = get_array_module(verts)
    V = verts.shape[0]
    idx = faces.T.reshape(-1)
    m = sums if sums is not None else vertex_normal_sums(verts, faces)
    g_m = normalize_vjp(m, grad_normals)
    # each face normal feeds the sums of its three vertices
    g_fn = g_m[faces[:, 0]] + g_m[faces[:, 1]] + g_m[faces[:, 2]]
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    a, b = v1 - v0, v2 - v0
    # n = a x b:  dL/da = b x g,  dL/db = g x a
    g_a = xp.cross(b, g_fn)
    g_b = xp.cross(g_fn, a)
    contrib = xp.concatenate([-(g_a + g_b), g_a, g_b])  # corners 0, 1, 2
    return scatter_add_rows(idx, contrib, V)
