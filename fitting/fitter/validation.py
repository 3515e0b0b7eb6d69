"""Checks of a fit's input: shapes and dtypes on the host at once, data checks (non-finite
pixels, mask size, correspondence count) as device counts that are read with the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base.errors import FittingError, InputError
from ..base.xp import asarray_on
from ..model.flame_model import FlameModel
from ..render.maps import NORMAL_SPACES
from .config import FitConfig, Observation

__all__ = ["DeviceChecks", "validate_observation"]


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


def validate_observation(
    obs: Observation, model: FlameModel, config: FitConfig, xp: Any, checks: DeviceChecks
) -> tuple[Any, Any, Any]:
    """Check the observation; returns (normals, uv, mask) on the fitting device.

    Shapes, dtypes and the model are checked on the host at once. The two checks that
    need the data (non-finite masked pixels, mask size) go through ``checks``: immediate
    on NumPy, read with the result on CuPy (maps already on the device stay there).
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
    uv = asarray_on(xp, uv)
    normals = asarray_on(xp, normals)
    mask = asarray_on(xp, mask)
    if mask.dtype != bool:
        mask = mask > 0.5
    bad = ~(xp.isfinite(uv).all(-1) & xp.isfinite(normals).all(-1)) & mask
    checks.require(
        bad.sum(),
        lambda n: n == 0,
        lambda n: InputError(f"fit: {n} masked pixels have NaN/inf in observation.uv or observation.normals"),
    )
    # UV in [0, 1] (the FLAME layout's range); a raw [-1, 1] network output or 8/16-bit codes
    # put many masked pixels outside it
    out_of_range = ((uv < -0.01) | (uv > 1.01)).any(-1) & mask & ~bad
    checks.require(
        out_of_range.sum(),
        lambda n: n == 0,
        lambda n: InputError(
            f"fit: {n} masked pixels of observation.uv are outside [0, 1]; expected FLAME UV coordinates in [0, 1] "
            "(a raw network output in [-1, 1] needs (x + 1) / 2; 8/16-bit codes need dividing by 255 / 65535)"
        ),
    )
    min_px = config.min_mask_pixels
    checks.require(
        mask.sum(),
        lambda n: n >= min_px,
        lambda n: FittingError(f"fit: observation.mask has {n} pixels, fewer than min_mask_pixels={min_px}"),
    )
    normals = xp.where(mask[..., None], normals, 0.0).astype(xp.float32)
    return normals, xp.where(mask[..., None], uv, 0.0).astype(xp.float32), mask
