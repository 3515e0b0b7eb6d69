"""The synthetic face photo: albedo, lighting, exposure, background and sensor effects
composed over the covered pixels of a render (:class:`~p3dmm.fitting.render.surface.Surface`).
"""

from __future__ import annotations

import numpy as np

from .albedo import surface_albedo
from .appearance import Appearance, linear_to_srgb, srgb_to_linear
from .background import background
from .lighting import light_surface
from .model_data import RenderData
from .sensor import gaussian_blur, jpeg_roundtrip, signal_dependent_noise, to_uint8
from .surface import Surface

__all__ = ["render_photo"]


def render_photo(
    data: RenderData, surface: Surface, app: Appearance, albedo_texture: np.ndarray | None = None
) -> np.ndarray:
    """Photo-like ``(H, W, 3) uint8`` image of the rasterized head (size from ``surface.camera``).

    Every random draw comes from ``np.random.default_rng(app.seed)``, in a fixed order
    (pore texture, background, sensor noise), so the appearance reproduces the image.
    """
    rng = np.random.default_rng(app.seed)
    H, W = surface.camera.height, surface.camera.width
    scale = W / 512.0
    albedo, specular = surface_albedo(data, surface, app, rng, albedo_texture)
    radiance, shading = light_surface(data, surface, app, albedo, specular)

    # exposure: an 18% grey surface under the head's mean lighting gets radiance
    # app.exposure (so dark skin stays dark)
    m = 0.18 * float(np.maximum(shading, 0.0).mean()) if len(surface.pixels) else 1.0
    radiance *= app.exposure / max(m, 1e-6)

    # ---- compose with the background, sensor effects
    img = srgb_to_linear(background(app, H, W, rng)).reshape(-1, 3)
    img[surface.pixels] = radiance
    img = img.reshape(H, W, 3) * np.asarray(app.white_balance)[None, None]
    if app.blur_sigma > 0.05:
        img = gaussian_blur(img, app.blur_sigma * max(scale, 0.25))
    img = signal_dependent_noise(linear_to_srgb(img), rng, app.noise_sigma)
    out = to_uint8(img)
    if app.jpeg_quality > 0:
        out = jpeg_roundtrip(out, app.jpeg_quality)
    return out
