"""Fitting accuracy and speed on a grid of held-out synthetic faces at extreme poses.

For each image size, yaw (degrees) and expression strength (sigma), one seeded random
face of the synthetic FLAME head (identity ~ N(0, 1) on 50 components, expression
~ N(0, 1) * strength on 50 components clipped to +-3 * strength, jaw opening in
[0, 0.4] rad, neck N(0, 0.05) rad, pitch in +-30 deg, roll in +-20 deg, focal 1.5-4x the
image size, framed like a face-detector crop) is rendered to oracle normal/UV maps and
fitted by each solver. Prints GitHub-markdown tables per image size (rows: yaw, then
expression strength; per solver: mean / worst posed error in mm (face region,
similarity-aligned), mean camera-frame error in mm (no alignment, so it includes the
depth error of a wrong focal length), mean s/image) and a
summary line per solver. Progress goes to stderr, one line per case.

    python benchmarks/bench_fitting_grid.py [--sizes 256 512] [--yaws -75 0 75] [--strengths 0 1.5]
        [--solvers fast,paper] [--paper-steps 500,800] [--quick] [--threads 2] [--cases N]
        [--seed 1000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

YAWS = (-75.0, -60.0, -45.0, -30.0, -15.0, 0.0, 15.0, 30.0, 45.0, 60.0, 75.0)
STRENGTHS = (0.0, 0.75, 1.5)
COLUMNS = ("posed mm", "worst mm", "camera mm", "s/image")


def make_case(model: Any, size: int, yaw_deg: float, strength: float, seed: int) -> tuple[Any, Any, dict[str, float]]:
    """One face: (FlameParams, Camera, case description). The generator depends only on
    (seed, size, yaw, strength), so a case is the same whichever subset of the grid runs."""
    import numpy as np
    from p3dmm.fitting.base.rotation import rotation_to_axis_angle
    from p3dmm.training.synth import rotation_from_euler, sample_camera

    rng = np.random.default_rng([seed, size, int(round(yaw_deg)) + 360, int(round(strength * 1000))])
    p = model.zero_params()
    pitch = rng.uniform(-30.0, 30.0)
    roll = rng.uniform(-20.0, 20.0)
    shape = np.zeros(p.shape.shape[0])
    shape[:50] = rng.normal(0.0, 1.0, 50)
    expr = np.zeros(p.expr.shape[0])
    expr[:50] = np.clip(rng.normal(0.0, 1.0, 50) * strength, -3.0 * strength, 3.0 * strength)
    pose = np.zeros((5, 3))
    pose[0] = rotation_to_axis_angle(rotation_from_euler(*np.radians([yaw_deg, pitch, roll])))
    pose[1] = rng.normal(0.0, 0.05, 3)
    jaw = rng.uniform(0.0, 0.4)
    pose[2, 0] = jaw
    p.shape, p.expr, p.pose = (a.astype(np.float32) for a in (shape, expr, pose))
    camera = sample_camera(rng, size, model.vertices(p), face_vertices=model.masks["face"], focal_range=(1.5, 4.0))
    info = {"size": size, "yaw": yaw_deg, "pitch": float(pitch), "roll": float(roll), "strength": strength,
            "jaw": float(jaw), "focal": float(np.asarray(camera.focal).reshape(-1)[0])}
    return p, camera, info


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]], key: str, label: str, solvers: list[str]) -> list[str]:
    """Markdown table: one row per value of ``key``, four columns per solver."""
    head = [label] + [f"{s} {c}" for s in solvers for c in COLUMNS]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for value in sorted({r[key] for r in rows}):
        cells = [f"{value:g}"]
        for s in solvers:
            ok = [r for r in rows if r[key] == value and r["solver"] == s and r["error"] is None]
            n_fail = sum(1 for r in rows if r[key] == value and r["solver"] == s and r["error"] is not None)
            if not ok:
                cells += ["fail" if n_fail else "-"] + ["-"] * (len(COLUMNS) - 1)
                continue
            mean = lambda f: sum(r[f] for r in ok) / len(ok)  # noqa: E731
            cells += [fmt(mean("posed_mm")) + (f" ({n_fail} failed)" if n_fail else ""),
                      fmt(max(r["posed_mm"] for r in ok)), fmt(mean("camera_mm")), fmt(mean("seconds"))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def summary(rows: list[dict[str, Any]], solver: str) -> str:
    mine = [r for r in rows if r["solver"] == solver]
    ok = [r for r in mine if r["error"] is None]
    failed = len(mine) - len(ok)
    if not ok:
        return f"{solver}: {len(mine)} fits, all failed"
    posed = [r["posed_mm"] for r in ok]
    return (f"{solver}: {len(mine)} fits, posed {sum(posed) / len(ok):.2f} mm mean / {max(posed):.2f} mm worst, "
            f"neutral {sum(r['neutral_mm'] for r in ok) / len(ok):.2f} mm mean, "
            f"camera-frame {sum(r['camera_mm'] for r in ok) / len(ok):.2f} mm mean, "
            f"{sum(r['seconds'] for r in ok) / len(ok):.2f} s/image, "
            f"{sum(1 for r in ok if not r['converged'])} not converged, {failed} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default 256 512)")
    ap.add_argument("--yaws", type=float, nargs="+", default=None, help="yaw angles in degrees")
    ap.add_argument("--strengths", type=float, nargs="+", default=None, help="expression strengths in sigma")
    ap.add_argument("--solvers", default="fast,paper", help="comma-separated: fast, paper")
    ap.add_argument("--paper-steps", default=None, help="camera,fit Adam steps of the paper solver (500,800)")
    ap.add_argument("--quick", action="store_true",
                    help="yaws -75 -45 0 45 75, strengths 0 1.5, size 256, paper 100+200 steps")
    ap.add_argument("--threads", type=int, default=2, help="BLAS / OpenMP threads")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--cases", type=int, default=None, help="run only the first N cases (smoke test)")
    ap.add_argument("--json", default=None, help="write every case's numbers to this file")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    from p3dmm.fitting import FitConfig, FlameModel, Observation, P3DMMError, fit, render_maps
    from p3dmm.fitting.metrics import vertex_errors

    sizes = args.sizes or ([256] if args.quick else [256, 512])
    yaws = args.yaws or ([-75.0, -45.0, 0.0, 45.0, 75.0] if args.quick else list(YAWS))
    strengths = args.strengths or ([0.0, 1.5] if args.quick else list(STRENGTHS))
    steps = args.paper_steps or ("100,200" if args.quick else "500,800")
    cam_steps, fit_steps = (int(s) for s in steps.split(","))
    solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
    grid = [(n, y, s) for n in sizes for y in yaws for s in strengths]
    if args.cases is not None:
        grid = grid[: args.cases]

    model = FlameModel.synthetic(seed=0)
    face = model.masks["face"]
    rows: list[dict[str, Any]] = []
    for i, (size, yaw, strength) in enumerate(grid):
        gt, camera, info = make_case(model, size, yaw, strength, args.seed)
        maps = render_maps(model, gt, camera, normal_space="camera", rgb=False)
        obs = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)
        gt_v, gt_n = model.vertices(gt), model.neutral_vertices(gt)
        gt_cam = camera.to_camera(gt_v)
        for solver in solvers:
            row: dict[str, Any] = dict(info, solver=solver, error=None)
            try:
                r = fit(obs, model, FitConfig(solver=solver, paper_camera_steps=cam_steps, paper_steps=fit_steps))
                row.update(
                    posed_mm=vertex_errors(r.vertices, gt_v, face)["mean_mm"],
                    neutral_mm=vertex_errors(r.neutral_vertices, gt_n, face)["mean_mm"],
                    camera_mm=vertex_errors(r.camera.to_camera(r.vertices), gt_cam, face, align="none")["mean_mm"],
                    iterations=int(r.iterations), stop_reason=r.stop_reason, converged=bool(r.converged),
                    seconds=float(r.timings["total"]))
                msg = (f"posed {row['posed_mm']:.2f} mm, camera {row['camera_mm']:.2f} mm, {row['iterations']} it, "
                       f"{row['stop_reason']}, {row['seconds']:.2f} s")
            except P3DMMError as e:
                row.update(posed_mm=None, neutral_mm=None, camera_mm=None, iterations=None, stop_reason=None,
                           converged=False, seconds=None, error=f"{type(e).__name__}: {e}")
                msg = f"FAILED {row['error']}"
            rows.append(row)
            print(f"[{i + 1}/{len(grid)}] size {size} yaw {yaw:+.0f} pitch {info['pitch']:+.1f} roll {info['roll']:+.1f} "
                  f"expr {strength:g} jaw {info['jaw']:.2f} f/size {info['focal'] / size:.2f} {solver}: {msg}",
                  file=sys.stderr, flush=True)

    print(f"fitting oracle maps of held-out synthetic faces, seed {args.seed}, threads={args.threads}, "
          f"paper schedule {cam_steps}+{fit_steps} Adam steps, {len(grid)} case(s)")
    print("errors: face region, mean mm; posed = similarity-aligned, camera = camera frame, no alignment "
          "(includes the depth error of a wrong focal length)\n")
    for size in sorted({r["size"] for r in rows}):
        at = [r for r in rows if r["size"] == size]
        print(f"### {size}x{size}, by yaw (degrees)\n")
        print("\n".join(table(at, "yaw", "yaw", solvers)) + "\n")
        print(f"### {size}x{size}, by expression strength (sigma)\n")
        print("\n".join(table(at, "strength", "expr", solvers)) + "\n")
        for s in solvers:
            print(f"{size}x{size} " + summary(at, s))
        print()
    for s in solvers:
        print("overall " + summary(rows, s))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "threads": args.threads, "paper_steps": [cam_steps, fit_steps],
                       "cases": rows}, f, indent=1)
        print(f"wrote {len(rows)} fit(s) to {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
