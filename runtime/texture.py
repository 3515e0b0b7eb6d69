"""The photo's colours resampled into the FLAME UV layout, with per-texel visibility.

For every texel of a ``size x size`` texture the UV layout is rasterized (the texel's
UV triangle and barycentrics, with p3dmm's rasterizer treating UV space as an image),
the texel's surface point on the fitted mesh is projected into the photo, and it is
visible when the mesh's own depth buffer at that pixel is not in front of it (a depth
test with a 5 mm slack) and the surface faces the camera. Visible texels get the photo's
bilinearly interpolated colour and alpha 255; the rest are transparent black.
"""

from __future__ import annotations

import numpy as np
from p3dmm.fitting import Camera, FlameModel, rasterize
from p3dmm.fitting.base.geometry import vertex_normals

__all__ = ["photo_texture"]

_DEPTH_SLACK = 0.005


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    H, W = image.shape[:2]
    x = np.clip(x, 0.0, W - 1.0)
    y = np.clip(y, 0.0, H - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), W - 2 if W > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), H - 2 if H > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, W - 1), np.minimum(y0 + 1, H - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    img = image.astype(np.float32)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def photo_texture(model: FlameModel, vertices: np.ndarray, camera: Camera, image: np.ndarray, size: int = 1024) -> np.ndarray:
    """``(size, size, 4) uint8`` RGBA texture in ``model``'s UV layout (row 0 is v = 1).

    Args:
        model: the FLAME model (its ``uv`` layout and faces).
        vertices: ``(V, 3)`` fitted posed vertices (FLAME frame).
        camera: the fitted camera in ``image``'s pixel frame.
        image: ``(H, W, 3) uint8`` photo.
        size: texture side in texels.
    """
    assert model.uv is not None
    faces = np.asarray(model.faces, dtype=np.int64)
    vt = np.asarray(model.uv.vt, np.float64)
    ft = np.asarray(model.uv.ft, np.int64)
    # UV space as an image: texel (row, col) centre <-> (u, v) = ((col + 0.5) / size, 1 - (row + 0.5) / size)
    uv_cam = np.stack([vt[:, 0] * size - 0.5, (1.0 - vt[:, 1]) * size - 0.5, np.ones(len(vt))], axis=1).astype(np.float32)
    uv_camera = Camera(focal=np.float32(1.0), principal=np.zeros(2, np.float32), R=np.eye(3, dtype=np.float32),
                       t=np.zeros(3, np.float32), width=size, height=size)  # fmt: skip
    frags = rasterize(uv_cam, ft, uv_camera)
    covered = frags.face_id >= 0
    fid = frags.face_id[covered].astype(np.int64)
    bary = frags.bary[covered].astype(np.float64)
    v = np.asarray(vertices, np.float64)
    points = (bary[:, :, None] * v[faces[fid]]).sum(axis=1)  # (N, 3) world
    cam_pts = camera.to_camera(points.astype(np.float32)).astype(np.float64)
    z = cam_pts[:, 2]
    f = float(camera.focal)
    cx, cy = (float(c) for c in np.asarray(camera.principal))
    with np.errstate(divide="ignore", invalid="ignore"):
        px = f * cam_pts[:, 0] / z + cx
        py = f * cam_pts[:, 1] / z + cy
    H, W = image.shape[:2]
    inside = (z > 0) & (px >= -0.5) & (px <= W - 0.5) & (py >= -0.5) & (py <= H - 0.5)
    # the mesh's depth buffer in the photo
    vc = camera.to_camera(np.asarray(vertices, np.float32)).astype(np.float32)
    depth = rasterize(vc, faces, camera.scaled(W, H)).depth
    ix = np.clip(np.round(np.where(inside, px, 0.0)).astype(np.int64), 0, W - 1)
    iy = np.clip(np.round(np.where(inside, py, 0.0)).astype(np.int64), 0, H - 1)
    d = depth[iy, ix]
    visible = inside & (d > 0) & (z <= d + _DEPTH_SLACK)  # depth 0: an empty pixel
    # facing the camera: the interpolated vertex normal against the viewing ray
    n = vertex_normals(vc.astype(np.float64), faces)
    nrm = (bary[:, :, None] * n[faces[fid]]).sum(axis=1)
    visible &= (nrm * cam_pts).sum(axis=1) < 0.0
    rgba = np.zeros((size, size, 4), np.uint8)
    colours = np.zeros((len(fid), 4), np.uint8)
    if visible.any():
        colours[visible, :3] = np.clip(_bilinear(image, px[visible], py[visible]) + 0.5, 0, 255).astype(np.uint8)
        colours[visible, 3] = 255
    rgba[covered] = colours
    return rgba
