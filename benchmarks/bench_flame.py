"""FLAME forward and forward+VJP time on CPU (and GPU when CuPy has a device).

Prints one table; the torch-autograd baseline (same math, torch only in benchmarks)
runs in the same process so ratios are side by side.

    python benchmarks/bench_flame.py [--repeats 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os

from _timing import median_ms  # benchmarks/_timing.py (scripts run from benchmarks/)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="BLAS/torch threads (default 1)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(args.threads))

    import numpy as np
    from p3dmm.fitting import FlameModel, FlameParams
    from p3dmm.fitting.model.lbs import flame_forward, flame_vjp

    try:
        model = FlameModel.synthetic(seed=0)
        source = model.name
    except (ImportError, NotImplementedError):  # pragma: no cover - before the synthetic head exists
        import sys

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from tests.fitting.flame_fixtures import random_flame_model

        model = random_flame_model(V=5023, F=9976, n_shape=300, n_expr=100, dtype=np.float32)
        source = "random FLAME-size arrays"
    rng = np.random.default_rng(0)
    params = FlameParams(
        shape=rng.normal(size=300).astype(np.float32),
        expr=rng.normal(size=100).astype(np.float32),
        pose=rng.normal(scale=0.2, size=(5, 3)).astype(np.float32),
        transl=np.zeros(3, np.float32),
    )
    g = rng.normal(size=(model.n_vertices, 3)).astype(np.float32)

    def fwd() -> object:
        return flame_forward(model, params)[0]

    def fwd_vjp() -> object:
        v, cache = flame_forward(model, params)
        return flame_vjp(model, cache, g)

    rows = [("p3dmm numpy float32", "cpu", median_ms(fwd, args.repeats), median_ms(fwd_vjp, args.repeats))]

    try:
        import torch

        torch.set_num_threads(args.threads)
        sys_path_added = os.path.join(os.path.dirname(__file__), "..")
        import sys

        sys.path.insert(0, sys_path_added)
        from tests.torch_reference import torch_flame

        tp = [torch.tensor(np.asarray(getattr(params, n)), requires_grad=True) for n in ("shape", "expr", "pose", "transl")]
        tg = torch.as_tensor(g)

        def t_fwd() -> object:
            with torch.no_grad():
                return torch_flame(model, *tp)

        def t_fwd_bwd() -> object:
            for t in tp:
                t.grad = None
            (torch_flame(model, *tp) * tg).sum().backward()
            return tp[0].grad

        rows.append(("torch autograd float32", "cpu", median_ms(t_fwd, args.repeats), median_ms(t_fwd_bwd, args.repeats)))
    except ImportError:
        rows.append(("torch autograd (not installed)", "cpu", float("nan"), float("nan")))

    try:
        from p3dmm.fitting.base.xp import cupy_or_raise

        cp = cupy_or_raise()
        gm = model.to("cuda")
        gp = params.astype(cp, np.float32)
        gg = cp.asarray(g)
        sync = cp.cuda.Device().synchronize

        def g_fwd() -> object:
            return flame_forward(gm, gp)[0]

        def g_fwd_vjp() -> object:
            v, cache = flame_forward(gm, gp)
            return flame_vjp(gm, cache, gg)

        rows.append(("p3dmm cupy float32", "cuda", median_ms(g_fwd, args.repeats, sync=sync), median_ms(g_fwd_vjp, args.repeats, sync=sync)))
    except Exception as e:  # noqa: BLE001 - no GPU here
        rows.append((f"p3dmm cupy (skipped: {type(e).__name__})", "cuda", float("nan"), float("nan")))

    print(f"FLAME forward / forward+VJP, model: {source}, V={model.n_vertices}, "
          f"{model.n_shape}+{model.n_expr} components, threads={args.threads}, median of {args.repeats}")
    print(f"{'implementation':<40} {'device':<6} {'forward ms':>11} {'fwd+vjp ms':>11}")
    for name, dev, f, fb in rows:
        print(f"{name:<40} {dev:<6} {f:>11.3f} {fb:>11.3f}")
    base = rows[1]
    if base[2] == base[2]:
        print(f"speed-up vs torch autograd: forward {base[2] / rows[0][2]:.1f}x, forward+vjp {base[3] / rows[0][3]:.1f}x")


if __name__ == "__main__":
    main()
