"""Lighting of the synthetic face photo: spherical-harmonics ambient light with concavity
occlusion, a key light with a shadow map (a second rasterization seen from the light) and
Blinn-Phong specular.
"""

from __future__ import annotations

import numpy as np

from ..base.camera import Camera
from .appearance import Appearance
from .model_data import RenderData, neighbour_mean, smooth_vertex_field
from .raster import rasterize
from .sh import SH_COSINE, sh_basis
from .surface import Surface

__all__ = ["concavity_occlusion", "light_surface", "look_at_rotation", "shadow_visibility"]


def look_at_rotation(forward: np.ndarray) -> np.ndarray:
    """Rows x, y, z of a camera whose z axis is ``forward`` (unit)."""
    up = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(up, forward)
    x /= np.linalg.norm(x)
    y = np.cross(forward, x)
    return np.stack([x, y, forward])



def shadow_visibility(verts_cam: np.ndarray, faces: np.ndarray, key_dir: np.ndarray, res: int) -> np.ndarray:
    """Per-vertex visibility (0/1) from a directional key light, by a shadow map.

    The light is a camera 1.5 m away from the head's centre in direction ``key_dir``,
    looking at it; a vertex is lit when it is no farther than the shadow map's depth at
    its pixel (plus a small bias).
    """
    centre = 0.5 * (verts_cam.min(0) + verts_cam.max(0))
    extent = float(np.linalg.norm(verts_cam.max(0) - verts_cam.min(0)))
    dist = 1.5 + extent
    eye = centre + key_dir * dist
    Rl = look_at_rotation(-key_dir)
    vl = (verts_cam - eye) @ Rl.T
    focal = res * dist / (1.15 * max(extent, 1e-3))
    cam = Camera(
        focal=np.asarray(focal, dtype=np.float32),
        principal=np.array([(res - 1) / 2, (res - 1) / 2], dtype=np.float32),
        R=np.eye(3, dtype=np.float32),
        t=np.zeros(3, dtype=np.float32),
        width=res,
        height=res,
    )
    fr = rasterize(vl.astype(np.float32), faces, cam)
    px = cam.project_camera(vl)
    col = np.clip(np.rint(px[:, 0]).astype(np.int64), 0, res - 1)
    row = np.clip(np.rint(px[:, 1]).astype(np.int64), 0, res - 1)
    # the farthest depth of a 3x3 neighbourhood tolerates the vertex's own silhouette
    d = fr.depth.astype(np.float64)
    d = np.where(d > 0, d, np.inf)
    pad = np.pad(d, 1, mode="edge")
    dmax = np.max(
        np.stack([pad[1 + a : 1 + a + res, 1 + b : 1 + b + res] for a in (-1, 0, 1) for b in (-1, 0, 1)]), axis=0
    )
    bias = 0.004 * max(extent / 0.25, 0.2)
    return (vl[:, 2] <= dmax[row, col] + bias).astype(np.float64)


def concavity_occlusion(verts: np.ndarray, normals: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-vertex ambient occlusion in [0, 1] from mesh concavity (0 = fully occluded)."""
    n = len(verts)
    lap = np.stack([neighbour_mean(verts[:, c], edges, n) for c in range(3)], axis=1) - verts
    el = np.linalg.norm(verts[edges[:, 0]] - verts[edges[:, 1]], axis=1)
    mean_edge = max(float(el.mean()) if len(el) else 1.0, 1e-9)
    conc = (lap * normals).sum(1) / mean_edge  # > 0 where the neighbours lie above the tangent plane
    conc = smooth_vertex_field(conc, edges, 2)
    return np.clip(1.0 - 1.5 * np.maximum(conc, 0.0), 0.25, 1.0)



def light_surface(
    data: RenderData, surface: Surface, app: Appearance, albedo: np.ndarray, specular: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Radiance of the covered pixels under the appearance's lights, in camera space.

    Ambient light is 2nd-order spherical harmonics (``sh_ambient``) with concavity
    occlusion; the key light is a band-limited clamped cosine from ``key_dir`` whose shadow
    comes from a shadow map, plus Blinn-Phong specular. Back faces (seen through an open
    mouth) are a dark cavity.

    Args:
        data: the model's render data (faces, mesh edges).
        surface: the covered pixels.
        app: the lights and material constants.
        albedo: ``(P, 3)`` linear RGB.
        specular: ``(P,)`` specular weights.

    Returns:
        ``radiance (P, 3)`` and the diffuse ``shading (P, 3)`` (for the exposure).
    """
    spec_w = specular
    sh = np.asarray(app.sh_ambient)
    key_dir = np.asarray(app.key_dir)
    key_rgb = np.asarray(app.key_rgb)
    shading = sh_basis(surface.normals) @ sh
    key_lobe = (SH_COSINE * sh_basis(key_dir[None])[0]) @ sh_basis(surface.normals).T  # ~ max(0, n . d)
    key_lobe = np.maximum(key_lobe, 0.0)
    vis_v = shadow_visibility(surface.verts_cam, data.faces, key_dir, max(64, min(512, surface.camera.width // 2)))
    vis = surface.interp_scalar(vis_v)
    vis = 1.0 - app.shadow_strength * (1.0 - vis)
    ao_v = concavity_occlusion(surface.verts_cam, surface.vertex_normals, data.edges)
    ao = 1.0 - app.ao_strength * (1.0 - surface.interp_scalar(ao_v))
    shading = shading * ao[:, None] + (vis * key_lobe)[:, None] * key_rgb[None]
    radiance = albedo * np.maximum(shading, 0.0)
    # specular (Blinn-Phong) from the key light
    p_cam = surface.interp(surface.verts_cam)
    view = -p_cam / np.maximum(np.linalg.norm(p_cam, axis=1, keepdims=True), 1e-12)
    h = view + key_dir[None]
    h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    shin = np.where(spec_w > 0.5, 300.0, app.shininess)
    spec = spec_w * np.maximum((surface.normals * h).sum(1), 0.0) ** shin * vis * (key_lobe > 0)
    radiance += spec[:, None] * key_rgb[None]
    # back faces seen through an open mouth: a dark cavity
    backface = (surface.normals * p_cam).sum(1) > 0
    radiance[backface] = np.array([0.05, 0.012, 0.01]) * (0.5 + 0.5 * ao[backface, None])

    return radiance, shading
