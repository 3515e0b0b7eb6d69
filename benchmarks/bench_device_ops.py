"""Device work of the GPU fitting path, counted without a GPU.

Runs ``fit(..., device="cuda")`` on the CPU emulation of CuPy (``tests/device_emulation.py``:
NumPy data, CuPy's rules, the ``.cu`` kernels compiled for the host) and prints, per stage,
how many CuPy operations launch device work (elementwise ops, reductions, gathers, matrix
products, solves; views excluded), how many of our own CUDA kernels run, and how many
times the host would wait for the device (implicit synchronisations, blocking copies).

On a GPU, small fits like this are bound by launch overhead, so the operation count is
the figure to drive down; this script measures counts, not time (there is no GPU here).

    python benchmarks/bench_device_ops.py [--size 256] [--render 128]
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
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    from p3dmm.fitting import (
        Camera,
        FitConfig,
        FlameModel,
        Observation,
        fit,
        render_maps,
    )
    from p3dmm.runtime.demo import demo_params

    from tests.device_emulation import emulated_cuda

    model = FlameModel.synthetic(seed=0)
    params = demo_params(model, seed=7)
    cam = Camera.frontal(distance=1.0, focal=1200.0 * args.size / 512, width=args.size, height=args.size)
    maps = render_maps(model, params, cam, size=args.size, rgb=False)
    obs = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)

    def run(cfg: FitConfig) -> tuple[dict[str, int], int]:
        with tempfile.TemporaryDirectory() as tmp, emulated_cuda(Path(tmp)) as rec:
            r = fit(obs, model, cfg, device="cuda")
            return {
                "ops": rec.ops,
                "kernels": len(rec.host.launches),  # type: ignore[attr-defined]
                "syncs": len(rec.syncs),
                "downloads": rec.downloads,
                "uploads": rec.uploads,
            }, r.iterations

    base = dict(render_size=args.render)
    rows = []
    # paper: marginal cost of an Adam step of each stage; fixed cost with no steps
    p0, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=0, **base))
    rows.append(("prepare + result (no solver steps)", p0, 1))
    pc, _ = run(FitConfig(solver="paper", paper_camera_steps=6, paper_steps=0, **base))
    rows.append(("paper: camera-stage Adam step", {k: pc[k] - p0[k] for k in p0}, 6))
    pf, _ = run(FitConfig(solver="paper", paper_camera_steps=0, paper_steps=6, **base))
    rows.append(("paper: fitting-stage Adam step", {k: pf[k] - p0[k] for k in p0}, 6))
    # fast: per LM pass, over early passes (the solver has not stopped yet: every pass runs)
    f1, n1 = run(FitConfig(solver="fast", fast_iterations=2, **base))
    f2, n2 = run(FitConfig(solver="fast", fast_iterations=5, **base))
    if (n1, n2) != (2, 5):
        raise SystemExit(f"the LM stopped early ({n1}, {n2} passes); per-pass counts would be wrong")
    rows.append(("fast: LM pass", {k: f2[k] - f1[k] for k in f1}, 3))
    f_def, n_def = run(FitConfig(solver="fast", **base))
    rows.append((f"fast: whole fit, default config ({n_def} passes)", f_def, 1))

    print(f"GPU code path on the CPU emulation; maps {args.size}^2, render {args.render}^2, synthetic head")
    head = f"{'stage':<44} {'device ops':>10} {'.cu kernels':>11} {'syncs':>6} {'blocking D2H':>12} {'H2D':>5}"
    print(head)
    print("-" * len(head))
    for name, c, n in rows:
        print(
            f"{name:<44} {c['ops'] / n:>10.0f} {c['kernels'] / n:>11.1f} {c['syncs'] / n:>6.1f} "
            f"{c['downloads'] / n:>12.1f} {c['uploads'] / n:>5.1f}"
        )
    print("(per step rows: differences between runs with more and fewer steps, divided by the step count)")


if __name__ == "__main__":
    main()
