"""The visible surface of one render, per covered pixel: the stage between rasterization
and shading (the renderer's counterpart of pytorch3d's ``Fragments`` hand-over).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.camera import Camera

__all__ = ["Surface"]


@dataclass
class Surface:
    """What the shading stages read of a rasterized head (host float64 arrays).

    Attributes:
        camera: the render camera; it carries the image size.
        verts_cam: ``(V, 3)`` vertices in the camera frame, metres.
        vertex_normals: ``(V, 3)`` unit vertex normals in the camera frame.
        pixels: ``(P,) int64`` flat indices of the covered pixels.
        face_ids: ``(P,) int64`` face under each covered pixel.
        corners: ``(P, 3) int64`` that face's vertices.
        bary: ``(P, 3)`` perspective-correct barycentrics.
        normals: ``(P, 3)`` interpolated unit normals, camera frame.
        uv: ``(P, 2)`` interpolated texture coordinates (v up).
    """

    camera: Camera
    verts_cam: np.ndarray
    vertex_normals: np.ndarray
    pixels: np.ndarray
    face_ids: np.ndarray
    corners: np.ndarray
    bary: np.ndarray
    normals: np.ndarray
    uv: np.ndarray

    def interp(self, attr: np.ndarray) -> np.ndarray:
        """``out[p] = sum_k bary[p, k] * attr[corners[p, k]]`` for a per-vertex ``attr (V, C)``."""
        return np.einsum("pk,pkc->pc", self.bary, attr[self.corners])

    def interp_scalar(self, attr: np.ndarray) -> np.ndarray:
        """:meth:`interp` of a per-vertex scalar ``(V,)`` -> ``(P,)``."""
        return self.interp(attr[:, None])[:, 0]
