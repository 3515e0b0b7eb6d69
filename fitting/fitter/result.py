"""What a fit returns: :class:`FitResult` (host arrays) and its convergence report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base.camera import Camera
from ..model.params import FlameParams

__all__ = ["FitResult"]


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
        converged: False only when the fast solver ran out of iterations or the paper
            schedule ended with a higher energy than it started the fitting stage with.
        stop_reason: ``"tolerance"``, ``"no_decrease"``, ``"max_iterations"`` (fast) or
            ``"schedule"`` / ``"energy_increased"`` (paper).
        n_targets: valid UV correspondences.
        timings: seconds per stage.
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

    @property
    def report(self) -> dict[str, Any]:
        """Convergence report (JSON-ready)."""
        return {
            "iterations": self.iterations,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "energies": self.energies,
            "n_targets": self.n_targets,
            "timings": self.timings,
        }
