"""Fitting time and accuracy: torch-autograd baseline vs p3dmm's paper and fast solvers.

All three fit the same oracle maps of the synthetic head in one run, from the same
initial state (p3dmm's initialisation from UV correspondences: rigid, then the
non-rigid UV stage):

* ``torch baseline``: the paper's loop written with torch autograd (same energy as
  p3dmm, Adam with the paper's learning rates, the official schedule: 500 camera steps,
  then 800 fitting steps, re-rendering every step). torch only appears in benchmarks
  and tests. Fragments come from p3dmm's rasterizer (the official code's nvdiffrast /
  pytorch3d are not available here), so the baseline pays the same render cost.
* ``p3dmm paper``: the same schedule with analytic gradients on NumPy (or CuPy).
* ``p3dmm fast``: Levenberg-Marquardt with IRLS weights.

Prints time per image, steps, per-step time, posed/neutral vertex error (mm, face
region, similarity-aligned) and speed ratios.

    python benchmarks/bench_fitting.py [--size 512] [--threads 2] [--quick] [--images 1]

``--batch B`` instead times the fast solver on B faces fitted one by one (``fit``) and as
one batch (``fit_batch``), side by side in one run, on NumPy and, where a GPU is usable,
on CuPy (each device's first fit is a warm-up, not timed), and prints ms per image, the
ratio and the largest vertex difference between the two.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="BLAS / torch threads")
    ap.add_argument("--images", type=int, default=1, help="number of random faces to fit")
    ap.add_argument("--quick", action="store_true", help="100 + 200 Adam steps instead of 500 + 800")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--batch", type=int, default=0, help="time fit vs fit_batch on this many faces (see above)")
    ap.add_argument("--repeats", type=int, default=3, help="--batch: timed repeats (the median is printed)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

    import numpy as np
    from p3dmm.fitting import (
        Camera,
        FitConfig,
        FlameModel,
        Observation,
        fit,
        render_maps,
    )
    from p3dmm.fitting.metrics import vertex_errors
    from p3dmm.runtime.demo import demo_params

    if args.batch:
        return batch_rows(args)
    cam_steps, fit_steps = (100, 200) if args.quick else (500, 800)
    model = FlameModel.synthetic(seed=0)
    face = model.masks["face"]
    rows: dict[str, list[tuple[float, int, float, float]]] = {}

    def record(name: str, seconds: float, steps: int, result_v, result_n, gt_v, gt_n) -> None:
        pe = vertex_errors(result_v, gt_v, face)["mean_mm"]
        ne = vertex_errors(result_n, gt_n, face)["mean_mm"]
        rows.setdefault(name, []).append((seconds, steps, pe, ne))

    for i in range(args.images):
        gt = demo_params(model, seed=100 + i)
        cam = Camera.frontal(distance=1.0, focal=1200.0 * args.size / 512, width=args.size, height=args.size)
        maps = render_maps(model, gt, cam, normal_space="camera", rgb=False)
        obs = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask)
        gt_v, gt_n = model.vertices(gt), model.neutral_vertices(gt)
        # p3dmm first: torch's OpenMP threads keep spinning for a while after its loop
        for solver in ("paper", "fast"):
            cfg = FitConfig(solver=solver, paper_camera_steps=cam_steps, paper_steps=fit_steps)
            t0 = time.perf_counter()
            r = fit(obs, model, cfg)
            record(f"p3dmm {solver} (numpy)", time.perf_counter() - t0, r.iterations, r.vertices, r.neutral_vertices, gt_v, gt_n)
        if not args.no_baseline:
            t0 = time.perf_counter()
            v, n, steps = torch_baseline(obs, model, FitConfig(solver="paper", paper_camera_steps=cam_steps, paper_steps=fit_steps), args.threads)
            record("torch baseline (autograd)", time.perf_counter() - t0, steps, v, n, gt_v, gt_n)
        try:
            from p3dmm.fitting.base.xp import cupy_or_raise

            cp = cupy_or_raise()
            for solver in ("paper", "fast"):
                cfg = FitConfig(solver=solver, paper_camera_steps=cam_steps, paper_steps=fit_steps)
                fit(obs, model, cfg, device="cuda")  # warm-up: kernel compilation
                cp.cuda.Device().synchronize()
                t0 = time.perf_counter()
                r = fit(obs, model, cfg, device="cuda")
                record(f"p3dmm {solver} (cupy)", time.perf_counter() - t0, r.iterations, r.vertices, r.neutral_vertices, gt_v, gt_n)
        except Exception as e:  # noqa: BLE001 - no GPU: say so in the table
            rows.setdefault(f"p3dmm cupy: skipped ({type(e).__name__})", [])

    print(f"fitting oracle maps of the synthetic head, {args.size}x{args.size}, {args.images} image(s), "
          f"threads={args.threads}, schedule {cam_steps}+{fit_steps} Adam steps")
    print(f"{'method':<32} {'s/image':>8} {'steps':>6} {'ms/step':>8} {'posed mm':>9} {'neutral mm':>11}")
    means = {}
    order = sorted(rows, key=lambda k: not k.startswith("torch"))
    for name, rs in ((k, rows[k]) for k in order):
        if not rs:
            print(f"{name:<32}")
            continue
        a = np.array(rs, dtype=np.float64)
        means[name] = a.mean(0)
        s, st, pe, ne = a.mean(0)
        print(f"{name:<32} {s:>8.2f} {st:>6.0f} {1e3 * s / st:>8.2f} {pe:>9.3f} {ne:>11.3f}")
    base = means.get("torch baseline (autograd)")
    if base is not None:
        for name in ("p3dmm paper (numpy)", "p3dmm fast (numpy)"):
            m = means[name]
            print(f"{name}: {base[0] / m[0]:.1f}x faster per image than the torch baseline, "
                  f"{(base[0] / base[1]) / (m[0] / m[1]):.1f}x per step")


def batch_rows(args) -> None:
    """``--batch``: serial ``fit`` vs ``fit_batch`` of the same faces, per device."""
    import statistics
    import warnings

    import numpy as np
    from p3dmm.fitting import Camera, FitConfig, FlameModel, Observation, fit, fit_batch, render_maps
    from p3dmm.fitting.base.errors import BackendUnavailableError
    from p3dmm.fitting.base.xp import resolve_device
    from p3dmm.runtime.demo import demo_params

    model = FlameModel.synthetic(seed=0)
    obs = []
    for i in range(args.batch):
        cam = Camera.frontal(distance=1.0, focal=1200.0 * args.size / 512, width=args.size, height=args.size)
        m = render_maps(model, demo_params(model, seed=100 + i), cam, size=args.size, rgb=False)
        obs.append(Observation(normals=m.normals, uv=m.uv, mask=m.mask))
    cfg = FitConfig()
    devices = ["cpu"]
    try:
        resolve_device("cuda")
        devices.append("cuda")
    except BackendUnavailableError as e:
        print(f"(no CuPy rows: {e})")
    print(f"fast solver, {args.batch} faces, maps {args.size}^2, render {cfg.render_size}^2, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'device':<8} {'fit one by one':>16} {'fit_batch':>12} {'ratio':>7} {'max |dv| (m)':>13}")
    warnings.simplefilter("ignore")
    for dev in devices:
        fit(obs[0], model, cfg, device=dev)  # warm-up: kernels, constants, caches
        fit_batch(obs[:2], model, cfg, device=dev)
        t_one, t_batch = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            one = [fit(o, model, cfg, device=dev) for o in obs]
            t_one.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            bat = fit_batch(obs, model, cfg, device=dev)
            t_batch.append(time.perf_counter() - t0)
        a, b = statistics.median(t_one) / args.batch, statistics.median(t_batch) / args.batch
        dv = max(float(np.abs(x.vertices - y.vertices).max()) for x, y in zip(one, bat))
        print(f"{dev:<8} {1e3 * a:>13.1f} ms {1e3 * b:>9.1f} ms {a / b:>6.2f}x {dv:>13.2e}")
    print("(ms per image; ratio > 1: the batch is faster per image)")


def torch_baseline(obs, model, config, threads):  # -> (posed vertices, neutral vertices, steps)
    """The paper's Adam loop on torch autograd from p3dmm's initial state."""
    import dataclasses

    import numpy as np
    import torch
    from p3dmm.fitting.fitter.fast import init_with_uv
    from p3dmm.fitting.fitter.problem import prepare
    from p3dmm.fitting.fitter.state import FitState

    from tests.torch_reference import torch_energy, torch_flame

    torch.set_num_threads(threads)
    problem, state, _ = prepare(obs, model, config, np)
    if config.init_uv_iterations > 0:  # the same start as p3dmm's solvers: fit() runs this after prepare
        state, _ = init_with_uv(problem, state)
    tens = {n: torch.tensor(np.asarray(getattr(state, n)), requires_grad=True) for n in FitState.NAMES}
    lrs = {"shape": config.lr_shape, "expr": config.lr_expr, "pose": config.lr_pose, "t": config.lr_t,
           "log_f": config.lr_log_f, "pp": config.lr_pp}

    def to_state() -> FitState:
        return FitState(*(tens[n].detach().numpy().copy() for n in FitState.NAMES))

    def run(names, steps, weights, camera_stage):
        opt = torch.optim.Adam([{"params": [tens[n]], "lr": lrs[n]} for n in names], betas=(0.9, 0.999), eps=1e-8)
        for _ in range(steps):
            frame = problem.render(to_state())
            opt.zero_grad()
            e = torch_energy(model, *(tens[n] for n in FitState.NAMES), problem.uv, problem.normals, frame, weights,
                             problem.size, focal_prior=problem.focal_prior, pp_prior=problem.pp_prior)
            e.backward()
            if camera_stage:
                tens["pose"].grad[1:] = 0.0
            opt.step()

    run(("pose", "t", "log_f", "pp"), config.paper_camera_steps, dataclasses.replace(config.weights, normal=0.0), True)
    run(FitState.NAMES, config.paper_steps, config.weights, False)
    with torch.no_grad():
        z = torch.zeros(3, dtype=tens["shape"].dtype)
        v = torch_flame(model, tens["shape"], tens["expr"], tens["pose"], z).numpy()
        n = torch_flame(model, tens["shape"], torch.zeros_like(tens["expr"]), torch.zeros_like(tens["pose"]), z).numpy()
    return v, n, config.paper_camera_steps + config.paper_steps


if __name__ == "__main__":
    main()
