"""The ``"paper"`` solver: Adam with Pixel3DMM's learning rates and schedule.

Faithful to the paper and the official tracker: a camera stage (pose and camera only,
UV term only; ``paper_camera_steps`` Adam steps), then a fitting stage over every
variable with the full energy (``paper_steps``), re-rendering every ``rerender_every``
steps. Nothing is read back from the device during the solve: a non-finite energy is
reported when the result is read.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from ..base.errors import FittingError
from ..base.graph import StepGraph
from ..model.lbs import flame_forward, shaped_vertices
from .energy import EnergyTerms, EnergyWeights
from .problem import FitProblem
from .state import FitState, Frame

__all__ = ["CAMERA_GROUPS", "paper_outcome", "solve_paper"]

#: Variables the camera stage optimises (the pose gradient is kept for the global rotation only).
CAMERA_GROUPS = ("pose", "t", "log_f", "pp")


def adam(
    problem: FitProblem, state: FitState, steps: int, groups: tuple[str, ...], weights: EnergyWeights, stage: str
) -> FitState:
    """``steps`` Adam steps on ``groups`` of the energy (the paper's optimiser), recorded as ``stage``.

    A step reads and writes only buffers that live across steps (the variables, the
    moments, a device step counter, the frame, the history rows), so on CuPy it is
    captured once as a CUDA graph and replayed (:class:`~p3dmm.fitting.base.graph.StepGraph`):
    one graph for the steps that re-render and one for those that reuse the frame
    (``rerender_every`` > 1).
    """
    xp = problem.xp
    cfg = problem.config
    if steps <= 0:
        return state
    lrs = {
        "shape": cfg.lr_shape,
        "expr": cfg.lr_expr,
        "pose": cfg.lr_pose,
        "t": cfg.lr_t,
        "log_f": cfg.lr_log_f,
        "pp": cfg.lr_pp,
    }
    state = FitState(*(xp.array(getattr(state, n), copy=True) for n in FitState.NAMES))  # the graph's buffers (0-d arrays, not NumPy scalars: updated in place)
    dt = state.shape.dtype
    m = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    v = {g: xp.zeros_like(getattr(state, g)) for g in groups}
    t = xp.zeros((), dtype=xp.float64)  # the step count, on the device (a graph freezes Python numbers)
    hist = xp.zeros((steps, len(EnergyTerms.FIELDS) + 1), dtype=xp.float64)
    b1, b2, eps = 0.9, 0.999, 1e-8
    frame: list[Frame] = []
    # shape and expression are constant in the camera stage: blend them once
    shaped = shaped_vertices(problem.model, state.params()) if "shape" not in groups else None

    def step(render: bool) -> None:
        fwd = flame_forward(problem.model, state.params(), shaped)
        if render:
            new = problem.render(state, fwd[0])
            if not frame:  # the first step (eager): the frame's buffers
                frame.append(Frame(new.face_id.copy(), new.bary.copy(), new.visible.copy()))
            else:
                f = frame[0]
                f.face_id[...], f.bary[...], f.visible[...] = new.face_id, new.bary, new.visible
        e = problem.energy(state, frame[0], weights, forward=fwd)
        grad = e.grad
        if grad is None:  # pragma: no cover - energy() is called with_grad=True
            raise FittingError("fit: the energy returned no gradient")
        t[...] = t + 1.0
        bc1 = (1.0 - b1**t).astype(dt)
        bc2 = (1.0 - b2**t).astype(dt)
        for g in groups:
            gr = getattr(grad, g)
            if stage == "camera" and g == "pose":
                gr = gr.copy()
                gr[1:] = 0.0
            m[g][...] = b1 * m[g] + (1 - b1) * gr
            v[g][...] = b2 * v[g] + (1 - b2) * gr * gr
            mh = m[g] / bc1
            vh = v[g] / bc2
            x = getattr(state, g)
            x[...] = x - lrs[g] * mh / (xp.sqrt(vh) + eps)
        row = xp.concatenate([e.to_vector(), xp.zeros(1, dtype=xp.float64)])
        hist[t.astype(xp.int64) - 1] = row

    every = max(cfg.rerender_every, 1)
    key = ("adam", stage, cfg, weights, groups, problem.size, problem.normals.space)
    graphs = {
        r: StepGraph(xp, functools.partial(step, r), f"fit: Adam ({stage})", enabled=cfg.cuda_graphs,
                     warm=(problem.model, (*key, r)))  # fmt: skip
        for r in (True, False)
    }
    for it in range(steps):
        graphs[it % every == 0]()
    problem.record_rows(stage, hist, first=0)
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
