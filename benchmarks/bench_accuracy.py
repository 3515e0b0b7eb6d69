"""Reconstruction accuracy in the Pixel3DMM benchmark's terms: posed and neutral L1 Chamfer
(mm) and recall at 2.5 mm, after a similarity alignment over the face region.

Held-out synthetic faces: ``--identities`` identities (identity ~ N(0, 1) on 50
components, seeded per identity) x two expression sets (moderate 0.8 sigma, extreme
1.6 sigma with the jaw open up to 0.4 rad, seeded per identity and set) x views (yaw
``--yaws``, pitch and roll drawn within +-15 / +-10 degrees), framed like a detector crop
(focal 1.5-4x the image size). The seeds (default 3000) are not the training data's (0, 1).
Maps (``--maps``, comma-separated): ``oracle`` (the rendered ground-truth maps) and/or
``predicted`` (the embedded predictors of ``runtime/engines``, or ``--engines DIR``, run on
the face's photo-like render through ONNX Runtime; needs ``--size 512``, the predictors'
crop). Predicted rows also report the map errors (normal angle, UV distance, mask IoU).

Rows: each solver (fast, paper) with the full energy, and the ablations ``only UV`` (the
normal term off) and ``only normals`` (the UV term off in the solver; the initialisation
still uses the UV correspondences, since a rigid start needs them). Prints one table per
expression set plus the full method by yaw, and writes ``--json``.

    python benchmarks/bench_accuracy.py [--identities 2] [--yaws -60 0 45] [--size 256]
        [--maps oracle,predicted] [--engines DIR] [--solvers fast,paper] [--ablations full,uv,normals]
        [--json accuracy.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from typing import Any

SETS = {"moderate": (0.8, 0.15), "extreme": (1.6, 0.4)}  # expression sigma, max jaw opening (rad)
ABLATIONS = {"full": "full energy", "uv": "only UV", "normals": "only normals"}


def make_face(model: Any, identity: int, expr_set: str, yaw: float, size: int, seed: int) -> tuple[Any, Any]:
    import numpy as np
    from p3dmm.fitting.base.rotation import rotation_to_axis_angle
    from p3dmm.training.synth import rotation_from_euler, sample_camera

    strength, jaw_max = SETS[expr_set]
    p = model.zero_params()
    shape = np.zeros(p.shape.shape[0])
    shape[:50] = np.random.default_rng([seed, identity]).normal(0.0, 1.0, 50)
    e_rng = np.random.default_rng([seed, identity, int(strength * 100)])
    expr = np.zeros(p.expr.shape[0])
    expr[:50] = np.clip(e_rng.normal(0.0, 1.0, 50) * strength, -3 * strength, 3 * strength)
    jaw = e_rng.uniform(0.0, jaw_max)
    v_rng = np.random.default_rng([seed, identity, int(strength * 100), int(round(yaw)) + 360])
    pose = np.zeros((5, 3))
    pose[0] = rotation_to_axis_angle(rotation_from_euler(*np.radians([yaw, v_rng.uniform(-15, 15), v_rng.uniform(-10, 10)])))
    pose[2, 0] = jaw
    p.shape, p.expr, p.pose = (a.astype(np.float32) for a in (shape, expr, pose))
    camera = sample_camera(v_rng, size, model.vertices(p), face_vertices=model.masks["face"], focal_range=(1.5, 4.0))
    return p, camera


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--identities", type=int, default=2)
    ap.add_argument("--yaws", type=float, nargs="+", default=[-60.0, 0.0, 45.0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--solvers", default="fast,paper")
    ap.add_argument("--ablations", default="full,uv,normals")
    ap.add_argument("--maps", default="oracle", help="comma-separated: oracle, predicted")
    ap.add_argument("--engines", default=None, help="engine directory for --maps predicted (default: the embedded ones)")
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    kinds = [m for m in args.maps.split(",") if m]
    if not kinds or any(m not in ("oracle", "predicted") for m in kinds):
        ap.error(f"--maps {args.maps!r}: expected a comma-separated list of oracle, predicted")
    if "predicted" in kinds and args.size != 512:
        ap.error("--maps predicted needs --size 512 (the predictors' crop size)")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import warnings

    import numpy as np
    from p3dmm.fitting import FitConfig, FlameModel, Observation, P3DMMError, fit, render_maps
    from p3dmm.fitting.base.errors import P3DMMWarning
    from p3dmm.fitting.metrics import evaluate, map_errors

    warnings.simplefilter("ignore", P3DMMWarning)
    model = FlameModel.synthetic(seed=0)
    face = model.masks["face"]
    faces = np.asarray(model.faces)
    solvers = [s for s in args.solvers.split(",") if s]
    ablations = [a for a in args.ablations.split(",") if a]
    rec = None
    if "predicted" in kinds:
        from p3dmm.runtime import Reconstructor

        kw: dict[str, Any] = {"detector": None, "backend": "ort-cpu", "device": "cpu", "threads": args.threads}
        rec = Reconstructor.from_engines(args.engines, **kw) if args.engines else Reconstructor.default(**kw)
        print(f"predictors: {rec.engines} ({rec.normals.entry.file}, {rec.uv.entry.file}, {rec.normals.name})",
              file=sys.stderr)  # fmt: skip
    rows: list[dict[str, Any]] = []
    map_rows: list[dict[str, Any]] = []
    cases = [(i, s, y) for i in range(args.identities) for s in SETS for y in args.yaws]
    for k, (ident, expr_set, yaw) in enumerate(cases):
        gt, camera = make_face(model, ident, expr_set, yaw, args.size, args.seed)
        rgb = rec is not None
        maps = render_maps(model, gt, camera, rgb=rgb, rng=np.random.default_rng([args.seed, ident, k]) if rgb else None)
        gt_posed, gt_neutral = model.vertices(gt), model.neutral_vertices(gt)
        observations = {}
        if "oracle" in kinds:
            observations["oracle"] = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)
        if rec is not None:
            pred = rec.predict(maps.rgb[None])
            pred = {key: v[0] for key, v in pred.items()}
            observations["predicted"] = Observation(normals=pred["normals"], uv=pred["uv"], mask=pred["mask"])
            e = map_errors(pred, {"normals": maps.normals, "uv": maps.uv, "mask": maps.mask})
            map_rows.append({"identity": ident, "set": expr_set, "yaw": yaw, **e})
        for (kind, obs), solver, abl in ((o, s, a) for o in observations.items() for s in solvers for a in ablations):
            cfg = FitConfig(solver=solver)
            if abl == "uv":
                cfg = replace(cfg, weights=replace(cfg.weights, normal=0.0))
            elif abl == "normals":
                cfg = replace(cfg, weights=replace(cfg.weights, uv=0.0))
            row: dict[str, Any] = {"identity": ident, "set": expr_set, "yaw": yaw, "maps": kind, "solver": solver,
                                   "ablation": abl}  # fmt: skip
            try:
                r = fit(obs, model, cfg)
                posed = evaluate(r.vertices, faces, gt_posed, faces, region=face)
                neutral = evaluate(r.neutral_vertices, faces, gt_neutral, faces, region=face)
                row.update(posed_l1=posed["chamfer_mm"], posed_r25=posed["recall"], neutral_l1=neutral["chamfer_mm"],
                           neutral_r25=neutral["recall"], seconds=r.timings["total"], error=None)  # fmt: skip
                msg = f"posed {posed['chamfer_mm']:.2f} mm / R2.5 {posed['recall']:.2f}"
            except P3DMMError as e:
                row.update(error=f"{type(e).__name__}: {e}")
                msg = "FAILED " + row["error"]
            rows.append(row)
            print(f"[{k + 1}/{len(cases)}] id {ident} {expr_set} yaw {yaw:+.0f} {kind} {solver} {ABLATIONS[abl]}: {msg}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def agg(sel: list[dict[str, Any]], key: str) -> str:
        ok = [r[key] for r in sel if r["error"] is None]
        return "-" if not ok else f"{sum(ok) / len(ok):.3f}"

    print(f"{' and '.join(kinds)} maps of held-out synthetic faces: {args.identities} identities x {len(SETS)} "
          f"expression sets x {len(args.yaws)} views (yaw {' '.join(f'{y:g}' for y in args.yaws)}), "
          f"{args.size}x{args.size}, seed {args.seed}")  # fmt: skip
    print("L1 = Chamfer distance (mm, mean of both directions, point-to-surface, face region, similarity-aligned); "
          "R2.5 = recall at 2.5 mm\n")
    if map_rows:
        print("### predicted maps against the ground truth (face region)\n")
        print("| yaw | normal mean deg | normal median deg | UV mean px | UV median px | mask IoU |")
        print("|---|---:|---:|---:|---:|---:|")
        for yaw in [*args.yaws, None]:
            sel = [r for r in map_rows if yaw is None or r["yaw"] == yaw]
            cells = [f"{sum(r[key] for r in sel) / len(sel):.2f}" for key in
                     ("normal_mean_deg", "normal_median_deg", "uv_mean_px", "uv_median_px", "mask_iou")]  # fmt: skip
            print(f"| {'all' if yaw is None else f'{yaw:g}'} | " + " | ".join(cells) + " |")
        print()
    for expr_set in SETS:
        print(f"### {expr_set} expressions ({SETS[expr_set][0]} sigma, jaw up to {SETS[expr_set][1]} rad)\n")
        print("| maps | method | posed L1 | posed R2.5 | neutral L1 | neutral R2.5 | s/image | failed |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for kind in kinds:
            for solver in solvers:
                for abl in ablations:
                    sel = [r for r in rows if r["set"] == expr_set and r["maps"] == kind and r["solver"] == solver
                           and r["ablation"] == abl]  # fmt: skip
                    failed = sum(1 for r in sel if r["error"] is not None)
                    print(f"| {kind} | {solver}, {ABLATIONS[abl]} | {agg(sel, 'posed_l1')} | {agg(sel, 'posed_r25')} | "
                          f"{agg(sel, 'neutral_l1')} | {agg(sel, 'neutral_r25')} | {agg(sel, 'seconds')} | {failed} |")
        print()
    print("### full energy by yaw (both expression sets): posed / neutral L1 (mm)\n")
    heads = [f"{kind} {s}" for kind in kinds for s in solvers]
    print("| yaw | " + " | ".join(f"{h} posed L1 | {h} neutral L1 | {h} posed R2.5" for h in heads) + " |")
    print("|---|" + "---:|---:|---:|" * len(heads))
    for yaw in args.yaws:
        cells = []
        for kind in kinds:
            for s in solvers:
                sel = [r for r in rows if r["yaw"] == yaw and r["maps"] == kind and r["solver"] == s and r["ablation"] == "full"]
                cells += [agg(sel, "posed_l1"), agg(sel, "neutral_l1"), agg(sel, "posed_r25")]
        print(f"| {yaw:g} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "size": args.size, "maps": kinds, "rows": rows, "map_errors": map_rows}, f, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)


if __name__ == "__main__":
    main()
