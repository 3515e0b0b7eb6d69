"""Predictor-like errors applied to oracle maps (seeded): what a trained network gets wrong.

Each function takes and returns an :class:`~p3dmm.fitting.Observation` (host arrays) and
leaves the input unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from p3dmm.fitting import Observation


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], channels: int, cells: int = 6) -> np.ndarray:
    """``(H, W, channels)`` smooth noise with unit RMS (bicubic upsampling of a coarse grid)."""
    H, W = shape
    coarse = rng.normal(size=(cells, cells, channels))
    field = ndimage.zoom(coarse, (H / cells, W / cells, 1), order=3, mode="nearest")[:H, :W]
    return field / max(float(np.sqrt((field**2).mean())), 1e-12)


def _with(obs: Observation, **changes: np.ndarray) -> Observation:
    return dataclasses.replace(obs, **changes)


def uv_error(obs: Observation, rng: np.random.Generator, smooth: float = 0.006, jitter: float = 0.0015) -> Observation:
    """A smooth UV displacement of RMS ``smooth`` (UV units) plus per-pixel jitter of sd ``jitter``."""
    m = obs.mask[..., None]
    uv = obs.uv + smooth * smooth_field(rng, obs.mask.shape, 2) + rng.normal(0, jitter, obs.uv.shape)
    return _with(obs, uv=np.where(m, np.clip(uv, 0, 1), 0).astype(np.float32))


def normal_error(obs: Observation, rng: np.random.Generator, degrees: float = 10.0) -> Observation:
    """A smooth tilt of the normals by about ``degrees`` (RMS), renormalised."""
    n = obs.normals + np.tan(np.radians(degrees)) * smooth_field(rng, obs.mask.shape, 3) / np.sqrt(2)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return _with(obs, normals=np.where(obs.mask[..., None], n, 0).astype(np.float32))


def erode(obs: Observation, pixels: int) -> Observation:
    """The mask eroded by ``pixels`` (a predicted mask that is too tight)."""
    return _with(obs, mask=ndimage.binary_erosion(obs.mask, iterations=pixels))


def dilate(obs: Observation, pixels: int) -> Observation:
    """The mask dilated by ``pixels``; the new pixels carry the nearest original maps (bleeding)."""
    mask = ndimage.binary_dilation(obs.mask, iterations=pixels)
    _, idx = ndimage.distance_transform_edt(~obs.mask, return_indices=True)
    near = tuple(idx)
    normals = np.where(obs.mask[..., None], obs.normals, obs.normals[near])
    uv = np.where(obs.mask[..., None], obs.uv, obs.uv[near])
    return _with(obs, mask=mask, normals=normals.astype(np.float32), uv=uv.astype(np.float32))


def occluder(obs: Observation, rng: np.random.Generator, radius: float = 0.12) -> Observation:
    """A disc (``radius`` x image size) centred on the mask's edge, carrying random UV and
    normals, whose pixels inside the mask stay in it (a hand or a microphone the network
    did not recognise)."""
    H, W = obs.mask.shape
    ys, xs = np.nonzero(obs.mask & ~ndimage.binary_erosion(obs.mask, iterations=2))
    k = rng.integers(len(ys))
    yy, xx = np.mgrid[0:H, 0:W]
    disc = (yy - ys[k]) ** 2 + (xx - xs[k]) ** 2 < (radius * max(H, W)) ** 2
    n = rng.normal(size=obs.normals.shape)
    n[..., 2] = -np.abs(n[..., 2])  # facing the camera, as a predictor would say
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    inside = (disc & obs.mask)[..., None]
    normals = np.where(inside, n, obs.normals).astype(np.float32)
    uv = np.where(inside, rng.uniform(0, 1, obs.uv.shape), obs.uv).astype(np.float32)
    return _with(obs, normals=normals, uv=uv)


def missing_region(obs: Observation, rng: np.random.Generator, fraction: float = 0.25) -> Observation:
    """A horizontal band covering about ``fraction`` of the mask's rows removed (hair, a hat)."""
    rows = np.nonzero(obs.mask.any(1))[0]
    top = rows[0] if rng.random() < 0.5 else rows[0] + int((1 - fraction) * len(rows))
    mask = obs.mask.copy()
    mask[top : top + int(fraction * len(rows))] = False
    return _with(obs, mask=mask)


def predictor_like(obs: Observation, rng: np.random.Generator, level: float = 1.0) -> Observation:
    """All of it, scaled by ``level`` (1: the errors of a decent predictor, as in the issue)."""
    out = uv_error(obs, rng, smooth=0.006 * level, jitter=0.0015 * level)
    out = normal_error(out, rng, degrees=10.0 * level)
    if level > 0:
        out = erode(out, max(1, int(round(3 * level))))
        out = occluder(out, rng, radius=0.1 * min(level, 1.5))
    return out
