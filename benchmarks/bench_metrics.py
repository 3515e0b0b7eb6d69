"""Point-to-surface distance: trimesh's exact proximity query vs a KD-tree over dense
surface samples, on the synthetic FLAME-format head (5023 vertices, 9976 triangles).

Query points are the head's vertices displaced by N(0, 2 mm). Prints a table: method,
seconds (build + query, median of --repeats), mean distance, and the worst and mean
absolute difference from the exact distances.

    python benchmarks/bench_metrics.py [--samples 200000 1000000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import numpy as np
    import trimesh
    from scipy.spatial import cKDTree

    from p3dmm.fitting import FlameModel
    from p3dmm.fitting.metrics import point_to_surface

    m = FlameModel.synthetic(seed=0)
    v = m.vertices(m.zero_params()).astype(np.float64)
    f = np.asarray(m.faces)
    pts = v + np.random.default_rng(0).normal(0, 0.002, v.shape)

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), out

    t_exact, (exact, _) = timed(lambda: point_to_surface(pts, v, f))
    rows = [("trimesh proximity (exact, used)", t_exact, exact)]
    mesh = trimesh.Trimesh(v, f, process=False)
    for n in args.samples:
        def sampled(n=n):
            samples, _ = trimesh.sample.sample_surface(mesh, n, seed=0)
            return cKDTree(samples).query(pts)[0]

        t, d = timed(sampled)
        rows.append((f"KD-tree over {n} surface samples", t, d))
    print(f"{len(pts)} query points, {len(f)} triangles\n")
    print("| method | s | mean mm | worst abs error mm | mean abs error mm |")
    print("|---|---:|---:|---:|---:|")
    for name, t, d in rows:
        err = np.abs(d - exact) * 1e3
        print(f"| {name} | {t:.3f} | {d.mean() * 1e3:.4f} | {err.max():.4f} | {err.mean():.4f} |")


if __name__ == "__main__":
    main()
