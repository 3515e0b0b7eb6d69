"""Device work of the GPU fitting path, counted without a GPU.

Runs ``fit(..., device="cuda")`` on the CPU emulation of CuPy (``tests/device_emulation.py``:
NumPy data, CuPy's rules, the ``.cu`` kernels compiled for the host) and prints, per stage,
how many CuPy operations launch device work (elementwise ops, reductions, gathers, matrix
products, solves; views excluded), how many of our own CUDA kernels run, and how many
times the host would wait for the device (implicit synchronisations, blocking copies).

On a GPU, small fits like this are bound by launch overhead, so the operation count is
the figure to drive down; this script measures counts, not time (there is no GPU here).

Eager rows run the solver steps without CUDA graphs, once with the fused kernels
(``base/rotation.cu``, ``model/lbs.cu``, ``fitter/irls.cu``) and once with
``P3DMM_FUSED_KERNELS=0``, side by side: the work inside one graph launch.

    python benchmarks/bench_device_ops.py [--size 256] [--render 128] [--batch 4 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256, help="observation maps (square)")
    ap.add_argument("--render", type=int, default=128, help="FitConfig.render_size")
    ap.add_argument("--batch", type=int, nargs="*", default=[4, 16], help="fit_batch sizes of the batched rows")
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    from p3dmm.fitting import (
        Camera,
        FitConfig,
        FlameModel,
        Observation,
        fit,
        fit_batch,
        render_maps,
    )
    from p3dmm.runtime.demo import demo_params

    from tests.device_emulation import emulated_cuda

    model = FlameModel.synthetic(seed=0)
    params = demo_params(model, seed=7)
    cam = Camera.frontal(distance=1.0, focal=1200.0 * args.size / 512, width=args.size, height=args.size)
    maps = render_maps(model, params, cam, size=args.size, rgb=False)
    obs = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)

    def run(cfg: FitConfig, batch: int = 0, later: bool = False, fused: bool = True) -> tuple[dict[str, int], int]:
        """Counts of one fit (or fit_batch); ``later``: of a second one in the same process;
        ``fused=False``: with ``P3DMM_FUSED_KERNELS=0`` (the op chains instead of the fused kernels)."""
        os.environ["P3DMM_FUSED_KERNELS"] = "1" if fused else "0"
        with tempfile.TemporaryDirectory() as tmp, emulated_cuda(Path(tmp)) as rec:
            for _ in range(2 if later else 1):
                for k in ("ops", "downloads", "uploads", "graph_launches"):
                    setattr(rec, k, 0)
                rec.syncs.clear()
                rec.host.launches.clear()  # type: ignore[attr-defined]
                if batch:
                    rs = fit_batch([obs] * batch, model, cfg, device="cuda")
                    iters = max(r.iterations for r in rs)
                else:
                    iters = fit(obs, model, cfg, device="cuda").iterations
            return {
                "ops": rec.ops,
                "kernels": len(rec.host.launches),  # type: ignore[attr-defined]
                "syncs": len(rec.syncs),
                "downloads": rec.downloads,
                "uploads": rec.uploads,
                "graphs": rec.graph_launches,
            }, iters

    def diff(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {k: a[k] - b[k] for k in a}

    base = dict(render_size=args.render)
    rows = []
    # paper: marginal cost of an Adam step of each stage (steady state: the difference
    # between 12 and 6 steps); fixed cost with no steps
    p0, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=0, **base))
    rows.append(("prepare + result (no solver steps)", p0, 1))
    pc6, _ = run(FitConfig(solver="paper", paper_camera_steps=6, paper_steps=0, **base))
    pc12, _ = run(FitConfig(solver="paper", paper_camera_steps=12, paper_steps=0, **base))
    rows.append(("paper: camera-stage Adam step", diff(pc12, pc6), 6))
    pf6, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=6, **base))
    pf12, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=12, **base))
    rows.append(("paper: fitting-stage Adam step", diff(pf12, pf6), 6))
    rows.append(("paper: first 6 fitting-stage steps (warm-up, capture)", diff(pf6, p0), 6))
    # fast: per LM pass, over early passes (the solver has not stopped yet: every pass runs)
    f1, n1 = run(FitConfig(solver="fast", fast_iterations=2, **base))
    f2, n2 = run(FitConfig(solver="fast", fast_iterations=5, **base))
    if (n1, n2) != (2, 5):
        raise SystemExit(f"the LM stopped early ({n1}, {n2} passes); per-pass counts would be wrong")
    rows.append(("fast: LM pass", diff(f2, f1), 3))
    # what runs inside the graphs: the same steps launched eagerly, with and without the fused kernels
    for fused in (True, False):
        what = "fused kernels" if fused else "P3DMM_FUSED_KERNELS=0"
        e1, _ = run(FitConfig(solver="fast", fast_iterations=2, cuda_graphs=False, **base), fused=fused)
        e2, _ = run(FitConfig(solver="fast", fast_iterations=5, cuda_graphs=False, **base), fused=fused)
        rows.append((f"fast: LM pass, eager ({what})", diff(e2, e1), 3))
        a6, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=6, cuda_graphs=False, **base), fused=fused)
        a12, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=12, cuda_graphs=False, **base), fused=fused)
        rows.append((f"paper: fitting-stage Adam step, eager ({what})", diff(a12, a6), 6))
    f_def, n_def = run(FitConfig(solver="fast", **base))
    rows.append((f"fast: whole fit, default config ({n_def} passes)", f_def, 1))
    f_later, _ = run(FitConfig(solver="fast", **base), later=True)
    rows.append(("fast: whole fit, a later fit in the same process", f_later, 1))
    for B in args.batch:
        fb, nb = run(FitConfig(solver="fast", **base), batch=B)
        rows.append((f"fast: fit_batch B={B}, per image ({nb} passes)", fb, B))
        fb, _ = run(FitConfig(solver="fast", **base), batch=B, later=True)
        rows.append((f"fast: fit_batch B={B}, per image, a later batch", fb, B))

    print(f"GPU code path on the CPU emulation; maps {args.size}^2, render {args.render}^2, synthetic head")
    head = (f"{'stage':<56} {'device ops':>10} {'graph launches':>14} {'.cu kernels':>11} {'syncs':>6} "
            f"{'blocking D2H':>12} {'H2D':>5}")
    print(head)
    print("-" * len(head))
    for name, c, n in rows:
        print(
            f"{name:<56} {c['ops'] / n:>10.0f} {c['graphs'] / n:>14.1f} {c['kernels'] / n:>11.1f} {c['syncs'] / n:>6.1f} "
            f"{c['downloads'] / n:>12.1f} {c['uploads'] / n:>5.1f}"
        )
    print("(per step rows: differences between runs with more and fewer steps, divided by the step count;")
    print(" device ops: operations launched from the host, a graph launch counting one and our .cu kernels")
    print(" counting one each outside graphs; .cu kernels: all runs of them, inside graphs too;")
    print(" eager rows: cuda_graphs=False, so their device ops are the operations a graph of that step holds)")


if __name__ == "__main__":
    main()
