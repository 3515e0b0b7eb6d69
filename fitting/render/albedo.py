"""Procedural albedo of the synthetic face photo: skin with blotches and pores, redness,
lips, brows drawn in UV space, lashes, hair on the scalp, eyeballs (sclera, iris, pupil);
or a given texture. Value noise and texture lookups are written here in NumPy: they are
a few lines each and must be bit-stable across library versions (datasets are seeded).
"""

from __future__ import annotations

import numpy as np

from ..base.errors import InputError
from .appearance import Appearance, srgb_to_linear
from .model_data import RenderData
from .surface import Surface

__all__ = ["fbm", "polyline_distance", "sample_texture", "surface_albedo", "value_noise"]


def hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) at integer lattice points."""
    h = (
        ix.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B185EBCA87)
        ^ iy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        ^ iz.astype(np.int64).view(np.uint64) * np.uint64(0x165667B19E3779F9)
        ^ np.full(ix.shape, seed & 0xFFFFFFFF, dtype=np.uint64) * np.uint64(0x27D4EB2F165667C5)
    )
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def value_noise(points: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth 3D value noise in [-1, 1] at ``points (N, 3)`` with lattice spacing ``cell``."""
    p = points / cell
    i0 = np.floor(p)
    f = p - i0
    f = f * f * (3.0 - 2.0 * f)
    i0 = i0.astype(np.int64)
    out = np.zeros(len(points))
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1.0 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1.0 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1.0 - f[:, 2]
                out += wx * wy * wz * hash01(i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz, seed)
    return 2.0 * out - 1.0


def fbm(points: np.ndarray, cell: float, seed: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros(len(points))
    amp, tot = 1.0, 0.0
    for o in range(octaves):
        out += amp * value_noise(points, cell / 2**o, seed + 101 * o)
        tot += amp
        amp *= 0.5
    return out / tot


def sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``tex (Ht, Wt, C)`` at ``uv (N, 2)`` (v up, row 0 = v 1)."""
    Ht, Wt = tex.shape[:2]
    x = np.clip(uv[:, 0], 0, 1) * (Wt - 1)
    y = (1.0 - np.clip(uv[:, 1], 0, 1)) * (Ht - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), Wt - 2 if Wt > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), Ht - 2 if Ht > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, Wt - 1), np.minimum(y0 + 1, Ht - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    t = tex.reshape(Ht, Wt, -1)
    return t[y0, x0] * (1 - fx) * (1 - fy) + t[y0, x1] * fx * (1 - fy) + t[y1, x0] * (1 - fx) * fy + t[y1, x1] * fx * fy


def polyline_distance(p: np.ndarray, line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of ``p (N, 2)`` to a polyline ``(K, 2)`` and the arc parameter in [0, 1]."""
    best = np.full(len(p), np.inf)
    s_best = np.zeros(len(p))
    seg_len = np.linalg.norm(np.diff(line, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = max(cum[-1], 1e-12)
    for k in range(len(line) - 1):
        a, b = line[k], line[k + 1]
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-20), 0.0, 1.0)
        d = np.linalg.norm(p - (a + t[:, None] * ab), axis=1)
        better = d < best
        best = np.where(better, d, best)
        s_best = np.where(better, (cum[k] + t * seg_len[k]) / total, s_best)
    return best, s_best



def surface_albedo(
    data: RenderData,
    surface: Surface,
    app: Appearance,
    rng: np.random.Generator,
    albedo_texture: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Linear-RGB albedo and specular weight per covered pixel.

    Args:
        data: the model's render data (region weights, eyes, brows).
        surface: the covered pixels.
        app: skin, lips, brows, lashes, hair and eye colours.
        rng: the photo's generator (draws the pore texture unless ``albedo_texture``).
        albedo_texture: ``(Ht, Wt, 3)`` sRGB texture in the model's UV layout (row 0 =
            v 1), uint8 or float in [0, 1]; replaces the procedural albedo.

    Returns:
        ``albedo (P, 3)`` linear RGB and ``specular (P,)`` weights.

    Raises:
        InputError: ``albedo_texture`` of the wrong shape.
    """
    from scipy import ndimage

    uv = surface.uv
    P = len(surface.pixels)
    scale = surface.camera.width / 512.0
    rest_p = surface.interp(data.rest)
    if albedo_texture is not None:
        tex = np.asarray(albedo_texture)
        if tex.ndim != 3 or tex.shape[2] < 3:
            raise InputError(f"render_maps: albedo_texture has shape {tex.shape}, expected (Ht, Wt, 3)")
        tex = tex[..., :3]
        tex = tex.astype(np.float64) / (255.0 if tex.dtype == np.uint8 else 1.0)
        albedo = srgb_to_linear(sample_texture(tex, uv))
        spec_w = np.full(P, app.specular)
    else:
        skin = np.asarray(app.skin)
        blotch = fbm(rest_p, 0.02, app.seed, 3)
        albedo = skin[None] * (1.0 + app.skin_variation * blotch[:, None] * np.array([1.0, 0.9, 0.85]))
        red_v = data.redness_w * (0.5 + 0.5 * value_noise(data.rest, 0.015, app.seed + 7))
        red = app.redness * np.clip(surface.interp_scalar(red_v), 0, 1)
        albedo = albedo * (1.0 + red[:, None] * np.array([0.12, -0.12, -0.1]))
        # pores: fine noise texture in UV space
        tex_n = max(64, int(512 * max(scale, 0.25)))
        pores = ndimage.gaussian_filter(rng.normal(0, 1, (tex_n, tex_n)), 0.8)
        pores /= max(float(pores.std()), 1e-9)
        albedo *= (1.0 + app.pores * np.clip(sample_texture(pores[..., None], uv)[:, 0], -3, 3))[:, None]
        # lips
        lips_w = np.clip(surface.interp_scalar(data.lips_w), 0, 1) ** 1.5
        albedo = albedo * (1 - lips_w[:, None]) + np.asarray(app.lips)[None] * lips_w[:, None]
        # brows in UV space, hair-like streaks
        for line in data.brows_uv:
            d, s = polyline_distance(uv, line)
            width = app.brow_width_m * data.uv_per_metre * (1.2 - 0.6 * s)  # thicker towards the nose end
            streak = 0.75 + 0.25 * value_noise(
                np.stack([uv[:, 0] * 900, uv[:, 1] * 180, np.zeros(P)], 1), 1.0, app.seed + 11
            )
            w = np.clip(1.5 - d / np.maximum(width, 1e-9), 0, 1) * app.brow_strength * streak
            albedo = albedo * (1 - w[:, None]) + np.asarray(app.brows)[None] * w[:, None]
        # eyelid rim (lashes / liner)
        rim = np.clip(surface.interp_scalar(data.rim_w), 0, 1) * app.lash_strength
        albedo *= (1.0 - 0.85 * rim)[:, None]
        # hair on the scalp
        if app.hair is not None:
            hw = np.clip(surface.interp_scalar(data.scalp_w) * 1.6 - 0.3, 0, 1)
            strands = 0.7 + 0.3 * fbm(rest_p * np.array([1.0, 4.0, 1.0]), 0.01, app.seed + 13, 2)
            albedo = albedo * (1 - hw[:, None]) + np.asarray(app.hair)[None] * strands[:, None] * hw[:, None]
        spec_w = np.full(P, app.specular)
        spec_w += 0.1 * lips_w
        # eyeballs: sclera, iris with radial streaks, pupil, dark limbal ring
        on_eye = data.eyeball_faces[surface.face_ids]
        if on_eye.any() and data.eyes:
            pe = rest_p[on_eye]
            # angle from the forward (+z) axis of the nearest eyeball's centre
            dist = np.stack([np.linalg.norm(pe - c, axis=1) for c, _ in data.eyes], 1)
            centres = np.stack([c for c, _ in data.eyes])[np.argmin(dist, axis=1)]
            d = pe - centres
            ang = np.arccos(np.clip(d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-12), -1, 1))
            phi = np.arctan2(d[:, 1], d[:, 0])
            sclera = np.asarray(app.sclera)[None] * (1 - 0.15 * np.clip((ang - 0.8) / 0.8, 0, 1))[:, None]
            streak = 0.75 + 0.25 * np.sin(phi * 37.0 + 3.0 * np.sin(phi * 11.0))
            iris = np.asarray(app.iris)[None] * streak[:, None] * (0.6 + 0.4 * (ang / app.iris_angle))[:, None]
            limbus = np.clip((ang - 0.85 * app.iris_angle) / (0.15 * app.iris_angle), 0, 1)
            iris = iris * (1 - 0.5 * limbus[:, None])
            col = np.where((ang < app.iris_angle)[:, None], iris, sclera)
            col = np.where((ang < app.pupil_angle)[:, None], 0.01, col)
            albedo[on_eye] = col
            spec_w[on_eye] = 0.8
    return albedo, spec_w
