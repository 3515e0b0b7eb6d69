"""Per-model host data the renderer derives once: faces, UVs, region faces, mesh edges and
the vertex fields of the procedural appearance (lips, scalp, eyelid rims, redness, eyes, brows).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..base.errors import InputError
from ..base.xp import to_numpy
from ..model.arrays import FlameArrays

__all__ = ["RenderData", "face_region_masks", "neighbour_mean", "render_data", "smooth_vertex_field"]


@dataclass
class RenderData:
    """Host arrays derived once per model for rendering (see :func:`render_data`)."""

    faces: np.ndarray
    vt: np.ndarray
    ft: np.ndarray
    region_faces: dict[str, np.ndarray]
    edges: np.ndarray
    rest: np.ndarray
    lips_w: np.ndarray
    scalp_w: np.ndarray
    rim_w: np.ndarray
    redness_w: np.ndarray
    eyeball_faces: np.ndarray
    eyes: list[tuple[np.ndarray, np.ndarray]]  # (centre (3,), vertex mask (V,)) per eyeball
    brows_uv: list[np.ndarray]  # polylines (5, 2) in UV
    uv_per_metre: float


_MODEL_CACHE: "weakref.WeakKeyDictionary[Any, RenderData]" = weakref.WeakKeyDictionary()


def neighbour_mean(w: np.ndarray, edges: np.ndarray, n: int) -> np.ndarray:
    """Mean of a per-vertex scalar over each vertex's mesh neighbours (0 for isolated)."""
    s = np.bincount(edges[:, 0], weights=w[edges[:, 1]], minlength=n) + np.bincount(
        edges[:, 1], weights=w[edges[:, 0]], minlength=n
    )
    deg = np.bincount(edges.ravel(), minlength=n)
    return np.where(deg > 0, s / np.maximum(deg, 1), w)


def smooth_vertex_field(w: np.ndarray, edges: np.ndarray, iterations: int) -> np.ndarray:
    """``iterations`` steps of ``w <- (w + neighbour_mean(w)) / 2``."""
    for _ in range(iterations):
        w = 0.5 * w + 0.5 * neighbour_mean(w, edges, len(w))
    return w


def face_region_masks(faces: np.ndarray, masks: Mapping[str, Any], n_vertices: int) -> dict[str, np.ndarray]:
    """Per-face region membership: a face is in a region when its 3 vertices are.

    Args:
        faces: ``(F, 3)`` int vertex indices.
        masks: region name -> ``(K,)`` vertex ids.
        n_vertices: V.

    Returns:
        region name -> ``(F,) bool``.
    """
    out = {}
    for name, ids in masks.items():
        vm = np.zeros(n_vertices, dtype=bool)
        vm[np.asarray(to_numpy(ids), dtype=np.int64)] = True
        out[name] = vm[faces].all(axis=1)
    return out


def render_data(model: FlameArrays) -> RenderData:
    """The :class:`RenderData` of ``model``, memoised per model object.

    Raises:
        InputError: the model has no UV layout, or its ``uv.ft`` does not match its faces.
    """
    cached = _MODEL_CACHE.get(model)
    if cached is not None:
        return cached
    if model.uv is None:
        raise InputError(
            f"render_maps: model {model.name!r} has no UV layout (FlameModel.uv is None); load it with uv=..."
        )
    faces = np.asarray(to_numpy(model.faces), dtype=np.int64)
    V = model.n_vertices
    vt = np.asarray(model.uv.vt, dtype=np.float64)
    ft = np.asarray(model.uv.ft, dtype=np.int64)
    if ft.shape != faces.shape:
        raise InputError(f"render_maps: model.uv.ft has shape {ft.shape}, expected the faces' shape {faces.shape}")
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e.sort(axis=1)
    edges = np.unique(e, axis=0)
    rest = np.asarray(to_numpy(model.v_template), dtype=np.float64)
    masks = {k: np.asarray(to_numpy(v), dtype=np.int64) for k, v in model.masks.items()}

    def vmask(*names: str) -> np.ndarray:
        m = np.zeros(V, dtype=bool)
        for n in names:
            if n in masks:
                m[masks[n]] = True
        return m

    lips_w = smooth_vertex_field(vmask("lips").astype(np.float64), edges, 2)
    scalp_w = smooth_vertex_field(vmask("scalp").astype(np.float64), edges, 3)
    eyeball = vmask("left_eyeball", "right_eyeball")
    eyes = []
    for name in ("left_eyeball", "right_eyeball"):
        if name in masks and len(masks[name]):
            ids = masks[name]
            eyes.append((rest[ids].mean(0), vmask(name)))
    # eyelid rim: skin vertices within a few mm of an eyeball's surface, in front of it
    rim = np.zeros(V)
    for centre, m in eyes:
        r = np.linalg.norm(rest[m] - centre, axis=1).mean()
        d = np.linalg.norm(rest - centre, axis=1) - r
        front = rest[:, 2] > centre[2] - 0.25 * r
        rim = np.maximum(rim, np.where(~eyeball & front, np.exp(-((np.maximum(d, 0) / 0.0025) ** 2)), 0.0))
    # reddish patches: face vertices, strongest low on the cheeks and on the nose
    face_m = vmask("face")
    if face_m.any():
        c = rest[face_m].mean(0)
        red = face_m * np.exp(-(((rest[:, 1] - c[1] + 0.01) / 0.03) ** 2))
        red = np.maximum(red, vmask("nose") * 0.8)
    else:
        red = np.zeros(V)
    redness_w = smooth_vertex_field(red, edges, 3)

    # brows: the 2 x 5 brow points of the 51 static landmarks, in UV
    brows_uv: list[np.ndarray] = []
    uv_per_metre = 1.0
    lm = model.landmarks
    if lm is not None and len(lm.static_faces) >= 10:
        lf = np.asarray(lm.static_faces[:10], dtype=np.int64)
        lb = np.asarray(lm.static_bary[:10], dtype=np.float64)
        luv = (lb[:, :, None] * vt[ft[lf]]).sum(1)
        lxyz = (lb[:, :, None] * rest[faces[lf]]).sum(1)
        brows_uv = [luv[:5], luv[5:10]]
        duv = (
            np.linalg.norm(np.diff(luv[:5], axis=0), axis=1).sum()
            + np.linalg.norm(np.diff(luv[5:], axis=0), axis=1).sum()
        )
        dxyz = (
            np.linalg.norm(np.diff(lxyz[:5], axis=0), axis=1).sum()
            + np.linalg.norm(np.diff(lxyz[5:], axis=0), axis=1).sum()
        )
        if dxyz > 0 and duv > 0:
            uv_per_metre = float(duv / dxyz)
        else:
            brows_uv = []
    data = RenderData(
        faces=faces,
        vt=vt,
        ft=ft,
        region_faces=face_region_masks(faces, masks, V),
        edges=edges,
        rest=rest,
        lips_w=lips_w,
        scalp_w=scalp_w,
        rim_w=rim,
        redness_w=redness_w,
        eyeball_faces=np.asarray(eyeball[faces].all(axis=1)),
        eyes=eyes,
        brows_uv=brows_uv,
        uv_per_metre=uv_per_metre,
    )
    _MODEL_CACHE[model] = data
    return data
