"""What a rendered face photo looks like: :class:`Appearance` (skin, lips, brows, eyes, hair,
lighting, background, sensor), drawn at random by :meth:`Appearance.sample`, and the sRGB
transfer functions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..base.errors import InputError
from .sh import SH_COSINE, sh_basis

__all__ = ["Appearance", "linear_to_srgb", "srgb_to_linear"]


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)


# sRGB skin albedos from light to dark; a sample interpolates along this ramp.
_SKIN_RAMP_SRGB = np.array(
    [
        [0.96, 0.80, 0.71],
        [0.90, 0.70, 0.58],
        [0.80, 0.58, 0.45],
        [0.66, 0.45, 0.33],
        [0.50, 0.33, 0.23],
        [0.34, 0.22, 0.15],
        [0.24, 0.15, 0.10],
    ]
)
_HAIR_SRGB = np.array(
    [
        [0.06, 0.05, 0.04],
        [0.20, 0.13, 0.08],
        [0.40, 0.27, 0.15],
        [0.72, 0.58, 0.38],
        [0.55, 0.25, 0.12],
        [0.6, 0.6, 0.6],
    ]
)
_IRIS_SRGB = np.array(
    [[0.30, 0.18, 0.08], [0.15, 0.09, 0.05], [0.35, 0.45, 0.60], [0.35, 0.45, 0.30], [0.45, 0.38, 0.22]]
)


def _tuple(a: Any) -> tuple:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return float(a)  # type: ignore[return-value]
    return tuple(_tuple(x) for x in a) if a.ndim > 1 else tuple(float(x) for x in a)


@dataclass(frozen=True)
class Appearance:
    """Everything random about one rendered photo, drawn by :meth:`sample`.

    Colours are linear-light RGB albedos in [0, 1]; directions are unit vectors in the
    OpenCV camera frame pointing *towards* the light.

    Attributes:
        seed: seed of the noise fields (pores, blotches, background, sensor noise).
        skin: ``(3,)`` skin albedo.
        skin_variation: amplitude of low-frequency blotches (0..~0.2).
        redness: strength of reddish patches (cheeks, nose) (0..1).
        pores: amplitude of fine UV-space pore texture.
        lips: ``(3,)`` lip albedo.
        brows: ``(3,)`` eyebrow albedo.
        brow_width_m: eyebrow half-thickness in metres.
        brow_strength: opacity of the brows (0..1).
        lash_strength: darkening of the eyelid rim (lashes / eyeliner) (0..1).
        hair: ``(3,)`` hair albedo on the scalp, or None for a bald head.
        sclera: ``(3,)`` eye-white albedo.
        iris: ``(3,)`` iris albedo.
        iris_angle: iris radius as an angle on the eyeball (radians).
        pupil_angle: pupil radius as an angle (radians).
        sh_ambient: ``(9, 3)`` SH coefficients of the unshadowed light (ambient + fill);
            ``radiance(n) = albedo * (sh_basis(n) @ sh_ambient + visibility * key(n))``.
        key_dir: ``(3,)`` direction towards the key light (camera frame).
        key_rgb: ``(3,)`` key-light intensity.
        shadow_strength: 0 = no cast shadows, 1 = full shadows.
        ao_strength: strength of the concavity ambient occlusion.
        specular: specular weight of skin.
        shininess: Blinn-Phong exponent of skin.
        exposure: linear radiance of an 18% grey surface under the head's mean lighting.
        background: kind of background, "gradient", "noise", "blobs" or "mixed".
        background_colors: ``(4, 3)`` sRGB colours the background is built from.
        blur_sigma: Gaussian blur of the final image in pixels at 512 px.
        noise_sigma: sensor noise standard deviation (sRGB units).
        white_balance: ``(3,)`` per-channel gains.
        jpeg_quality: JPEG quality of the round trip, or 0 for none.
    """

    seed: int
    skin: tuple[float, float, float]
    skin_variation: float
    redness: float
    pores: float
    lips: tuple[float, float, float]
    brows: tuple[float, float, float]
    brow_width_m: float
    brow_strength: float
    lash_strength: float
    hair: tuple[float, float, float] | None
    sclera: tuple[float, float, float]
    iris: tuple[float, float, float]
    iris_angle: float
    pupil_angle: float
    sh_ambient: tuple[tuple[float, float, float], ...]
    key_dir: tuple[float, float, float]
    key_rgb: tuple[float, float, float]
    shadow_strength: float
    ao_strength: float
    specular: float
    shininess: float
    exposure: float
    background: str
    background_colors: tuple[tuple[float, float, float], ...]
    blur_sigma: float
    noise_sigma: float
    white_balance: tuple[float, float, float]
    jpeg_quality: int

    @staticmethod
    def sample(rng: np.random.Generator) -> "Appearance":
        """Draw a random identity's appearance, lighting, background and sensor.

        Args:
            rng: the generator all randomness comes from.
        """
        # skin: a point on the light-to-dark ramp, with a small hue/saturation jitter
        t = rng.uniform(0, len(_SKIN_RAMP_SRGB) - 1)
        i = min(int(t), len(_SKIN_RAMP_SRGB) - 2)
        skin_srgb = _SKIN_RAMP_SRGB[i] * (i + 1 - t) + _SKIN_RAMP_SRGB[i + 1] * (t - i)
        skin_srgb = np.clip(skin_srgb * (1 + rng.normal(0, 0.03, 3)), 0.02, 1.0)
        skin = srgb_to_linear(skin_srgb)
        lips = skin * np.array([1.0, 0.55, 0.6]) * rng.uniform(0.6, 0.95) + np.array([0.03, 0.0, 0.005]) * rng.uniform(
            0, 1
        )
        hair_srgb = _HAIR_SRGB[rng.integers(len(_HAIR_SRGB))] * rng.uniform(0.8, 1.15, 3)
        hair = srgb_to_linear(np.clip(hair_srgb, 0, 1))
        # brows: darker than the skin, tinted towards the hair colour
        brows = 0.5 * skin * rng.uniform(0.12, 0.45) + 0.5 * np.minimum(hair, skin * rng.uniform(0.2, 0.6))
        iris = srgb_to_linear(np.clip(_IRIS_SRGB[rng.integers(len(_IRIS_SRGB))] * rng.uniform(0.7, 1.3), 0, 1))

        # lighting: a frontal-top key light plus ambient and a weaker fill from a side
        key_dir = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-1.0, -0.05), -rng.uniform(0.5, 1.2)])
        key_dir /= np.linalg.norm(key_dir)
        tint = rng.uniform(0.85, 1.15, 3)
        tint /= tint.mean()
        key_rgb = rng.uniform(0.7, 1.4) * tint
        fill_dir = np.array(
            [rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0), rng.uniform(-0.5, 0.5), -rng.uniform(0.0, 1.0)]
        )
        fill_dir /= np.linalg.norm(fill_dir)
        ambient = rng.uniform(0.12, 0.45) * rng.uniform(0.85, 1.15, 3)
        sh = np.zeros((9, 3))
        sh[0] = ambient / 0.282095
        fill = rng.uniform(0.0, 0.35) * rng.uniform(0.85, 1.15, 3)
        sh += (SH_COSINE * sh_basis(fill_dir[None])[0])[:, None] * fill[None]
        sh[1:] += rng.normal(0, 0.04, (8, 3))

        kind = ["gradient", "noise", "blobs", "mixed"][int(rng.integers(4))]
        bg = rng.uniform(0.0, 1.0, (4, 3)) ** rng.uniform(0.7, 1.6)
        return Appearance(
            seed=int(rng.integers(0, 2**31 - 1)),
            skin=_tuple(skin),
            skin_variation=float(rng.uniform(0.03, 0.15)),
            redness=float(rng.uniform(0.0, 0.8)),
            pores=float(rng.uniform(0.02, 0.08)),
            lips=_tuple(np.clip(lips, 0, 1)),
            brows=_tuple(np.clip(brows, 0, 1)),
            brow_width_m=float(rng.uniform(0.0025, 0.0055)),
            brow_strength=float(rng.uniform(0.5, 0.95)),
            lash_strength=float(rng.uniform(0.3, 0.9)),
            hair=_tuple(hair) if rng.random() < 0.75 else None,
            sclera=_tuple(np.array([0.80, 0.74, 0.70]) * rng.uniform(0.75, 1.0)),
            iris=_tuple(iris),
            iris_angle=float(rng.uniform(0.45, 0.58)),
            pupil_angle=float(rng.uniform(0.14, 0.26)),
            sh_ambient=_tuple(sh),
            key_dir=_tuple(key_dir),
            key_rgb=_tuple(key_rgb),
            shadow_strength=float(rng.uniform(0.5, 1.0)),
            ao_strength=float(rng.uniform(0.5, 1.0)),
            specular=float(rng.uniform(0.01, 0.07)),
            shininess=float(rng.uniform(15.0, 60.0)),
            exposure=float(rng.uniform(0.1, 0.22)),
            background=kind,
            background_colors=_tuple(bg),
            blur_sigma=float(rng.uniform(0.0, 1.0)),
            noise_sigma=float(rng.uniform(0.002, 0.02)),
            white_balance=_tuple(rng.uniform(0.92, 1.08, 3)),
            jpeg_quality=int(rng.integers(55, 98)) if rng.random() < 0.85 else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Appearance":
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: a field is missing or unknown.
        """
        names = [f.name for f in dataclasses.fields(Appearance)]
        missing = [n for n in names if n not in d]
        extra = [k for k in d if k not in names]
        if missing or extra:
            raise InputError(f"Appearance dict: missing fields {missing}, unknown fields {extra}")
        values: dict[str, Any] = {n: (_tuple(d[n]) if isinstance(d[n], (list, tuple)) else d[n]) for n in names}
        return Appearance(**values)


# ----------------------------------------------------------------------- result type
