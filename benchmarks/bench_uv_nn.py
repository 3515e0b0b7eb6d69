"""UV nearest-neighbour search: brute force vs k-d tree vs uniform grid (CPU) vs CUDA.

One 512x512 "rendered-like" UV map (smooth UV field over a disc covering ~60 % of the
image, duplicated UVs) and Q = 2500 / 5023 template-UV queries. Every row is a full
search including its index build (tree / grid), in ms per search (median of repeats);
``exact`` says whether the result equals the float32 brute force bit for bit.

    python benchmarks/bench_uv_nn.py [--repeats 5] [--size 512] [--no-bruteforce]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
from _timing import median_ms  # benchmarks/_timing.py (scripts run from benchmarks/)


def rendered_like_map(size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(size, size, 2) float32`` smooth UV field and a disc mask covering ~60 %."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    radius = np.sqrt(0.6 / np.pi) * size
    sx, sy = (xx - c) / radius, (yy - c) / radius
    mask = sx**2 + sy**2 < 1.0
    u = 0.5 + 0.42 * sx + 0.05 * sx * sy + 0.02 * np.sin(3 * sy)
    v = 0.5 + 0.42 * sy + 0.04 * sx**2
    uv = np.stack([u, v], axis=-1).astype(np.float32)
    flat = uv.reshape(-1, 2)
    inside = np.flatnonzero(mask.reshape(-1))
    dst = rng.choice(inside, inside.size // 50, replace=False)  # 2 % duplicated UVs
    flat[dst] = flat[rng.choice(inside, dst.size, replace=False)]
    return uv, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--queries", type=int, nargs="+", default=[2500, 5023])
    ap.add_argument("--grid-sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--no-bruteforce", action="store_true", help="skip the (slow) NumPy brute force")
    args = ap.parse_args()

    from p3dmm.fitting.fitter.uv_nn import (
        uv_nearest_pixels,
        uv_nearest_pixels_bruteforce,
    )

    uv, mask = rendered_like_map(args.size)
    print(f"UV map {args.size}x{args.size}, {mask.mean() * 100:.1f} % masked ({int(mask.sum())} pixels)")

    cp = None
    try:
        import cupy

        cupy.zeros(1).sum().item()
        cp = cupy
        device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
    except Exception as e:  # noqa: BLE001 - no CuPy / no device: CPU rows only
        device = f"none ({type(e).__name__})"
    print(f"GPU: {device}")

    rows: list[tuple[str, int, float, str]] = []
    rng = np.random.default_rng(1)
    for nq in args.queries:
        q = (rng.random((nq, 2)) * 0.9 + 0.05).astype(np.float32)
        ref = None
        if not args.no_bruteforce:
            t0 = time.perf_counter()
            ref = uv_nearest_pixels_bruteforce(q, uv, mask)
            rows.append(("bruteforce numpy", nq, (time.perf_counter() - t0) * 1e3, "ref"))
        if ref is None:
            ref = uv_nearest_pixels(q, uv, mask, method="kdtree")

        def exact(res: tuple[Any, Any]) -> str:
            i, d = (np.asarray(r.get() if hasattr(r, "get") else r) for r in res)
            same = np.array_equal(i, ref[0]) and np.array_equal(d.view(np.int32), ref[1].view(np.int32))
            return "yes" if same else "NO"

        res = uv_nearest_pixels(q, uv, mask, method="kdtree")
        ms = median_ms(lambda: uv_nearest_pixels(q, uv, mask, method="kdtree"), args.repeats, warmup=1)
        rows.append(("cKDTree (incl. build)", nq, ms, exact(res)))
        for g in args.grid_sizes:
            res = uv_nearest_pixels(q, uv, mask, method="grid", grid_size=g)  # also compiles numba
            ms = median_ms(lambda: uv_nearest_pixels(q, uv, mask, method="grid", grid_size=g), args.repeats, warmup=1)
            rows.append((f"grid reference numba G={g}", nq, ms, exact(res)))
        if cp is not None:
            qd, uvd, md = cp.asarray(q), cp.asarray(uv), cp.asarray(mask)
            sync = cp.cuda.Device().synchronize
            for g in args.grid_sizes:
                res = uv_nearest_pixels(qd, uvd, md, grid_size=g)  # also compiles the module
                ms = median_ms(lambda: uv_nearest_pixels(qd, uvd, md, grid_size=g), max(args.repeats, 20), warmup=1, sync=sync)
                rows.append((f"CUDA grid G={g} (incl. build)", nq, ms, exact(res)))

    print()
    print(f"{'method':34s} {'Q':>6s} {'ms/search':>11s} {'exact':>6s}")
    for name, nq, ms, ok in rows:
        print(f"{name:34s} {nq:6d} {ms:11.2f} {ok:>6s}")


if __name__ == "__main__":
    main()
