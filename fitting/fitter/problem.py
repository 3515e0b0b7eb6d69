"""The problem both solvers share: :class:`FitProblem` (per-image constants, render, energy,
history) and :func:`prepare`, which builds it from an observation.

:func:`prepare` runs steps 1-3 of a fit:

1. validation of the maps (shape, dtype, finiteness, mask size) and of the model (UVs);
2. UV correspondences, once: every valid FLAME vertex (``config.uv_regions``, eyeballs
   excluded) gets the pixel whose predicted UV is nearest its template UV
   (:func:`p3dmm.fitting.fitter.uv_nn.uv_targets`), kept if closer than ``delta_uv_sq``;
3. the rigid initialisation from those correspondences alone (:mod:`.init`); its
   non-rigid UV stage, which runs the Levenberg-Marquardt loop, follows in
   :func:`p3dmm.fitting.fit` (:func:`.fast.init_with_uv`).

The solvers (:mod:`.paper`, :mod:`.fast`) are peers over a :class:`FitProblem`;
:func:`p3dmm.fitting.fit` ties them together. Arrays stay on the fitting device (NumPy or
CuPy) throughout.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..base.errors import FittingError, P3DMMError
from ..base.xp import asarray_on, constant, get_array_module
from ..model.flame_model import FlameModel
from ..model.lbs import flame_forward
from ..render.raster import rasterize
from .config import FitConfig, Observation
from .energy import EnergyTerms, EnergyWeights, evaluate_energy
from .init import init_rigid_batch
from .state import FitState, Frame, NormalTargets, UVTargets
from .uv_nn import uv_targets
from .validation import DeviceChecks, atlas_pixels, check_observation, map_checks, require_maps, stack_maps

__all__ = [
    "FitProblem",
    "alternative_uv_readings",
    "camera_start",
    "downsample_normals",
    "initial_states",
    "model_on",
    "prepare",
    "prepare_problem",
    "prepare_problems",
    "render_frame",
    "uv_vertex_ids",
]


def uv_vertex_ids(model: FlameModel, regions: tuple[str, ...]) -> np.ndarray:
    """Vertices that get UV targets: those of ``regions`` (all when the model has none), no eyeballs."""
    ids = [np.asarray(model.masks[r]) for r in regions if r in model.masks]
    if not ids:
        # no region masks: every vertex that is not an eyeball vertex
        eyes = [np.asarray(model.masks[r]) for r in ("left_eyeball", "right_eyeball") if r in model.masks]
        keep = np.ones(model.n_vertices, bool)
        for e in eyes:
            keep[e] = False
        return np.nonzero(keep)[0]
    out = np.unique(np.concatenate(ids))
    for r in ("left_eyeball", "right_eyeball"):
        if r in model.masks:
            out = np.setdiff1d(out, np.asarray(model.masks[r]))
    return out


def alternative_uv_readings(uv_map: Any, mask: Any) -> dict[str, Any]:
    """The usual mistakes undone: ``what the map looks like it has -> the map read the other way``."""
    xp = get_array_module(uv_map)
    u, v = uv_map[..., 0], uv_map[..., 1]
    flip = lambda a: xp.where(mask, 1.0 - a, 0.0)  # noqa: E731 - off-mask pixels stay 0
    return {
        "has its u and v channels swapped (use uv[..., ::-1])": xp.stack([v, u], -1).astype(xp.float32),
        "has a flipped v axis (FLAME's layout has v up: use 1 - v)": xp.stack([u, flip(v)], -1).astype(xp.float32),
        "has swapped channels and a flipped v axis": xp.stack([v, flip(u)], -1).astype(xp.float32),
    }


def _correspondence_hint(query: Any, uv_map: Any, mask: Any, delta_uv_sq: float, n: int) -> str:
    """A sentence naming a reading of the UV map that finds far more correspondences, or ''."""
    best, what = n, ""
    for reading, alt in alternative_uv_readings(uv_map, mask).items():
        k = int(uv_targets(query, alt, mask, delta_uv_sq)[1].sum())
        if k > max(2 * best, 20):
            best, what = k, reading
    return f"; observation.uv looks like it {what}: read that way it gives {best} correspondences" if what else ""


def downsample_normals(normals: Any, mask: Any, size: int) -> tuple[Any, Any]:
    """Square ``(..., S, S)`` maps (any leading batch axes) to ``size x size``: area average
    (majority mask) when S is a multiple of ``size``, nearest pixel otherwise."""
    xp = get_array_module(normals)
    lead, (H, W) = mask.shape[:-2], mask.shape[-2:]
    s = size / max(H, W)
    if H % size == 0 and W % size == 0 and H == W:
        k = H // size
        n = (normals * mask[..., None]).reshape(*lead, size, k, size, k, 3).sum((-4, -2))
        m = mask.reshape(*lead, size, k, size, k).mean((-3, -1)) > 0.5
    else:
        rows = xp.clip(((xp.arange(size) + 0.5) / s - 0.5).round().astype(xp.int64), 0, H - 1)
        cols = xp.clip(((xp.arange(size) + 0.5) / s - 0.5).round().astype(xp.int64), 0, W - 1)
        n = normals[..., rows[:, None], cols[None, :], :]
        m = mask[..., rows[:, None], cols[None, :]]
    norm = xp.sqrt((n * n).sum(-1, keepdims=True))
    m = m & (norm[..., 0] > 1e-6)
    return (n / xp.maximum(norm, 1e-12)).astype(normals.dtype), m


def render_frame(
    model: FlameModel,
    state: FitState,
    uv: UVTargets,
    image_size: tuple[int, int],
    render_size: int,
    tol: float,
    verts: Any = None,
) -> Frame:
    """Rasterize ``state`` at ``render_size`` and test the UV targets' visibility.

    Args:
        image_size: ``(H, W)`` of the observation (the state's camera is for it).
        render_size: side of the square render; the camera is scaled to it.
        tol: depth slack (m): a target vertex is visible unless it lies more than this
            behind the rendered surface at its pixel.
        verts: optional posed vertices of ``state``.
    """
    xp = get_array_module(state.shape)
    if verts is None:
        verts = flame_forward(model, state.params())[0]
    H, W = image_size
    cam = state.camera(W, H).scaled(render_size, render_size)
    Xc = cam.to_camera(verts)
    frags = rasterize(Xc.astype(xp.float32), model.faces, cam)
    # visibility: a target vertex is visible if it is not behind the rendered surface
    Xt = Xc[uv.vertex_ids]
    px = cam.project_camera(Xt)
    size = render_size
    col = xp.clip(xp.rint(px[:, 0]).astype(xp.int64), 0, size - 1)
    row = xp.clip(xp.rint(px[:, 1]).astype(xp.int64), 0, size - 1)
    inside = (px[:, 0] > -0.5) & (px[:, 0] < size - 0.5) & (px[:, 1] > -0.5) & (px[:, 1] < size - 0.5)
    d = frags.depth[row, col]
    visible = inside & (Xt[:, 2] > 0) & ((frags.face_id[row, col] < 0) | (Xt[:, 2] <= d + tol))
    return Frame(face_id=frags.face_id, bary=frags.bary.astype(Xc.dtype), visible=visible)


class FitProblem:
    """Per-image constants shared by the solvers, and what they do with them.

    Attributes:
        model: the FLAME model on the fitting device.
        config: the fit's configuration.
        uv: the UV targets.
        normals: the observed normals at the render resolution.
        size: ``(H, W)`` of the observation.
        shape_prior, focal_prior, pp_prior: the regulariser's priors.
        xp: the fitting device's array module.
        checks: the input checks pending on the device (:class:`DeviceChecks`).
        host_faces: the model's faces on the host (sparse incidence matrices are built
            from them without reading the device).
        maps: the validated observation ``(normals, uv, mask)`` at its own resolution
            (used to diagnose convention mistakes), or None.
        n_in_atlas: device count of the mask pixels whose UV lies on the model's UV atlas
            (:func:`~.validation.atlas_pixels`), or None (counted from ``maps`` when asked).
        n_mask_full: device count of the mask pixels of ``maps``, or None.
        history: one entry per recorded step (stage, iteration, device vector).
        n_renders: renders so far.
        evaluated: ``(state, posed vertices, frame)`` of the state a solver returned last,
            when it had them (the fast solver's best linearisation), or None; the result
            reuses them when its state is that one.
    """

    def __init__(
        self,
        model: FlameModel,
        config: FitConfig,
        uv: UVTargets,
        normals: NormalTargets,
        size: tuple[int, int],
        shape_prior: Any,
        focal_prior: float,
        pp_prior: Any,
        checks: DeviceChecks | None = None,
        host_faces: Any = None,
        maps: tuple[Any, Any, Any] | None = None,
        n_in_atlas: Any = None,
        n_mask_full: Any = None,
    ) -> None:
        self.model = model
        self.config = config
        self.uv = uv
        self.normals = normals
        self.size = size
        self.shape_prior = shape_prior
        self.focal_prior = focal_prior
        self.pp_prior = pp_prior
        self.xp = get_array_module(model.v_template)
        self.history: list[tuple[str, int, Any]] = []
        self.n_renders = 0
        self.evaluated: tuple[FitState, Any, Frame] | None = None
        self.checks = checks if checks is not None else DeviceChecks(self.xp)
        self.host_faces = host_faces if host_faces is not None else model.faces
        self.maps = maps
        self.n_in_atlas = n_in_atlas
        self.n_mask_full = n_mask_full

    @property
    def render_size(self) -> int:
        """Side of the normal render (the normal targets' resolution)."""
        return int(self.normals.mask.shape[0])

    def render(self, state: FitState, verts: Any = None) -> Frame:
        """Rasterize ``state`` (:func:`render_frame` at :attr:`render_size`)."""
        self.n_renders += 1
        return render_frame(
            self.model, state, self.uv, self.size, self.render_size, self.config.visibility_tolerance, verts
        )

    def energy(
        self,
        state: FitState,
        frame: Frame,
        weights: EnergyWeights | None = None,
        with_grad: bool = True,
        normals: NormalTargets | None = None,
        forward: tuple[Any, Any] | None = None,
    ) -> EnergyTerms:
        """:func:`evaluate_energy` with this problem's targets and priors."""
        return evaluate_energy(
            self.model,
            state,
            self.uv,
            normals if normals is not None else self.normals,
            frame,
            weights or self.config.weights,
            self.size,
            shape_prior=self.shape_prior,
            focal_prior=self.focal_prior,
            pp_prior=self.pp_prior,
            with_grad=with_grad,
            forward=forward,
        )

    def record(self, stage: str, it: int, e: EnergyTerms, skip: Any = None) -> None:
        """Keep the step's energy terms as one device vector (read when the result is built).

        Args:
            skip: optional 0-d device bool; True drops the entry from the history (the
                fast solver's passes after its stop, or re-linearisations of an unchanged
                state, which the GPU runs because it does not read the device). Entries
                recorded with ``skip`` are numbered consecutively per stage.
        """
        v = e.to_vector()
        flag = self.xp.zeros((1,), dtype=v.dtype) if skip is None else self.xp.asarray(skip, dtype=v.dtype).reshape(1)
        self.history.append((stage, it if skip is None else -1, self.xp.concatenate([v, flag])[None]))

    def record_rows(self, stage: str, rows: Any, first: int = -1) -> None:
        """Keep a solver's per-step rows at once: ``(steps, 6)`` device array of
        :meth:`EnergyTerms.to_vector` values and a skip flag each; the kept rows are
        numbered ``first, first + 1, ...`` (default: consecutively per stage from 1)."""
        self.history.append((stage, first, rows))

    def history_array(self) -> Any:
        """``(steps, 6)`` device array: :meth:`EnergyTerms.to_vector` rows and the skip flag."""
        if not self.history:
            return self.xp.zeros((0, len(EnergyTerms.FIELDS) + 1))
        return self.xp.concatenate([v for _, _, v in self.history])

    def history_dicts(self, values: np.ndarray) -> list[dict[str, Any]]:
        """Per-step dicts from ``values``, the host copy of :meth:`history_array`."""
        out: list[dict[str, Any]] = []
        count: dict[str, int] = {}
        k = 0
        for st, it, block in self.history:
            j = 0
            for v in values[k : k + block.shape[0]]:
                if v[-1]:
                    continue
                n = count[st] = count.get(st, 0) + 1
                out.append({"stage": st, "iteration": it + j if it >= 0 else n, **EnergyTerms.dict_from_vector(v[:-1])})
                j += 1
            k += block.shape[0]
        return out


_MODEL_CACHE: "weakref.WeakKeyDictionary[FlameModel, FlameModel]" = weakref.WeakKeyDictionary()


def model_on(model: FlameModel, xp: ModuleType) -> FlameModel:
    """The model on ``xp``'s device, memoised per model so repeated GPU fits don't copy it again."""
    if xp is np:
        return model
    if model not in _MODEL_CACHE:
        _MODEL_CACHE[model] = model.to(xp)
    return _MODEL_CACHE[model]


def prepare(
    observation: Observation, model: FlameModel, config: FitConfig, xp: ModuleType
) -> tuple[FitProblem, FitState, dict[str, float]]:
    """Validation, UV correspondences, normal targets and the initial state of a fit.

    Args:
        observation: the maps of one image.
        model: a FLAME model with a UV layout (host arrays).
        config: the fit's configuration.
        xp: the fitting device's array module (:func:`~p3dmm.fitting.base.xp.resolve_device`).

    Returns:
        (the problem shared by the solvers, initial state, timings). On CuPy the checks
        that need the data are pending in ``problem.checks`` (see :class:`DeviceChecks`);
        call ``problem.checks.raise_failed()`` before using a result.
    """
    problem, timings = prepare_problem(observation, model, config, xp)
    t0 = time.perf_counter()
    state = initial_states([problem])[0]
    timings["init"] = time.perf_counter() - t0
    return problem, state, timings


def camera_start(config: FitConfig, size: tuple[int, int]) -> tuple[float, np.ndarray]:
    """The focal length and principal point a fit of an ``(H, W)`` image starts from (and
    the regulariser pulls towards): the configured ones, else ``2 max(H, W)`` and the centre."""
    H, W = size
    f0 = float(config.focal or config.focal_init or 2.0 * max(H, W))
    pp0 = np.array(config.principal_point if config.principal_point is not None else [(W - 1) / 2, (H - 1) / 2])
    return f0, pp0


def prepare_problem(
    observation: Observation, model: FlameModel, config: FitConfig, xp: ModuleType
) -> tuple[FitProblem, dict[str, float]]:
    """Steps 1-2 of :func:`prepare`: validation, UV correspondences and normal targets
    (the initial state follows from :func:`initial_states`)."""
    out = prepare_problems([observation], model, config, xp)[0]
    if isinstance(out, P3DMMError):
        raise out
    return out


def prepare_problems(
    observations: Sequence[Observation], model: FlameModel, config: FitConfig, xp: ModuleType
) -> list[tuple[FitProblem, dict[str, float]] | P3DMMError]:
    """:func:`prepare_problem` of several images: per image its problem and timings, or the
    error of a bad image (the others go on).

    The host checks run per image; the images of each map size are then stacked, and their
    data checks, masking, UV-atlas counts, normal downsampling and UV correspondence
    search (:func:`~.uv_nn.uv_targets` of the stack: on CuPy one set of launches) run
    once for the stack.
    """
    out: list[Any] = [None] * len(observations)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, obs in enumerate(observations):
        try:
            groups.setdefault(check_observation(obs, model), []).append(i)
        except P3DMMError as e:
            out[i] = e
    if not groups:
        return out
    dmodel = model_on(model, xp)
    dtype = dmodel.v_template.dtype
    ids = uv_vertex_ids(model, config.uv_regions)
    # the same for every image of the model and configuration: uploaded once per process
    query = constant(xp, model.uv.vertex_uv[ids], np.float32)  # type: ignore[union-attr]
    ids_d = constant(xp, ids, ids.dtype)
    min_t, radius = config.min_targets, math.sqrt(config.delta_uv_sq)
    for (H, W), idx in groups.items():
        t0 = time.perf_counter()
        S = max(H, W)
        uv_s, normals_s, mask_s = stack_maps([observations[i] for i in idx], xp)
        counts, normals_s, uv_s = map_checks(uv_s, normals_s, mask_s)
        in_atlas = atlas_pixels(dmodel.uv, uv_s, mask_s)  # type: ignore[arg-type]
        n_s, m_s = downsample_normals(normals_s, mask_s, min(config.render_size, S))
        n_s = n_s.astype(dtype)
        f0, pp0 = camera_start(config, (H, W))
        pp0_d = constant(xp, pp0, dtype)
        # ------------------------------------------------------------ correspondences
        pix_s, valid_s = uv_targets(query, uv_s, mask_s, config.delta_uv_sq)  # one search launch for the stack
        # all queried vertices keep their row (fixed shapes on the device); `valid` masks them
        pixels_s = xp.where(valid_s[..., None], pix_s, 0.0).astype(dtype)
        n_valid_s = valid_s.sum(axis=1)
        n_valid_s = n_valid_s.tolist() if xp is np else n_valid_s.astype(dtype)
        t_group = (time.perf_counter() - t0) / len(idx)
        for j, i in enumerate(idx):
            t0 = time.perf_counter()
            obs = observations[i]
            checks = DeviceChecks(xp)
            uv_d, mask_d = uv_s[j], mask_s[j]
            n_valid = n_valid_s[j]
            try:
                require_maps(checks, counts[:, j], config)
                checks.require(
                    n_valid,
                    lambda n: n >= min_t,
                    lambda n, uv_d=uv_d, mask_d=mask_d: FittingError(
                        f"fit: only {n} FLAME vertices found a pixel with UV within sqrt(delta_uv_sq)={radius:.4f} "
                        f"(need {min_t}); the UV map does not match the model's UV layout or the mask is wrong"
                        + _correspondence_hint(query, uv_d, mask_d, config.delta_uv_sq, n)
                    ),
                )
            except P3DMMError as e:
                out[i] = e
                continue
            uvt = UVTargets(vertex_ids=ids_d, pixels=pixels_s[j], n_targets=n_valid, valid=valid_s[j])
            ntg = NormalTargets(normals=n_s[j], mask=m_s[j], space=obs.normal_space)
            prior = None if obs.shape_prior is None else asarray_on(xp, obs.shape_prior, dtype)
            problem = FitProblem(
                dmodel,
                config,
                uvt,
                ntg,
                (H, W),
                prior,
                math.log(f0),
                pp0_d,
                checks=checks,
                host_faces=model.faces,
                maps=(normals_s[j], uv_d, mask_d),
                n_in_atlas=in_atlas[j],
                n_mask_full=counts[2, j],
            )
            out[i] = (problem, {"correspondences": t_group + time.perf_counter() - t0})
    return out


def initial_states(problems: list[FitProblem]) -> list[FitState]:
    """Step 3 of :func:`prepare` for several problems (one model and configuration): the
    rigid initialisation from the UV correspondences, batched over the images of each size."""
    if not problems:
        return []
    config = problems[0].config
    out: list[Any] = [None] * len(problems)
    sizes = sorted({p.size for p in problems})
    for size in sizes:
        idx = [i for i, p in enumerate(problems) if p.size == size]
        f0, pp0 = camera_start(config, size)
        states = init_rigid_batch(
            problems[idx[0]].model, [problems[i].uv for i in idx], f0, pp0, size, config.weights,
            fix_focal=config.focal is not None, graphs=config.cuda_graphs,
        )  # fmt: skip
        for i, st in zip(idx, states):
            out[i] = st
    return out
