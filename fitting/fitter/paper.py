"""The ``"paper"`` solver: Adam with Pixel3DMM's learning rates and schedule.

Faithful to the paper and the official tracker: a camera stage (pose and camera only,
UV term only; ``paper_camera_steps`` Adam steps), then a fitting stage over every
variable with the full energy (``paper_steps``), re-rendering every ``rerender_every``
steps. Nothing is read back from the device during the solve: a non-finite energy is
reported when the result is read.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..base.errors import FittingError
from ..model.lbs import flame_forward, shaped_vertices
from .energy import EnergyWeights
from .problem import FitProblem
from .state import FitState

__all__ = ["CAMERA_GROUPS", "paper_outcome", "solve_paper"]

#: Variables the camera stage optimises (the pose gradient is kept for the global rotation only).
CAMERA_GROUPS = ("pose", "t", "log_f", "pp")


def adam(
    problem: FitProblem, state: FitState, steps: int, groups: tuple[str, ...], weights: EnergyWeights, stage: str
) -> FitState:
    """``steps`` Adam steps on ``groups`` of the energy (the paper's optimiser), recorded as ``stage``."""
    xp = problem.xp
    cfg = problem.config
    lrs = {
        "shape": cfg.lr_shape,
        "expr": cfg.lr_expr,
        "pose": cfg.lr_pose,
        "t": cfg.lr_t,
        "log_f": cfg.lr_log_f,
        "pp": cfg.lr_pp,
    }
    m = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    v = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    b1, b2, eps = 0.9, 0.999, 1e-8
    frame = None
    # shape and expression are constant in the camera stage: blend them once
    shaped = shaped_vertices(problem.model, state.params()) if "shape" not in groups else None
    for it in range(steps):
        fwd = flame_forward(problem.model, state.params(), shaped)
        if frame is None or it % max(cfg.rerender_every, 1) == 0:
            frame = problem.render(state, fwd[0])
        e = problem.energy(state, frame, weights, forward=fwd)
        grad = e.grad
        if grad is None:  # pragma: no cover - energy() is called with_grad=True
            raise FittingError("fit: the energy returned no gradient")
        for g in groups:
            gr = getattr(grad, g)
            if stage == "camera" and g == "pose":
                gr = gr.copy()
                gr[1:] = 0.0
            m[g] = b1 * m[g] + (1 - b1) * gr
            v[g] = b2 * v[g] + (1 - b2) * gr * gr
            mh = m[g] / (1 - b1 ** (it + 1))
            vh = v[g] / (1 - b2 ** (it + 1))
            setattr(state, g, getattr(state, g) - lrs[g] * mh / (xp.sqrt(vh) + eps))
        problem.record(stage, it, e)
    return state


def solve_paper(problem: FitProblem, state: FitState) -> tuple[FitState, int]:
    """Run the camera stage, then the fitting stage (known camera values stay fixed).

    Returns:
        (the final state, the number of Adam steps run).
    """
    cfg = problem.config
    fixed = {"log_f"} if cfg.focal is not None else set()
    if cfg.principal_point is not None:
        fixed.add("pp")
    camera_groups = tuple(g for g in CAMERA_GROUPS if g not in fixed)
    all_groups = tuple(g for g in FitState.NAMES if g not in fixed)
    state = adam(problem, state, cfg.paper_camera_steps, camera_groups, replace(cfg.weights, normal=0.0), "camera")
    state = adam(problem, state, cfg.paper_steps, all_groups, cfg.weights, "fit")
    return state, cfg.paper_camera_steps + cfg.paper_steps


def paper_outcome(history: list[dict[str, Any]]) -> tuple[bool, str]:
    """``(converged, stop_reason)`` of a paper solve from its host history.

    ``"schedule"`` when the fitting stage ended no higher than it started (or ran no
    steps), else ``"energy_increased"`` (not converged).
    """
    totals = [h["total"] for h in history if h["stage"] == "fit"]
    converged = not totals or totals[-1] <= totals[0]
    return converged, "schedule" if converged else "energy_increased"
