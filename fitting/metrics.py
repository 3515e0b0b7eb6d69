"""Geometry metrics: Procrustes alignment and per-vertex errors (host NumPy).

Vertex errors follow the Pixel3DMM benchmark's habit of aligning before measuring: a
similarity (or rigid) Procrustes alignment of the prediction onto the ground truth over
the evaluated vertices, then Euclidean distances in millimetres.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .base.errors import InputError
from .base.xp import to_numpy

__all__ = ["procrustes_align", "vertex_errors"]


def procrustes_align(src: Any, dst: Any, scale: bool = True) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Least-squares ``s R src + t ~ dst`` (Umeyama).

    Args:
        src: ``(N, 3)`` points to move.
        dst: ``(N, 3)`` target points.
        scale: estimate a scale (similarity) or keep s = 1 (rigid).

    Returns:
        (aligned src ``(N, 3)``, s, R ``(3, 3)``, t ``(3,)``).
    """
    a = to_numpy(src).astype(np.float64)
    b = to_numpy(dst).astype(np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != 3 or len(a) < 3:
        raise InputError(f"procrustes_align: src {a.shape} and dst {b.shape} must both be (N >= 3, 3)")
    ma, mb = a.mean(0), b.mean(0)
    ac, bc = a - ma, b - mb
    U, sig, Vt = np.linalg.svd(bc.T @ ac)
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))])
    R = U @ D @ Vt
    s = float((sig * np.diag(D)).sum() / (ac * ac).sum()) if scale else 1.0
    t = mb - s * R @ ma
    return s * a @ R.T + t, s, R, t


def vertex_errors(pred: Any, gt: Any, vertex_ids: Any = None, align: str = "similarity") -> dict[str, float]:
    """Per-vertex Euclidean error in millimetres after alignment.

    Args:
        pred: ``(V, 3)`` predicted vertices (metres).
        gt: ``(V, 3)`` ground-truth vertices (metres), same topology.
        vertex_ids: optional subset (e.g. the face region) used for alignment and error.
        align: ``"similarity"``, ``"rigid"`` or ``"none"``.

    Returns:
        dict with mean_mm, median_mm, p90_mm, max_mm.
    """
    p = to_numpy(pred).astype(np.float64)
    g = to_numpy(gt).astype(np.float64)
    if p.shape != g.shape:
        raise InputError(f"vertex_errors: pred has shape {p.shape}, gt has {g.shape}; expected equal (V, 3)")
    if vertex_ids is not None:
        p, g = p[np.asarray(vertex_ids)], g[np.asarray(vertex_ids)]
    if align == "similarity":
        p = procrustes_align(p, g, scale=True)[0]
    elif align == "rigid":
        p = procrustes_align(p, g, scale=False)[0]
    elif align != "none":
        raise InputError(f"vertex_errors: align must be 'similarity', 'rigid' or 'none', got {align!r}")
    d = np.linalg.norm(p - g, axis=1) * 1e3
    return {
        "mean_mm": float(d.mean()),
        "median_mm": float(np.median(d)),
        "p90_mm": float(np.percentile(d, 90)),
        "max_mm": float(d.max()),
    }
