"""Image outputs: PNG encoding of maps and fitted-mesh overlays (atomic writes)."""

from __future__ import annotations

import io
from os import PathLike
from typing import Any

import numpy as np
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import InputError
from p3dmm.fitting.base.geometry import vertex_normals
from p3dmm.fitting.base.xp import to_numpy
from p3dmm.fitting.render.raster import rasterize

__all__ = ["save_png", "normals_to_rgb", "uv_to_rgb", "overlay_mesh"]


def save_png(path: str | PathLike[str], image: Any, compress_level: int = 1) -> str:
    """Atomically write an ``(H, W)`` or ``(H, W, 3|4)`` uint8 image as PNG.

    ``compress_level`` is zlib's (0-9). The default 1 instead of Pillow's 6: on the six
    images one ``Reconstruction.save`` writes, 82 ms against 276 ms for 19 % larger files
    (1.23 against 1.03 MB; this project's CPU machine), and the runtime writes per photo.
    """
    from PIL import Image

    a = to_numpy(image)
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise InputError(f"save_png: image has {a.dtype} {a.shape}, expected uint8 (H, W), (H, W, 3) or (H, W, 4)")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=int(compress_level))
    return atomic_write_bytes(path, buf.getvalue())


def normals_to_rgb(normals: Any, mask: Any = None) -> np.ndarray:
    """``(H, W, 3)`` unit normals -> uint8 RGB ``(n + 1) / 2 * 255`` (black outside ``mask``)."""
    n = to_numpy(normals).astype(np.float32)
    rgb = np.clip((n + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        rgb[~to_numpy(mask).astype(bool)] = 0
    return rgb


def uv_to_rgb(uv: Any, mask: Any = None) -> np.ndarray:
    """``(H, W, 2)`` UV in [0, 1] -> uint8 RGB with R = u, G = v, B = 0."""
    u = to_numpy(uv).astype(np.float32)
    rgb = np.zeros(u.shape[:2] + (3,), np.uint8)
    rgb[..., :2] = np.clip(u * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if mask is not None:
        rgb[~to_numpy(mask).astype(bool)] = 0
    return rgb


def overlay_mesh(image: Any, vertices: Any, faces: Any, camera: Any, alpha: float = 0.6) -> np.ndarray:
    """Shade a mesh seen through ``camera`` and blend it over ``image``.

    Args:
        image: ``(H, W, 3) uint8`` background.
        vertices: ``(V, 3)`` world-frame vertices.
        faces: ``(F, 3)`` faces.
        camera: :class:`p3dmm.fitting.Camera` of the image.
        alpha: opacity of the mesh.

    Returns:
        ``(H, W, 3) uint8``.
    """
    img = to_numpy(image)
    H, W = img.shape[:2]
    v = to_numpy(vertices).astype(np.float32)
    vc = camera.to_camera(v).astype(np.float32)
    frags = rasterize(vc, to_numpy(faces), camera.scaled(W, H))
    n = vertex_normals(vc.astype(np.float64), to_numpy(faces).astype(np.int64))
    f = to_numpy(faces)
    cov = frags.face_id >= 0
    nn = (frags.bary[..., :, None] * n[f[np.maximum(frags.face_id, 0)]]).sum(-2)
    nn /= np.maximum(np.linalg.norm(nn, axis=-1, keepdims=True), 1e-12)
    light = np.array([0.3, -0.4, -0.85])
    light /= np.linalg.norm(light)
    shade = np.clip(0.25 + 0.75 * np.clip((nn * light).sum(-1), 0, 1), 0, 1)
    mesh_rgb = (np.stack([shade * 0.75, shade * 0.85, shade], -1) * 255.0).astype(np.float32)
    out = img.astype(np.float32).copy()
    out[cov] = (1 - alpha) * out[cov] + alpha * mesh_rgb[cov]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
