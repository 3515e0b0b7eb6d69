"""Camera sensor effects, shared by the renderer's photos and the training augmentation:
Gaussian blur, noise, 8-bit quantisation and a JPEG round trip.

Blur is scipy's ``gaussian_filter`` and JPEG is Pillow's codec; the functions here only
fix how both are called, so a rendered photo and an augmented one degrade the same way.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["gaussian_blur", "jpeg_roundtrip", "luma_chroma_noise", "signal_dependent_noise", "to_uint8"]


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an ``(H, W, C)`` float image, ``sigma`` pixels per channel, reflected borders.

    The result keeps ``image``'s float dtype.
    """
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, sigma=(sigma, sigma, 0.0), mode="reflect")


def signal_dependent_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Add per-channel Gaussian noise of sd ``sigma * (0.5 + sqrt(clip(image, 0, 1)))`` (not clipped)."""
    return image + rng.normal(0, sigma, image.shape) * (0.5 + np.sqrt(np.clip(image, 0, 1)))


def luma_chroma_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Add luma noise (sd ``sigma``, same for all channels) and chroma noise (sd ``sigma / 2``).

    Returns:
        ``(H, W, 3) float32`` clipped to [0, 1].
    """
    H, W = image.shape[:2]
    luma = rng.normal(0.0, sigma, (H, W, 1))
    chroma = rng.normal(0.0, 0.5 * sigma, (H, W, 3))
    return np.clip(image + luma + chroma, 0.0, 1.0).astype(np.float32)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``[0, 1]`` floats to ``uint8`` (rounded, clipped)."""
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode an ``(H, W, 3) uint8`` image as JPEG with Pillow and decode it again.

    Args:
        image: ``(H, W, 3) uint8`` RGB.
        quality: JPEG quality 1..100.

    Returns:
        ``(H, W, 3) uint8``.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
