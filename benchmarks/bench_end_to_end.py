"""Photo -> mesh, per stage: decode, detect, crop, predict, fit, save, and the total.

Real photographs that ship inside packages (scikit-image's ``astronaut``, matplotlib's
``grace_hopper``), written as JPEG files so decoding is part of the measurement, run through
``Reconstructor`` with the embedded predictors (or ``--engines DIR``) on every backend that
loads here (``ort-cpu``; ``ort-cuda``, ``ort-tensorrt`` and ``tensorrt`` when present; a
backend that cannot load is listed with the reason). The face detector is dlib's HOG (the
default). Each image runs ``--repeats`` times after one warm-up; the table shows medians in
milliseconds. ``--batch N`` adds a throughput row: ``reconstruct_batch`` on N images (the
predictors run batched, the fits per image) against N serial calls, measured side by side.

    python benchmarks/bench_end_to_end.py [--repeats 3] [--batch 4] [--backends ort-cpu,ort-cuda,tensorrt]
        [--solver fast] [--threads 2] [--engines DIR] [--json e2e.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

STAGES = ("decode", "detect", "crop", "predict", "fit", "save", "total")


def photos(directory: str) -> list[str]:
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    paths = []
    for name, img in (("astronaut", data.astronaut()),
                      ("grace_hopper", Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))):  # fmt: skip
        path = os.path.join(directory, f"{name}.jpg")
        (img if isinstance(img, Image.Image) else Image.fromarray(img)).convert("RGB").save(path, quality=92)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=0, help="also measure reconstruct_batch on N images")
    ap.add_argument("--backends", default="ort-cpu,ort-cuda,ort-tensorrt,tensorrt")
    ap.add_argument("--solver", default="fast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import warnings

    from p3dmm.fitting import FitConfig
    from p3dmm.fitting.base.errors import P3DMMError, P3DMMWarning
    from p3dmm.runtime import Reconstructor

    warnings.simplefilter("ignore", P3DMMWarning)
    tmp = tempfile.mkdtemp(prefix="p3dmm-e2e-")
    paths = photos(tmp)
    results: dict[str, Any] = {"threads": args.threads, "solver": args.solver, "backends": {}}
    for backend in [b for b in args.backends.split(",") if b]:
        kw: dict[str, Any] = {"backend": backend, "detector": "dlib", "config": FitConfig(solver=args.solver),
                              "threads": args.threads}  # fmt: skip
        try:
            rec = Reconstructor.from_engines(args.engines, **kw) if args.engines else Reconstructor.default(**kw)
        except P3DMMError as e:
            results["backends"][backend] = {"skipped": f"{type(e).__name__}: {e}"}
            print(f"{backend}: skipped ({type(e).__name__}: {str(e).splitlines()[0]})", file=sys.stderr)
            continue
        per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
        for path in paths:
            rec.reconstruct(path)  # warm-up (sessions, detector, JIT)
            for rep in range(args.repeats):
                r = rec.reconstruct(path)
                t0 = time.perf_counter()
                r.save(os.path.join(tmp, f"{backend}-{os.path.basename(path)}-{rep}"))
                t_save = time.perf_counter() - t0
                for s in STAGES[:-2]:
                    per_stage[s].append(r.timings.get(s, 0.0))
                per_stage["save"].append(t_save)
                per_stage["total"].append(r.timings["total"] + t_save)
        row: dict[str, Any] = {s: 1000 * statistics.median(v) for s, v in per_stage.items()}
        row["device"] = rec.device
        if args.batch > 0:
            batch = [paths[i % len(paths)] for i in range(args.batch)]
            rec.reconstruct_batch(batch)  # warm-up at this batch size
            t0 = time.perf_counter()
            for p in batch:
                rec.reconstruct(p)
            serial = (time.perf_counter() - t0) / len(batch)
            t0 = time.perf_counter()
            rec.reconstruct_batch(batch)
            batched = (time.perf_counter() - t0) / len(batch)
            row.update(batch=args.batch, serial_ms_per_image=1000 * serial, batch_ms_per_image=1000 * batched)
        results["backends"][backend] = row
        rec.close()

    print(f"photo -> mesh, median ms per image ({len(paths)} photos x {args.repeats} runs, {args.threads} threads, "
          f"{args.solver} solver; save = every Reconstruction file incl. the 1024 px texture)\n")  # fmt: skip
    print("| backend | fit device | " + " | ".join(STAGES) + " |")
    print("|---|---|" + "---:|" * len(STAGES))
    for backend, row in results["backends"].items():
        if "skipped" in row:
            print(f"| {backend} | skipped: {row['skipped'].splitlines()[0][:90]} |" + " - |" * len(STAGES))
            continue
        print(f"| {backend} | {row['device']} | " + " | ".join(f"{row[s]:.0f}" for s in STAGES) + " |")
    rows_b = [(b, r) for b, r in results["backends"].items() if "batch" in r]
    if rows_b:
        print("\n| backend | batch | serial ms/image | reconstruct_batch ms/image | speed-up |")
        print("|---|---:|---:|---:|---:|")
        for b, r in rows_b:
            print(f"| {b} | {r['batch']} | {r['serial_ms_per_image']:.0f} | {r['batch_ms_per_image']:.0f} | "
                  f"{r['serial_ms_per_image'] / r['batch_ms_per_image']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
