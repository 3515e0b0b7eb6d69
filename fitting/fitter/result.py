"""What a fit returns: :class:`FitResult` (host arrays) and its convergence report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..base.camera import Camera
from ..model.params import FlameParams

__all__ = ["FitResult", "fit_quality"]


@dataclass
class FitResult:
    """Result of :func:`fit` (host NumPy arrays).

    Attributes:
        params: fitted FLAME parameters (translation zero: the camera holds it).
        camera: fitted camera at the observation's resolution.
        vertices: ``(V, 3) float32`` posed vertices in the FLAME/world frame.
        neutral_vertices: ``(V, 3)`` identity only (zero expression and pose).
        energies: final per-term energies.
        history: per step dicts (stage, iteration, total, uv, normal, regularizer, active
            counts): every Adam step (stages ``"camera"`` and ``"fit"``); for the fast
            solver (stage ``"fast"``), every re-render (linearisation).
        iterations: solver steps run (Adam steps; for the fast solver, LM passes = tried steps).
        converged: False when the fast solver ran out of iterations, the paper schedule
            ended with a higher energy than it started the fitting stage with, or the fit
            collapsed (see ``issues``).
        stop_reason: ``"tolerance"``, ``"no_decrease"``, ``"max_iterations"`` (fast) or
            ``"schedule"`` / ``"energy_increased"`` (paper).
        n_targets: valid UV correspondences.
        timings: seconds per stage.
        quality: what a pipeline can threshold, each in [0, 1] (see :func:`fit_quality`):
            ``uv_explained`` (fraction of the UV targets whose final reprojection is
            within ``FitConfig.quality_uv_px`` pixels of a 512 px crop and visible),
            ``normal_agreement`` (fraction of the observation-mask pixels, at the render
            resolution, that the fitted head covers with a normal inside the outlier
            cut), ``confidence`` (the geometric mean of those two) and ``uv_in_atlas``
            (fraction of the full-resolution mask pixels whose UV lies on the model's UV
            atlas, :func:`~p3dmm.fitting.fitter.conventions.uv_in_atlas`; about 1 for UV
            in the model's layout, up to the share an occluder covers).
        issues: what is wrong with the result or its input, one sentence each (empty for
            a good fit); a fit with issues about its quality is not ``converged``.
    """

    params: FlameParams
    camera: Camera
    vertices: np.ndarray
    neutral_vertices: np.ndarray
    energies: dict[str, float]
    history: list[dict[str, float]]
    iterations: int
    converged: bool
    stop_reason: str
    n_targets: int
    timings: dict[str, float]
    quality: dict[str, float] = field(default_factory=dict)
    issues: list[str] = field(default_factory=list)

    @property
    def report(self) -> dict[str, Any]:
        """Convergence report (JSON-ready)."""
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "energies": self.energies,
            "n_targets": self.n_targets,
            "quality": self.quality,
            "issues": self.issues,
            "timings": self.timings,
        }


def fit_quality(
    n_explained: int,
    n_targets: int,
    n_normal_active: int,
    n_mask: int,
    min_fraction: float,
    uv_px: float,
    n_in_atlas: int | None = None,
    n_mask_full: int = 0,
    min_in_atlas: float = 0.0,
) -> tuple[dict[str, float], list[str], list[str]]:
    """The :attr:`FitResult.quality` summary and the issues it raises.

    Args:
        n_explained: UV targets reprojected within ``uv_px`` (of a 512 px crop) and visible.
        n_targets: valid UV targets.
        n_normal_active: mask pixels covered with a normal inside the outlier cut.
        n_mask: observation-mask pixels at the render resolution.
        min_fraction: below this ``uv_explained`` or ``normal_agreement`` the fit's terms
            have collapsed (the head explains too little of the maps): an issue.
        uv_px: the tolerance, for the message.
        n_in_atlas: full-resolution mask pixels whose UV lies on the UV atlas (None: not counted).
        n_mask_full: full-resolution mask pixels.
        min_in_atlas: below this ``uv_in_atlas`` the UV map is not in the model's layout: an issue.

    Returns:
        (quality, issues about the fit's quality, issues about the UV layout: a convention
        mistake rather than a poor fit).
    """
    uv = n_explained / max(n_targets, 1)
    normal = n_normal_active / max(n_mask, 1)
    quality = {"uv_explained": uv, "normal_agreement": normal, "confidence": float((uv * normal) ** 0.5)}
    issues = []
    if uv < min_fraction:
        issues.append(
            f"only {100 * uv:.0f}% of the {n_targets} UV targets are explained within {uv_px:g} px "
            f"(at 512 px; need {100 * min_fraction:.0f}%): the fitted head does not match the UV map"
        )
    if normal < min_fraction:
        issues.append(
            f"only {100 * normal:.0f}% of the {n_mask} face-mask pixels are covered by the fitted head with an "
            f"agreeing normal (need {100 * min_fraction:.0f}%): the fitted head does not match the normal map"
        )
    layout = []
    if n_in_atlas is not None:
        on = n_in_atlas / max(n_mask_full, 1)
        quality["uv_in_atlas"] = on
        if on < min_in_atlas:
            layout.append(
                f"only {100 * on:.0f}% of the {n_mask_full} mask pixels carry a UV on the model's UV atlas (need "
                f"{100 * min_in_atlas:.0f}%): observation.uv is not in this model's UV layout (another layout, or "
                "rescaled, e.g. normalised to its own min/max)"
            )
    return quality, issues, layout

