"""Random backgrounds of the synthetic face photo (gradients, smooth noise, blobs, mixed)."""

from __future__ import annotations

import numpy as np

from .appearance import Appearance

__all__ = ["background"]


def background(app: Appearance, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` sRGB background in [0, 1]."""
    from scipy import ndimage

    cols = np.asarray(app.background_colors, dtype=np.float64)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    yy /= max(H - 1, 1)
    xx /= max(W - 1, 1)

    def gradient() -> np.ndarray:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
        return cols[0] * (1 - t[..., None]) + cols[1] * t[..., None]

    def noise() -> np.ndarray:
        k = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, (k, k, 3)) * 0.6 + cols[2] * 0.4
        up = ndimage.zoom(grid, (H / k, W / k, 1), order=3, mode="nearest")[:H, :W]
        fine = ndimage.gaussian_filter(rng.normal(0, 1, (H, W)), 1.0 + 2.0 * rng.random())
        return np.clip(up + 0.03 * fine[..., None], 0, 1)

    def blobs() -> np.ndarray:
        img = np.broadcast_to(cols[3], (H, W, 3)).copy()
        for _ in range(int(rng.integers(3, 9))):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
            w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(0.4, 1.0)
            img = img * (1 - w) + rng.uniform(0, 1, 3) * w
        return img

    if app.background == "gradient":
        bg = gradient()
    elif app.background == "noise":
        bg = noise()
    elif app.background == "blobs":
        bg = blobs()
    else:
        bg = 0.5 * gradient() + 0.5 * blobs()
        bg = np.clip(bg + 0.3 * (noise() - 0.5), 0, 1)
    return bg
