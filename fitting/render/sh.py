"""Real spherical harmonics of bands 0..2 (the renderer's ambient light model)."""

from __future__ import annotations

import numpy as np

__all__ = ["SH_COSINE", "sh_basis"]

# Real spherical harmonics of bands 0..2, order (0,0), (1,-1), (1,0), (1,1), (2,-2),
# (2,-1), (2,0), (2,1), (2,2); and the clamped-cosine convolution factors A_l:
SH_BAND = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
# A directional light of unit irradiance from d gives irradiance
# E(n) = sum_k A_l(k) Y_k(d) Y_k(n) ~ max(0, n . d) (band-limited clamped cosine).
SH_COSINE = np.array([np.pi, 2 * np.pi / 3, np.pi / 4])[SH_BAND]


def sh_basis(n: np.ndarray) -> np.ndarray:
    """Real spherical harmonics of bands 0..2 at unit directions.

    Args:
        n: ``(N, 3)`` unit vectors.

    Returns:
        ``(N, 9)`` basis values in the order Y00, Y1-1, Y10, Y11, Y2-2, Y2-1, Y20, Y21, Y22.
    """
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    return np.stack(
        [
            np.full_like(x, 0.282095),
            0.488603 * y,
            0.488603 * z,
            0.488603 * x,
            1.092548 * x * y,
            1.092548 * y * z,
            0.315392 * (3.0 * z * z - 1.0),
            1.092548 * x * z,
            0.546274 * (x * x - y * y),
        ],
        axis=1,
    )
