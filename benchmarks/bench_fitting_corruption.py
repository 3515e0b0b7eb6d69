"""Fitting accuracy under predictor-like errors: both solvers on the same corrupted maps.

Held-out synthetic faces (the generator of ``bench_fitting_grid.py``: seeded identity,
expression, jaw, pose and a face-detector-like camera) are rendered to oracle maps, then
corrupted the way a trained predictor's maps are wrong (``tests/fitting/corruption.py``:
a smooth UV displacement of 0.6 % of the UV range plus pixel jitter, a smooth ~10 degree
normal tilt, an eroded or dilated mask, an occluder carrying random UV and normals inside
the mask, a missing band, and all of them together) and fitted by each solver. Prints a
GitHub-markdown table: one row per corruption; per solver the mean / worst posed error in
mm (face region, similarity-aligned), the mean confidence of the quality report and the
mean s/image; then the fast/paper ratio of the mean error, measured in the same run.

    python benchmarks/bench_fitting_corruption.py [--faces 4] [--size 256] [--yaws -45 -20 0 25 50]
        [--strength 0.8] [--corruptions none,uv,normals,...] [--threads 2] [--seed 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

CORRUPTIONS = ("none", "uv", "normals", "erode", "dilate", "occluder", "missing", "all")


def corrupt(name: str, obs: Any, seed: int) -> Any:
    import numpy as np
    from tests.fitting import corruption

    rng = np.random.default_rng(seed)
    return {
        "none": lambda: obs,
        "uv": lambda: corruption.uv_error(obs, rng),
        "normals": lambda: corruption.normal_error(obs, rng),
        "erode": lambda: corruption.erode(obs, 3),
        "dilate": lambda: corruption.dilate(obs, 3),
        "occluder": lambda: corruption.occluder(obs, rng),
        "missing": lambda: corruption.missing_region(obs, rng),
        "all": lambda: corruption.predictor_like(obs, rng),
    }[name]()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=4, help="faces per corruption (yaws cycle through --yaws)")
    ap.add_argument("--size", type=int, default=256, help="map size")
    ap.add_argument("--yaws", type=float, nargs="+", default=[-45.0, -20.0, 0.0, 25.0, 50.0])
    ap.add_argument("--strength", type=float, default=0.8, help="expression strength in sigma")
    ap.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated: " + ", ".join(CORRUPTIONS))
    ap.add_argument("--solvers", default="fast,paper")
    ap.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP threads")
    ap.add_argument("--seed", type=int, default=2000)
    ap.add_argument("--json", default=None, help="write every fit's numbers to this file")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import warnings

    from bench_fitting_grid import make_case
    from p3dmm.fitting import FitConfig, FlameModel, Observation, P3DMMError, fit, render_maps
    from p3dmm.fitting.base.errors import P3DMMWarning
    from p3dmm.fitting.metrics import vertex_errors

    warnings.simplefilter("ignore", P3DMMWarning)  # collapsed fits are counted in the table
    names = [c.strip() for c in args.corruptions.split(",") if c.strip()]
    unknown = sorted(set(names) - set(CORRUPTIONS))
    if unknown:
        ap.error(f"--corruptions: unknown {unknown}; choose from {', '.join(CORRUPTIONS)}")
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    model = FlameModel.synthetic(seed=0)
    face = model.masks["face"]
    rows: list[dict[str, Any]] = []
    for i in range(args.faces):
        yaw = args.yaws[i % len(args.yaws)]
        gt, camera, info = make_case(model, args.size, yaw, args.strength, args.seed + i)
        maps = render_maps(model, gt, camera, normal_space="camera", rgb=False)
        clean = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)
        gt_v = model.vertices(gt)
        for name in names:
            obs = corrupt(name, clean, args.seed + i)
            for solver in solvers:
                row: dict[str, Any] = dict(info, face=i, corruption=name, solver=solver, error=None)
                try:
                    r = fit(obs, model, FitConfig(solver=solver))
                    row.update(posed_mm=vertex_errors(r.vertices, gt_v, face)["mean_mm"],
                               confidence=float(r.quality["confidence"]), converged=bool(r.converged),
                               seconds=float(r.timings["total"]))
                    msg = f"{row['posed_mm']:.2f} mm, confidence {row['confidence']:.2f}, {row['seconds']:.2f} s"
                except P3DMMError as e:
                    row.update(posed_mm=None, confidence=None, converged=False, seconds=None,
                               error=f"{type(e).__name__}: {e}")
                    msg = f"FAILED {row['error']}"
                rows.append(row)
                print(f"[face {i + 1}/{args.faces}] yaw {yaw:+.0f} {name} {solver}: {msg}", file=sys.stderr, flush=True)

    print(f"fitting corrupted oracle maps of {args.faces} held-out synthetic face(s) per corruption, "
          f"{args.size}x{args.size}, yaws {' '.join(f'{y:g}' for y in args.yaws)}, expression {args.strength:g} sigma, "
          f"seed {args.seed}, threads={args.threads}")
    print("errors: face region, mean mm, similarity-aligned; confidence: FitResult.quality['confidence']\n")
    head = ["corruption"] + [f"{s} {c}" for s in solvers for c in ("mean mm", "worst mm", "confidence", "s/image")]
    if "fast" in solvers and "paper" in solvers:
        head.append("fast / paper")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for name in names:
        cells, means = [name], {}
        for s in solvers:
            ok = [r for r in rows if r["corruption"] == name and r["solver"] == s and r["error"] is None]
            failed = sum(1 for r in rows if r["corruption"] == name and r["solver"] == s) - len(ok)
            if not ok:
                cells += ["fail", "-", "-", "-"]
                continue
            means[s] = sum(r["posed_mm"] for r in ok) / len(ok)
            cells += [f"{means[s]:.2f}" + (f" ({failed} failed)" if failed else ""),
                      f"{max(r['posed_mm'] for r in ok):.2f}",
                      f"{sum(r['confidence'] for r in ok) / len(ok):.2f}",
                      f"{sum(r['seconds'] for r in ok) / len(ok):.2f}"]
        if len(head) > len(cells):
            cells.append(f"{means['fast'] / means['paper']:.2f}" if {"fast", "paper"} <= means.keys() else "-")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "threads": args.threads, "fits": rows}, f, indent=1)
        print(f"wrote {len(rows)} fit(s) to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
