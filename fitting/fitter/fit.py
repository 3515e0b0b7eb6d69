"""``fit(observation, model, config, device)``: FLAME and a camera from predicted normal and UV maps.

Per image: :func:`~.problem.prepare` (validation, UV correspondences, initialisation from
them), then one solver over shape, expression, pose and camera: ``"fast"``
(:mod:`.fast`, Levenberg-Marquardt with IRLS weights for the robust terms, analytic
Jacobians; the default) or ``"paper"`` (:mod:`.paper`, Adam with the paper's learning
rates and schedule, faithful to Pixel3DMM). Arrays stay on the fitting device (NumPy or
CuPy) throughout; everything the result needs is copied to the host in one transfer.
"""

from __future__ import annotations

import math
import time
import warnings
from types import ModuleType
from typing import Any

import numpy as np

from ..base.camera import FLAME_TO_OPENCV, Camera
from ..base.errors import ConventionWarning, FittingError, FitQualityWarning
from ..base.xp import download, resolve_device
from ..model.flame_model import FlameModel
from ..model.lbs import flame_forward
from ..model.params import FlameParams
from .config import FitConfig, Observation
from .conventions import check_conventions, uv_in_atlas
from .energy import EnergyTerms, uv_residuals
from .fast import STOP_REASONS, init_with_uv, solve_fast
from .paper import paper_outcome, solve_paper
from .problem import prepare
from .result import FitResult, fit_quality

__all__ = ["fit"]


def fit(
    observation: Observation,
    model: FlameModel,
    config: FitConfig | None = None,
    device: str | ModuleType = "cpu",
) -> FitResult:
    """Fit FLAME shape, expression, pose and a camera to predicted normal/UV maps.

    Args:
        observation: the maps of one image (host or device arrays).
        model: a FLAME model with a UV layout (host arrays; moved to ``device``).
        config: solver and energy settings (default: fast solver, paper weights).
        device: ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy), or the array module itself.

    Returns:
        :class:`FitResult` on the host.

    Raises:
        InputError: maps of the wrong shape/dtype, NaN/inf inside the mask, an unknown device.
        FittingError: mask too small, model without UVs, too few UV correspondences,
            or a non-finite energy during the solve.
        BackendUnavailableError: ``device="cuda"`` without CuPy or a CUDA device.
    """
    config = config or FitConfig()
    t_start = time.perf_counter()
    xp = resolve_device(device)
    problem, state, timings = prepare(observation, model, config, xp)
    H, W = problem.size
    t0 = time.perf_counter()
    init_code: Any = xp.zeros((), dtype=xp.int64)
    if config.init_uv_iterations > 0:
        state, init_code = init_with_uv(problem, state)
    timings["init"] += time.perf_counter() - t0

    # ---------------------------------------------------------------- solve
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if config.solver == "paper":
        state, iterations = solve_paper(problem, state)
    else:
        state, passes, code = solve_fast(problem, state)
        extra["passes"], extra["code"] = passes, code
    timings["solve"] = time.perf_counter() - t0

    # ---------------------------------------------------------------- result
    # everything the result needs, read back in one transfer (the first read of the fit
    # on CuPy): the deferred input checks, the energies, the state and the vertices
    verts_d = flame_forward(problem.model, state.params())[0]
    frame = problem.render(state, verts_d)
    final = problem.energy(state, frame, with_grad=False)
    res = uv_residuals(state, verts_d, problem.uv, frame, config.weights, problem.size)
    explained = res.active & (res.rho < config.quality_uv_px / 512.0)
    host = download(
        xp,
        checks=problem.checks.counts(),
        final=final.to_vector(),
        history=problem.history_array(),
        shape=state.shape,
        expr=state.expr,
        pose=state.pose,
        t=state.t,
        log_f=state.log_f,
        pp=state.pp,
        verts=verts_d,
        n_targets=problem.uv.n_targets,
        n_explained=explained.sum(),
        n_mask=problem.normals.n_mask,
        n_in_atlas=uv_in_atlas(problem),
        n_mask_full=problem.maps[2].sum() if problem.maps is not None else 0,
        init_code=init_code,
        **extra,
    )
    problem.checks.raise_failed(host["checks"])
    history = problem.history_dicts(host["history"])
    if STOP_REASONS[int(host["init_code"])] == "non_finite":
        first = next((h for h in history if not math.isfinite(h["total"])), {})
        raise FittingError(f"fit: non-finite energy in the UV initialisation ({first}); check the observation maps")
    if config.solver == "fast":
        iterations = int(host["passes"])
        stop_reason = STOP_REASONS[int(host["code"])]
        if stop_reason == "non_finite":
            first = next((h for h in history if not math.isfinite(h["total"])), {})
            raise FittingError(
                f"fit: non-finite energy at fast-solver iteration {first.get('iteration', '?')} ({first}); "
                "check the observation maps"
            )
        converged = stop_reason != "max_iterations"
    energies = EnergyTerms.dict_from_vector(host["final"])
    if not math.isfinite(energies["total"]):
        bad = next((h for h in history if not math.isfinite(h["total"])), None)
        where = f" first in the {bad['stage']} stage at step {bad['iteration']}" if bad else ""
        raise FittingError(f"fit: the energy became non-finite{where} ({energies}); check the observation maps")
    if config.solver == "paper":
        converged, stop_reason = paper_outcome(history)
    params_h = FlameParams(
        shape=host["shape"].astype(np.float32),
        expr=host["expr"].astype(np.float32),
        pose=host["pose"].astype(np.float32),
        transl=np.zeros(3, np.float32),
    )
    camera_h = Camera(
        focal=np.float32(np.exp(host["log_f"])),
        principal=host["pp"].astype(np.float32),
        R=FLAME_TO_OPENCV.astype(np.float32),
        t=host["t"].astype(np.float32),
        width=W,
        height=H,
    )
    quality, issues, layout = fit_quality(
        int(host["n_explained"]),
        int(host["n_targets"]),
        int(energies["n_normal_active"]),
        int(host["n_mask"]),
        config.quality_min,
        config.quality_uv_px,
        n_in_atlas=int(host["n_in_atlas"]),
        n_mask_full=int(host["n_mask_full"]),
        min_in_atlas=config.quality_atlas_min,
    )
    if issues:
        if config.check_conventions:
            check_conventions(problem, state)  # raises an InputError naming a clear convention mistake
        warnings.warn("fit: " + "; ".join(issues), FitQualityWarning, stacklevel=2)
    if layout:
        warnings.warn("fit: " + "; ".join(layout), ConventionWarning, stacklevel=2)
    issues += layout
    if issues:
        converged = False
    neutral = model.neutral_vertices(params_h.astype(np, model.dtype)).astype(np.float32)
    timings["total"] = time.perf_counter() - t_start
    return FitResult(
        params=params_h,
        camera=camera_h,
        vertices=host["verts"].astype(np.float32),
        neutral_vertices=neutral,
        energies=energies,
        history=history,
        iterations=iterations,
        converged=converged,
        stop_reason=stop_reason,
        n_targets=int(host["n_targets"]),
        timings=timings,
        quality=quality,
        issues=issues,
    )
