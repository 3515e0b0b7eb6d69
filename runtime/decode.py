"""Image decoding with Pillow: whatever a user passes becomes ``(H, W, 3) uint8`` RGB.

* EXIF orientation is applied (a phone photo shot in portrait comes out upright).
* Grayscale (``L``, ``I;16``, ``I``, ``F``), palette (``P``), ``RGBA`` / ``LA`` (alpha
  composited over black), ``CMYK`` and 16-bit images are converted; 16-bit and float
  data are scaled by their type's range, not clipped.
* Pillow's decompression-bomb limit applies (``MAX_PIXELS``, 178 MP as Pillow's default
  warning threshold): a larger image is an :class:`InputError`, not a silent slowdown.
* A missing, empty, truncated or non-image file is an :class:`InputError` naming it.

NumPy arrays are accepted too: ``(H, W, 3)`` / ``(H, W, 4)`` / ``(H, W)`` of uint8, or
float in [0, 1].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from p3dmm.fitting.base.errors import InputError

__all__ = ["MAX_PIXELS", "decode_image", "load_image"]

#: Images with more pixels are refused (Pillow's DecompressionBombWarning threshold).
MAX_PIXELS = 178_956_970


def _to_rgb(im: Any, name: str) -> np.ndarray:
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.uint16).astype(np.float32) / 65535.0
        return np.repeat((a * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    if mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if mode == "I" and a.max() > 255 else (255.0 if mode == "I" or a.max() > 1.0 else 1.0)
        a = np.clip(a / top, 0.0, 1.0)
        return np.repeat((a * 255.0 + 0.5).astype(np.uint8)[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(black, rgba).convert("RGB"), dtype=np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")
    out = np.asarray(im, dtype=np.uint8)
    if out.ndim != 3 or out.shape[2] != 3:  # pragma: no cover - Pillow's RGB is always (H, W, 3)
        raise InputError(f"{name}: decoded to shape {out.shape}, expected (H, W, 3)")
    return out


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file to ``(H, W, 3) uint8`` RGB (see the module docstring).

    Raises:
        InputError: missing, empty, truncated, too large or not an image; names the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: image file not found")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as opened:
                opened.load()  # decode now: a truncated file fails here, not later
                return _to_rgb(ImageOps.exif_transpose(opened), str(p))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{p}: image too large ({e}); the limit is {MAX_PIXELS} pixels") from e
    except UnidentifiedImageError as e:
        raise InputError(f"{p}: not an image Pillow can read (expected PNG, JPEG, ...)") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated data, broken headers
        raise InputError(f"{p}: cannot decode image ({type(e).__name__}: {e}); the file may be truncated") from e
    finally:
        Image.MAX_IMAGE_PIXELS = old


def decode_image(image: Any, name: str = "image") -> np.ndarray:
    """A file path or an array as ``(H, W, 3) uint8`` RGB.

    Raises:
        InputError: a file that cannot be decoded (:func:`load_image`), or an array of
            the wrong shape, dtype or range.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.shape[0] < 1 or a.shape[1] < 1:
        raise InputError(f"{name}: array of shape {a.shape}, expected (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey")
    if a.shape[2] == 4:
        alpha = a[..., 3:4].astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
        a = (a[..., :3].astype(np.float32) * alpha).astype(a.dtype)
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a[..., :3])
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0.0 or a.max() > 1.0:
            raise InputError(f"{name}: float image values must be finite and in [0, 1] (got {a.min()}..{a.max()})")
        return (a[..., :3] * 255.0 + 0.5).astype(np.uint8)
    raise InputError(f"{name}: dtype {a.dtype}, expected uint8 or float in [0, 1]")
