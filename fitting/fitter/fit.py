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
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..base.camera import FLAME_TO_OPENCV, Camera
from ..base.errors import ConventionWarning, FittingError, FitQualityWarning, InputError, P3DMMError
from ..base.xp import download, download_all, resolve_device
from ..model.flame_model import FlameModel
from ..model.lbs import flame_forward
from ..model.params import FlameParams
from .config import FitConfig, Observation
from .conventions import check_conventions, uv_in_atlas
from .energy import EnergyTerms
from .fast import STOP_REASONS, init_with_uv, init_with_uv_batch, solve_fast, solve_fast_batch
from .paper import paper_outcome, solve_paper
from .problem import FitProblem, initial_states, prepare, prepare_problems
from .state import FitState
from .result import FitResult, fit_quality

__all__ = ["fit", "fit_batch"]


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
    t0 = time.perf_counter()
    init_code: Any = xp.zeros((), dtype=xp.int64)
    if config.init_uv_iterations > 0:
        state, init_code = init_with_uv(problem, state)
    timings["init"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if config.solver == "paper":
        state, _ = solve_paper(problem, state)
    else:
        state, passes, code = solve_fast(problem, state)
        extra["passes"], extra["code"] = passes, code
    timings["solve"] = time.perf_counter() - t0
    host = download(xp, **_result_arrays(problem, state, init_code, extra))
    return _result(problem, state, host, model, timings, t_start)


def fit_batch(
    observations: Sequence[Observation],
    model: FlameModel,
    config: FitConfig | None = None,
    device: str | ModuleType = "cpu",
    errors: str = "raise",
) -> list[Any]:
    """:func:`fit` of several images with one set of launches per solver pass.

    The images share the model and the configuration. The maps of same-size images are
    checked, masked, downsampled and searched for their UV correspondences as one stack
    (:func:`~.problem.prepare_problems`); the fast solver and the
    initialisation's UV stage then run on all of them at once
    (:func:`~.fast.levenberg_marquardt`: stacked variables, one batched solve of the B
    damped systems, per-image damping, acceptance and stopping; a stopped image is
    masked out while the others go on), which on CuPy is one CUDA-graph launch per pass
    for the whole batch; the rigid initialisation is batched too, each result reuses
    the solver's render of its best state, and the results of the whole batch come back
    in one transfer. Each result equals the image's own
    :func:`fit` up to the batched solver's round-off. The paper solver runs the images
    one after the other. On NumPy, which has no launch overhead to share, each image is
    fitted from start to end before the next (:func:`fit`; measured: preparing the whole
    batch first and solving it image by image made each solve 25 % slower, through the
    allocator's handling of the large temporaries while the batch's maps stay alive).

    Args:
        observations: the maps of each image (any mix of sizes is fine on the CPU; on the
            GPU same-size maps share the most work).
        model, config, device: as :func:`fit`.
        errors: ``"raise"`` (the first bad image raises) or ``"return"`` (a bad image's
            slot holds its :class:`~p3dmm.fitting.base.errors.P3DMMError`; the rest go on).

    Returns:
        One :class:`FitResult` (or error, with ``errors="return"``) per observation, in order.
    """
    if errors not in ("raise", "return"):
        raise InputError(f"fit_batch: errors={errors!r}: expected 'raise' or 'return'")
    config = config or FitConfig()
    xp = resolve_device(device)
    out: list[Any] = [None] * len(observations)

    def failed(i: int, e: P3DMMError) -> None:
        """A bad image: raise (``errors="raise"``) or keep its error in its slot."""
        e.add_note(f"fit_batch: observations[{i}]")
        if errors == "raise":
            raise e
        out[i] = e

    if xp is np and _CPU_CHUNK <= 1:
        for i, obs in enumerate(observations):
            try:
                out[i] = fit(obs, model, config, xp)
            except P3DMMError as e:
                failed(i, e)
        return out
    live: list[tuple[int, Any, dict[str, float]]] = []
    for i, prepared in enumerate(prepare_problems(observations, model, config, xp)):
        if isinstance(prepared, P3DMMError):
            failed(i, prepared)
        else:
            live.append((i, *prepared))
    if not live:
        return out
    problems = [it[1] for it in live]
    B = len(live)
    t0 = time.perf_counter()
    starts = initial_states(problems)  # the rigid initialisation, batched per image size
    t_rigid = (time.perf_counter() - t0) / B
    states: list[Any] = []
    init_codes: list[Any] = []
    extras: list[dict[str, Any]] = []
    t_init = t_solve = 0.0
    chunk = B if xp is not np else _CPU_CHUNK  # the batched path on NumPy: the tests
    for c0 in range(0, B, chunk):
        part = problems[c0 : c0 + chunk]
        st = starts[c0 : c0 + chunk]
        t0 = time.perf_counter()
        codes0: Any = xp.zeros(len(part), dtype=xp.int64)
        if config.init_uv_iterations > 0:
            st, codes0 = init_with_uv_batch(part, st)
        t_init += time.perf_counter() - t0
        t0 = time.perf_counter()
        if config.solver == "paper":
            st = [solve_paper(p, s)[0] for p, s in zip(part, st)]
            extras += [{} for _ in part]
        else:
            st, passes, codes = solve_fast_batch(part, st)
            extras += [{"passes": passes[b], "code": codes[b]} for b in range(len(part))]
        t_solve += time.perf_counter() - t0
        states += st
        init_codes += [codes0[b] for b in range(len(part))]
    t_init, t_solve = t_init / B, t_solve / B
    # the results' device work per image, then one transfer for the whole batch
    hosts = download_all(xp, [_result_arrays(p, states[b], init_codes[b], extras[b]) for b, p in enumerate(problems)])
    for b, (i, problem, timings) in enumerate(live):
        timings["init"] = t_rigid + t_init
        timings["solve"] = t_solve
        # "total": the image's own preparation and result plus its share of the batched work
        t_start = time.perf_counter() - sum(timings.values())
        try:
            out[i] = _result(problem, states[b], hosts[b], model, timings, t_start)
        except P3DMMError as e:
            failed(i, e)
    return out


#: Images per batched solve on NumPy; 1: :func:`fit` of each image in turn (see
#: :func:`fit_batch`; the tests raise it to run the batched path on the CPU).
_CPU_CHUNK = 1


def _result_arrays(problem: FitProblem, state: FitState, init_code: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The device arrays a solved problem's result is built from (read back in one transfer,
    the first read of the fit on CuPy): the deferred input checks, the energies, the state
    and the vertices."""
    config = problem.config
    ev = problem.evaluated
    if ev is not None and ev[0] is state:  # the solver's own forward pass and render of this state
        verts_d, frame = ev[1], ev[2]
    else:
        verts_d = flame_forward(problem.model, state.params())[0]
        frame = problem.render(state, verts_d)
    final = problem.energy(state, frame, with_grad=False, forward=(verts_d, None))
    res = final.uv_residuals
    assert res is not None
    explained = res.active & (res.rho < config.quality_uv_px / 512.0)
    return dict(
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
        n_mask_full=problem.n_mask_full if problem.n_mask_full is not None else 0,
        init_code=init_code,
        **extra,
    )


def _result(
    problem: FitProblem,
    state: FitState,
    host: dict[str, np.ndarray],
    model: FlameModel,
    timings: dict[str, float],
    t_start: float,
) -> FitResult:
    """The result of a solved problem from the host copy of :func:`_result_arrays`: the checks, the quality."""
    config = problem.config
    H, W = problem.size
    problem.checks.raise_failed(host["checks"])
    history = problem.history_dicts(host["history"])
    if STOP_REASONS[int(host["init_code"])] == "non_finite":
        first = next((h for h in history if not math.isfinite(h["total"])), {})
        raise FittingError(f"fit: non-finite energy in the UV initialisation ({first}); check the observation maps")
    iterations = config.paper_camera_steps + config.paper_steps
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
