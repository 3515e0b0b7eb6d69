"""Convention mistakes in the observation, diagnosed from what the data says.

A collapsed fit (one explaining less than ``FitConfig.quality_min`` of its UV targets or
normals, :func:`~.result.fit_quality`) is checked against the usual
mistakes: normals with a flipped sign or in the other space (head vs camera), UV with its
channels swapped or its v axis flipped. Each alternative reading of the maps is scored the
way the fit is: normals by the fraction of mask pixels the fitted head explains within the
outlier cut (at the fitted state: the UV term alone places the head), UV by the fraction of
targets a rigid initialisation explains within the initialisation's widened UV cap (new correspondences for each
reading). An alternative that explains the maps clearly better (more than half of them and
at least twice as much as the declared reading) is reported as a specific
:class:`~p3dmm.fitting.base.errors.InputError`: the result of such a fit is not returned.
UV outside [0, 1] is caught earlier, by the input validation.

Every fit also counts the mask pixels whose UV lies on the model's UV atlas
(:func:`uv_in_atlas`; a device reduction, read back with the result): UV in another
layout, or rescaled to its own min/max, reads off the atlas and is reported as an issue
with a :class:`~p3dmm.fitting.base.errors.ConventionWarning`. A small affine rescale
inside the atlas (``0.9 u + 0.05``) cannot be told from the data: the fit deforms the head
to match it, its error is that of a predictor's UV error of the same size, and nothing
flags it.

This runs only after a collapsed fit, after its result has been read: good fits pay
nothing for it, and on the GPU it is the one place a fit reads the device again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ..base.errors import InputError
from ..base.xp import asarray_on
from ..model.lbs import flame_forward
from .energy import normal_residuals, output_rotation, uv_residuals
from .init import init_rigid
from .problem import FitProblem, alternative_uv_readings, downsample_normals, uv_vertex_ids
from .state import FitState, Frame, NormalTargets, UVTargets
from .uv_nn import uv_targets
from .validation import ATLAS_RESOLUTION, atlas_pixels

__all__ = ["ATLAS_RESOLUTION", "check_conventions", "normal_agreement", "uv_consistency", "uv_in_atlas"]

#: An alternative reading must explain more than this fraction, and twice the declared one.
_CLEARLY = 0.5


def normal_agreement(problem: FitProblem, state: FitState, frame: Frame, normals: NormalTargets) -> float:
    """Fraction of ``normals.mask`` pixels covered at ``state`` with a normal inside the outlier cut."""
    xp = problem.xp
    verts = flame_forward(problem.model, state.params())[0]
    pix = xp.nonzero(((frame.face_id >= 0) & normals.mask).reshape(-1))[0]
    if pix.size == 0:
        return 0.0
    R_out = output_rotation(state, normals.space)
    nr = normal_residuals(verts, problem.model.faces, frame, normals, pix, R_out, problem.config.weights)
    return float(nr.keep.sum()) / max(float(normals.n_mask), 1.0)


def uv_in_atlas(problem: FitProblem) -> object:
    """0-d device count of the observation's mask pixels whose UV lies on the model's UV atlas
    (:func:`~.validation.atlas_pixels`; counted when the problem was prepared, for the
    images of a batch at once)."""
    xp = problem.xp
    if problem.n_in_atlas is not None:
        return problem.n_in_atlas
    if problem.maps is None or problem.model.uv is None:
        return xp.zeros((), dtype=xp.int64)
    _, uv_map, mask = problem.maps
    return atlas_pixels(problem.model.uv, uv_map, mask)


def uv_consistency(problem: FitProblem, uv_map: object, mask: object) -> float:
    """Fraction of the UV targets of ``uv_map`` a rigid initialisation explains within the widened UV cap."""
    xp = problem.xp
    model, cfg = problem.model, problem.config
    H, W = problem.size
    ids = uv_vertex_ids(model, cfg.uv_regions)
    query = asarray_on(xp, model.uv.vertex_uv[ids], np.float32)  # type: ignore[union-attr]
    pix, valid = uv_targets(query, uv_map, mask, cfg.delta_uv_sq)
    n = int(valid.sum())
    if n < 3:
        return 0.0
    uvt = UVTargets(vertex_ids=asarray_on(xp, ids), pixels=xp.where(valid[:, None], pix, 0.0).astype(model.dtype),
                    n_targets=n, valid=valid)  # fmt: skip
    f0 = float(np.exp(float(problem.focal_prior)))
    state = init_rigid(model, uvt, f0, problem.pp_prior, (H, W), cfg.weights, fix_focal=cfg.focal is not None)
    frame = problem.render(state)
    # the rigid template is far from a strong expression: the UV stage's wide cap
    wide = replace(cfg.weights, uv_cap_px=cfg.weights.uv_cap_px * cfg.init_uv_cap_scale)
    res = uv_residuals(state, flame_forward(model, state.params())[0], uvt, frame, wide, problem.size)
    return float(res.active.sum()) / n


def check_conventions(problem: FitProblem, state: FitState) -> None:
    """Raise an :class:`InputError` naming the mistake when another reading of the maps fits clearly better.

    Args:
        problem: the fit's problem (with its validated maps).
        state: the fitted state.
    """
    if problem.maps is None:
        return
    normals_map, uv_map, mask = problem.maps
    declared = problem.normals.space
    other = "head" if declared == "camera" else "camera"
    frame = problem.render(state)
    base = normal_agreement(problem, state, frame, problem.normals)
    if base < problem.config.quality_min:
        candidates = {
            "have a flipped sign (negate observation.normals)": (-1.0, declared),
            f"are in {other} space, not {declared} space (set observation.normal_space={other!r})": (1.0, other),
            f"are in {other} space and have a flipped sign": (-1.0, other),
        }
        scores = {}
        for what, (sign, space) in candidates.items():
            n_d, m_d = downsample_normals(sign * normals_map, mask, problem.render_size)
            alt = NormalTargets(normals=n_d.astype(problem.model.dtype), mask=m_d, space=space)
            scores[what] = normal_agreement(problem, state, frame, alt)
        what, best = max(scores.items(), key=lambda kv: kv[1])
        if best > _CLEARLY and best > 2 * base:
            raise InputError(
                f"fit: observation.normals look like they {what}: that reading explains {100 * best:.0f}% of the "
                f"mask's normals, the declared one {100 * base:.0f}%"
            )
    base = uv_consistency(problem, uv_map, mask)
    if base < _CLEARLY:
        readings = alternative_uv_readings(uv_map, mask)
        scores = {what: uv_consistency(problem, alt, mask) for what, alt in readings.items()}
        what, best = max(scores.items(), key=lambda kv: kv[1])
        if best > _CLEARLY and best > 2 * base:
            raise InputError(
                f"fit: observation.uv looks like it {what}: that reading gives "
                f"{100 * best:.0f}% consistent correspondences after the rigid initialisation, the declared one "
                f"{100 * base:.0f}%"
            )
