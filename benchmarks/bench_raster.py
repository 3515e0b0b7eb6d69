"""Rasterizer time on a FLAME-size mesh: CPU (numba, one thread) and GPU (CUDA, when present).

Prints one table: median of ``--repeats`` calls after warm-up, for 256x256 and 512x512,
with and without back-face culling. The first call (numba JIT compile, or CUDA module
compile) is timed separately. By default numba compiles into a fresh temporary cache
directory so the compile time is real; ``--use-cache`` keeps the normal cache.

    python benchmarks/bench_raster.py [--repeats 50] [--sizes 256 512] [--use-cache]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Callable

from _timing import median_ms  # benchmarks/_timing.py (scripts run from benchmarks/)


def _mesh() -> tuple[Any, Any, str]:
    """FLAME-frame vertices ``(V, 3) float32``, faces ``(F, 3)``, description."""
    import numpy as np
    from p3dmm.fitting import FlameModel

    try:
        model = FlameModel.synthetic(seed=0)
        return np.asarray(model.v_template, np.float32), np.asarray(model.faces), f"{model.name} (template pose)"
    except (ImportError, NotImplementedError):
        import trimesh

        sphere = trimesh.creation.uv_sphere(radius=0.1, count=[50, 50])  # ~FLAME's V and F
        return np.asarray(sphere.vertices, np.float32), np.asarray(sphere.faces), "UV sphere r=0.1 m (FlameModel.synthetic unavailable)"


def _gpu_reason() -> str | None:
    try:
        import cupy as cp

        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device"
    except Exception as e:  # noqa: BLE001 - ImportError or CUDARuntimeError without a driver
        return f"{type(e).__name__}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--use-cache", action="store_true", help="load numba's on-disk cache instead of compiling")
    args = ap.parse_args()
    # before numba is imported: one thread (the CPU kernels have no prange anyway), fresh cache
    os.environ["NUMBA_NUM_THREADS"] = "1"
    if not args.use_cache:
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="p3dmm_bench_numba_")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one CPU core

    import numpy as np
    from p3dmm.fitting import Camera
    from p3dmm.fitting.render.raster import rasterize

    verts, faces, source = _mesh()
    print(f"mesh: {source}; V={len(verts)}, F={len(faces)}")
    print(f"CPU: numba, 1 thread, pinned to one core; repeats={args.repeats} (median)")

    rows: list[tuple[str, int, bool, float, float]] = []
    first_call: dict[str, float] = {}

    def measure(key: str, label: str, to_device: Callable[[np.ndarray], Any], sync: Callable[[], None] | None) -> None:
        faces_d = to_device(faces)
        for size in args.sizes:
            cam = Camera.frontal(distance=1.0, width=size, height=size)
            verts_d = to_device(np.ascontiguousarray(cam.to_camera(verts), dtype=np.float32))
            for cull in (False, True):
                run = lambda: rasterize(verts_d, faces_d, cam, cull_backfaces=cull)  # noqa: E731
                if key not in first_call:
                    t0 = time.perf_counter()
                    run()
                    if sync:
                        sync()
                    first_call[key] = (time.perf_counter() - t0) * 1e3
                coverage = float(run().mask.mean())
                rows.append((label, size, cull, median_ms(run, args.repeats, sync=sync), coverage))

    measure("cpu", "cpu (numba, 1 thread)", lambda a: a, None)
    reason = _gpu_reason()
    if reason is None:
        import cupy as cp

        name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
        measure("gpu", f"gpu ({name})", cp.asarray, cp.cuda.Device().synchronize)
    else:
        print(f"GPU: skipped ({reason})")

    print()
    print(f"{'backend':<28} {'size':>9} {'cull':>5} {'median ms':>10} {'covered':>8}")
    for backend, size, cull, ms, coverage in rows:
        print(f"{backend:<28} {f'{size}x{size}':>9} {'yes' if cull else 'no':>5} {ms:>10.3f} {coverage:>7.1%}")
    print()
    for key, ms in first_call.items():
        what = "numba JIT compile" if key == "cpu" and not args.use_cache else "first call"
        print(f"{key} first call ({what}, excluded above): {ms:.0f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
