"""Checks of a fit's input: shapes and dtypes on the host at once, data checks (non-finite
pixels, mask size, correspondence count) as device counts that are read with the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base.errors import FittingError, InputError
from ..base.xp import asarray_on, get_array_module
from ..model.arrays import FlameUV
from ..model.flame_model import FlameModel
from ..render.maps import NORMAL_SPACES
from .config import FitConfig, Observation

__all__ = [
    "ATLAS_RESOLUTION",
    "DeviceChecks",
    "atlas_pixels",
    "check_observation",
    "map_checks",
    "require_maps",
    "stack_maps",
]


# ======================================================================= validation
class DeviceChecks:
    """Checks of the input whose outcome is a count on the fitting device.

    On NumPy a failing check raises at once. On CuPy reading the count would make the host
    wait for the device, so the checks are queued and :meth:`raise_failed` reads all of
    them in one transfer when the result is read; the solve runs meanwhile (on arrays
    that stay finite or merely produce a non-finite energy) and no result is returned
    from input that failed a check.
    """

    def __init__(self, xp: Any) -> None:
        self.xp = xp
        self._pending: list[tuple[Any, Any, Any]] = []

    def require(self, count: Any, ok: Any, error: Any) -> None:
        """Raise ``error(n)`` unless ``ok(n)`` for ``n = int(count)`` (now, or deferred on the GPU)."""
        if self.xp is np:
            n = int(count)
            if not ok(n):
                raise error(n)
        else:
            self._pending.append((count, ok, error))

    def counts(self) -> Any:
        """``(n_checks,)`` float64 device vector of the queued counts (empty on NumPy)."""
        xp = self.xp
        if not self._pending:
            return xp.zeros(0)
        return xp.stack([xp.asarray(c, dtype=xp.float64).reshape(()) for c, _, _ in self._pending])

    def raise_failed(self, counts: Any = None) -> None:
        """Raise the first failed queued check's error.

        Args:
            counts: host copy of :meth:`counts` (read here when not given).
        """
        if not self._pending:
            return
        values = self.counts().get() if counts is None else counts
        pending, self._pending = self._pending, []
        for n, (_, ok, error) in zip(values, pending):
            if not ok(int(n)):
                raise error(int(n))


def check_observation(obs: Observation, model: FlameModel) -> tuple[int, int]:
    """The host checks of an observation (shapes, dtypes, normal space, the model's UVs);
    returns its ``(H, W)``.

    Raises:
        InputError, FittingError: the first failed check, naming the field.
    """
    uv, normals, mask = obs.uv, obs.normals, obs.mask
    for name, a in (("uv", uv), ("normals", normals), ("mask", mask)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise InputError(f"fit: observation.{name} is a {type(a).__name__}, expected a NumPy or CuPy array")
    if uv.ndim != 3 or uv.shape[2] != 2:
        raise InputError(f"fit: observation.uv has shape {tuple(uv.shape)}, expected (H, W, 2)")
    H, W = uv.shape[:2]
    if H != W:
        raise InputError(f"fit: observation maps are {H}x{W}; expected a square face crop (H == W, e.g. 512x512)")
    if tuple(normals.shape) != (H, W, 3):
        raise InputError(f"fit: observation.normals has shape {tuple(normals.shape)}, expected ({H}, {W}, 3)")
    if tuple(mask.shape) != (H, W):
        raise InputError(f"fit: observation.mask has shape {tuple(mask.shape)}, expected ({H}, {W})")
    for name, a in (("uv", uv), ("normals", normals)):
        if not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"fit: observation.{name} has dtype {a.dtype}, expected float32")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
        raise InputError(f"fit: observation.mask has dtype {mask.dtype}, expected bool or float")
    if obs.normal_space not in NORMAL_SPACES:
        raise InputError(f"fit: observation.normal_space must be one of {NORMAL_SPACES}, got {obs.normal_space!r}")
    if model.uv is None:
        raise FittingError(f"fit: model {model.name!r} has no UV layout; load it with uv='head_template.obj'")
    if obs.shape_prior is not None and tuple(np.shape(obs.shape_prior)) != (model.n_shape,):
        raise InputError(f"fit: observation.shape_prior has shape {np.shape(obs.shape_prior)}, expected ({model.n_shape},)")
    return int(H), int(W)


def stack_maps(observations: list[Observation], xp: Any) -> tuple[Any, Any, Any]:
    """The ``(B, H, W, 2)`` UV, ``(B, H, W, 3)`` normal and ``(B, H, W)`` bool mask maps of
    same-size observations (checked by :func:`check_observation`) on the fitting device:
    host maps are stacked on the host and uploaded once each, device maps stacked there."""

    def stacked(name: str) -> Any:
        arrays = [getattr(o, name) for o in observations]
        if all(isinstance(a, np.ndarray) for a in arrays):
            return asarray_on(xp, np.stack(arrays))
        return xp.stack([asarray_on(xp, a) for a in arrays])

    uv, normals, mask = stacked("uv"), stacked("normals"), stacked("mask")
    if mask.dtype != bool:
        mask = mask > 0.5
    return uv, normals, mask


def map_checks(uv: Any, normals: Any, mask: Any) -> tuple[Any, Any, Any]:
    """The data checks of stacked maps (:func:`stack_maps`), one set of launches for the batch.

    Returns:
        ``(counts, normals, uv)``: ``(3, B)`` counts per image for :func:`require_maps`
        (masked pixels with NaN/inf, masked pixels with UV outside [0, 1], mask pixels),
        and the float32 maps with everything off the mask set to 0.
    """
    xp = get_array_module(mask)
    bad = ~(xp.isfinite(uv).all(-1) & xp.isfinite(normals).all(-1)) & mask
    # UV in [0, 1] (the FLAME layout's range); a raw [-1, 1] network output or 8/16-bit codes
    # put many masked pixels outside it
    out_of_range = ((uv < -0.01) | (uv > 1.01)).any(-1) & mask & ~bad
    counts = xp.stack([bad, out_of_range, mask]).sum((2, 3))
    m = mask[..., None]
    return counts, xp.where(m, normals, 0.0).astype(xp.float32), xp.where(m, uv, 0.0).astype(xp.float32)


def require_maps(checks: DeviceChecks, counts: Any, config: FitConfig) -> None:
    """Queue (or, on NumPy, run) one image's data checks: ``counts`` is its ``(3,)`` column of
    :func:`map_checks`."""
    checks.require(
        counts[0],
        lambda n: n == 0,
        lambda n: InputError(f"fit: {n} masked pixels have NaN/inf in observation.uv or observation.normals"),
    )
    checks.require(
        counts[1],
        lambda n: n == 0,
        lambda n: InputError(
            f"fit: {n} masked pixels of observation.uv are outside [0, 1]; expected FLAME UV coordinates in [0, 1] "
            "(a raw network output in [-1, 1] needs (x + 1) / 2; 8/16-bit codes need dividing by 255 / 65535)"
        ),
    )
    min_px = config.min_mask_pixels
    checks.require(
        counts[2],
        lambda n: n >= min_px,
        lambda n: FittingError(f"fit: observation.mask has {n} pixels, fewer than min_mask_pixels={min_px}"),
    )


# ======================================================================= the UV atlas
#: Texels per side of the atlas coverage image :func:`atlas_pixels` reads (2 texels of margin).
ATLAS_RESOLUTION = 512

#: (layout, array module) -> the coverage image on that device (one upload per layout)
_DEVICE_COVERAGE: dict[tuple[int, int], tuple[FlameUV, Any, Any]] = {}


def _device_coverage(uv: FlameUV, xp: Any) -> Any:
    cov = uv.coverage(ATLAS_RESOLUTION)
    if xp is np:
        return cov
    key = (id(uv), id(xp))
    hit = _DEVICE_COVERAGE.get(key)
    # the stored objects keep both ids valid; the identity checks guard against a reused id
    if hit is None or hit[0] is not uv or hit[1] is not xp:
        hit = (uv, xp, asarray_on(xp, cov))
        _DEVICE_COVERAGE[key] = hit
    return hit[2]


def atlas_pixels(layout: FlameUV, uv_map: Any, mask: Any) -> Any:
    """Device count of the mask pixels whose UV lies on the model's UV atlas
    (:meth:`~p3dmm.fitting.model.arrays.FlameUV.coverage` at :data:`ATLAS_RESOLUTION`):
    ``(...)`` for ``(..., H, W, 2)`` maps and ``(..., H, W)`` masks."""
    xp = get_array_module(mask)
    cov = _device_coverage(layout, xp)
    R = ATLAS_RESOLUTION
    # every pixel, masked afterwards: boolean indexing would read its size back from the GPU
    col = xp.clip((uv_map[..., 0] * R).astype(xp.int64), 0, R - 1)
    row = xp.clip(((1.0 - uv_map[..., 1]) * R).astype(xp.int64), 0, R - 1)
    return (cov[row, col] & mask).sum((-2, -1))
