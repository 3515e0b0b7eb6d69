"""``p3dmm demo``: the whole pipeline on the embedded predictors, with the ground truth beside it.

Three modes:

* default: a held-out synthetic face photo (an identity, expression and appearance drawn
  from a random stream the training data never used) is rendered at 512 x 512 with its
  exact normal, UV and mask maps. The embedded predictors (``runtime/engines``) run on the
  photo through the runtime (:meth:`Reconstructor.default`), the maps are fitted, and the
  Reconstruction outputs are written next to the ground-truth maps. Printed: the map
  errors (normal angle, UV distance, mask IoU), the mesh error of the fit from predicted
  maps next to the fit from the oracle (ground-truth) maps of the same photo, and per-stage
  timings.
* ``--oracle``: no network; the oracle maps are fitted with the chosen solvers (the fitter
  alone, labelled as such).
* ``--image PATH``: a user's photo through the embedded predictors (face detection,
  crop, predict, fit, save); there is no ground truth, so the fit's own quality is printed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from p3dmm.fitting import Camera, FitConfig, FlameModel, FlameParams, Observation, fit, render_maps
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.camera import FLAME_TO_OPENCV
from p3dmm.fitting.base.errors import InputError
from p3dmm.fitting.base.mesh_io import save_mesh
from p3dmm.fitting.metrics import map_errors, vertex_errors

from .images import normals_to_rgb, overlay_mesh, save_png, uv_to_rgb

log = logging.getLogger("p3dmm.demo")

__all__ = ["DEMO_STREAM", "demo_camera", "demo_params", "run_demo"]

#: First entry of the demo's random streams. The training data uses ``[seed, i]`` with
#: small seeds (0 train, 1 validation), so ``[DEMO_STREAM, seed]`` is never one of them.
DEMO_STREAM = 7_000_000


def demo_params(model: FlameModel, seed: int) -> FlameParams:
    """Ground-truth parameters of the demo face: a random identity (all components ~ N(0, 1)),
    a random expression (50 components ~ N(0, 0.8)), the mouth slightly open, the eyes
    turned a little, the head turned 25 degrees."""
    rng = np.random.default_rng([DEMO_STREAM, seed])
    p = model.zero_params()
    p.shape = rng.normal(size=model.n_shape).astype(np.float32)
    expr = np.zeros(model.n_expr)
    expr[:50] = np.clip(rng.normal(size=50) * 0.8, -2.4, 2.4)
    p.expr = expr.astype(np.float32)
    p.pose[0] = np.radians([5.0, 25.0, 3.0])
    p.pose[2] = [0.12, 0.0, 0.0]
    p.pose[3] = p.pose[4] = [0.05, -0.1, 0.0]
    return p


def demo_camera(model: FlameModel, params: FlameParams, size: int, fill: float = 0.58, focal: float = 3.0) -> Camera:
    """A camera framing the face region like the runtime's crop of a detection: the face's
    projected box ``fill * size`` pixels wide, centred, focal length ``focal * size``."""
    pts = np.asarray(model.vertices(params), np.float64)
    face = model.masks.get("face")
    if face is not None and len(face):
        pts = pts[np.asarray(face)]
    f = focal * size
    R = FLAME_TO_OPENCV.astype(np.float64)
    centre = 0.5 * (pts.min(0) + pts.max(0))
    shift = np.zeros(2)
    dist = 1.0
    for _ in range(4):  # distance for the box size, sideways shift for its centre
        cam = (pts - centre) @ R.T + np.array([shift[0], shift[1], dist])
        uv = f * cam[:, :2] / cam[:, 2:3]
        side = float(np.max(uv.max(0) - uv.min(0)))
        mid = 0.5 * (uv.max(0) + uv.min(0))
        shift -= mid * dist / f
        dist *= side / (fill * size)
    t = -R @ centre + np.array([shift[0], shift[1], dist])
    c = (size - 1) / 2
    return Camera(focal=np.float32(f), principal=np.array([c, c], np.float32), R=R.astype(np.float32),
                  t=t.astype(np.float32), width=size, height=size)  # fmt: skip


def _half(img: np.ndarray) -> np.ndarray:
    """2x2 mean downsample of an ``(H, W, 3) uint8`` image."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    x = img[:h, :w].astype(np.float32).reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def _grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tile equal-size RGB images (a 4 px white gutter)."""
    h, w = rows[0][0].shape[:2]
    g = 4
    out = np.full((len(rows) * (h + g) - g, len(rows[0]) * (w + g) - g, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            out[i * (h + g) : i * (h + g) + h, j * (w + g) : j * (w + g) + w] = im
    return out


def _mesh_row(result: Any, model: FlameModel, gt: FlameParams, face: Any) -> dict[str, float]:
    posed = vertex_errors(result.vertices, model.vertices(gt), face)
    neutral = vertex_errors(result.neutral_vertices, model.neutral_vertices(gt), face)
    return {"posed_mm": posed["mean_mm"], "neutral_mm": neutral["mean_mm"]}


def run_demo(out_dir: str = "demo_out", seed: int = 0, size: int = 512, solvers: Sequence[str] = ("fast",),
             oracle: bool = False, image: str | None = None, box: Any = None,
             engines: str | None = None) -> int:  # fmt: skip
    """Run one of the demo's modes (see the module docstring); returns the exit code."""
    for s in solvers:
        if s not in ("fast", "paper"):
            raise InputError(f"demo: unknown solver {s!r}; expected 'fast' and/or 'paper'")
    if not solvers:
        raise InputError("demo: --solvers is empty; expected 'fast' and/or 'paper'")
    if image is not None and oracle:
        raise InputError("demo: --image and --oracle exclude each other (a photo has no oracle maps)")
    if size != 512 and not oracle:
        raise InputError(f"demo: --size {size} needs --oracle; the predictors' crops are 512 x 512")
    if image is not None:
        return _run_image(out_dir, image, box, solvers[0], engines)
    if oracle:
        return _run_oracle(out_dir, seed, size, solvers)
    return _run_predicted(out_dir, seed, solvers, engines)


def _reconstructor(engines: str | None, solver: str, detector: Any) -> Any:
    from .reconstruct import Reconstructor

    kwargs = {"config": FitConfig(solver=solver), "detector": detector, "backend": "auto", "device": "auto"}
    return Reconstructor.from_engines(engines, **kwargs) if engines else Reconstructor.default(**kwargs)


def _run_image(out_dir: str, image: str, box: Any, solver: str, engines: str | None) -> int:
    t0 = time.perf_counter()
    rec = _reconstructor(engines, solver, "auto" if box is None else None)
    t_load = time.perf_counter() - t0
    r = rec.reconstruct(image, box=box)
    t0 = time.perf_counter()
    r.save(out_dir)
    t_save = time.perf_counter() - t0
    q = r.fit.quality
    print(f"p3dmm demo --image {image}: face box {tuple(round(v) for v in r.box)}, crop {r.crop}")
    print(f"embedded predictors: {os.path.basename(rec.normals.entry.file)}, {os.path.basename(rec.uv.entry.file)} "
          f"({rec.normals.name}); trained on synthetic heads only, so expect rough maps on a real photo")  # fmt: skip
    print(f"fit ({solver}): confidence {q.get('confidence', 0.0):.2f}, uv_explained {q.get('uv_explained', 0.0):.2f}, "
          f"normal_agreement {q.get('normal_agreement', 0.0):.2f}, converged {r.fit.converged}")  # fmt: skip
    for issue in r.fit.issues:
        print(f"  issue: {issue}")
    stages = {"load": t_load, **{k: v for k, v in r.timings.items() if k not in ("total", "batch_total")}, "save": t_save}
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    print(f"wrote {out_dir}/: posed.obj neutral.obj posed.ply texture.png overlay.png crop.png normals.png uv.png "
          "mask.png params.npz camera.json report.json")  # fmt: skip
    return 0


def _run_predicted(out_dir: str, seed: int, solvers: Sequence[str], engines: str | None) -> int:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    model = FlameModel.synthetic(seed=0)
    times["model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    rec = _reconstructor(engines, solvers[0], None)
    times["load engines"] = time.perf_counter() - t0
    gt = demo_params(model, seed)
    camera = demo_camera(model, gt, 512)
    t0 = time.perf_counter()
    maps = render_maps(model, gt, camera, normal_space="camera", rgb=True, rng=np.random.default_rng([DEMO_STREAM, seed, 1]))
    times["render"] = time.perf_counter() - t0
    photo = maps.rgb if maps.rgb is not None else normals_to_rgb(maps.normals, maps.coverage)
    out = Path(out_dir)
    r = rec.reconstruct(photo, box="full")
    times.update(predict=r.timings["predict"], fit=r.timings["fit"])
    t0 = time.perf_counter()
    r.save(out / "predicted")
    times["save"] = time.perf_counter() - t0
    gt_dir = out / "ground_truth"
    gt_dir.mkdir(parents=True, exist_ok=True)
    save_png(out / "image.png", photo)
    save_png(gt_dir / "normals.png", normals_to_rgb(maps.normals, maps.mask))
    save_png(gt_dir / "uv.png", uv_to_rgb(maps.uv, maps.mask))
    save_png(gt_dir / "mask.png", (maps.mask * 255).astype(np.uint8))
    face = model.masks.get("face")
    errs = map_errors(r.maps, {"normals": maps.normals, "uv": maps.uv, "mask": maps.mask})
    fits = {f"predicted maps, {solvers[0]}": (r.fit, _mesh_row(r.fit, model, gt, face))}
    predicted = Observation(normals=r.maps["normals"], uv=r.maps["uv"], mask=r.maps["mask"], normal_space="camera")
    for solver in solvers[1:]:  # the Reconstructor ran the first one
        t0 = time.perf_counter()
        res = fit(predicted, model, FitConfig(solver=solver, check_conventions=False))
        times[f"fit ({solver})"] = time.perf_counter() - t0
        save_mesh(out / "predicted" / f"posed_{solver}.obj", res.vertices, model.faces, uv=model.uv)
        fits[f"predicted maps, {solver}"] = (res, _mesh_row(res, model, gt, face))
    oracle = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask, normal_space="camera")
    for solver in solvers:
        t0 = time.perf_counter()
        res = fit(oracle, model, FitConfig(solver=solver))
        times[f"oracle fit ({solver})"] = time.perf_counter() - t0
        save_mesh(gt_dir / f"oracle_fit_{solver}.obj", res.vertices, model.faces, uv=model.uv)
        fits[f"oracle maps, {solver}"] = (res, _mesh_row(res, model, gt, face))
    save_mesh(gt_dir / "posed.obj", model.vertices(gt), model.faces, uv=model.uv)
    save_mesh(gt_dir / "neutral.obj", model.neutral_vertices(gt), model.faces, uv=model.uv)
    pm = r.maps["mask"]
    grid = _grid([
        [_half(photo), _half(normals_to_rgb(maps.normals, maps.mask)), _half(uv_to_rgb(maps.uv, maps.mask))],
        [_half(overlay_mesh(photo, r.vertices, r.faces, r.camera_image)), _half(normals_to_rgb(r.maps["normals"], pm)),
         _half(uv_to_rgb(r.maps["uv"], pm))],
    ])  # fmt: skip
    save_png(out / "comparison.png", grid)
    report = {
        "mode": "predicted", "seed": seed, "engines": rec.engines, "backend": rec.normals.name,
        "files": [rec.normals.entry.file, rec.uv.entry.file], "map_errors": errs,
        "fits": {name: {**row, "passes": res.iterations, "confidence": res.quality.get("confidence"),
                        "seconds": res.timings["total"]} for name, (res, row) in fits.items()},
        "timings": times, "ground_truth": {"params": gt.to_dict(), "camera": camera.to_dict()},
    }  # fmt: skip
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1, default=float) + "\n").encode())

    print(f"p3dmm demo: a held-out synthetic face photo (seed {seed}; identity, expression and appearance from a "
          "random stream the training data never used), 512x512")  # fmt: skip
    print(f"embedded predictors {rec.normals.entry.file} + {rec.uv.entry.file} on {rec.normals.name} -> fit\n")
    print("maps vs ground truth (face region):")
    print(f"  normals: {errs['normal_mean_deg']:.1f} deg mean, {errs['normal_median_deg']:.1f} deg median")
    print(f"  uv:      {errs['uv_mean_px']:.1f} px mean, {errs['uv_median_px']:.1f} px median (|du| x 512)")
    print(f"  mask:    IoU {errs['mask_iou']:.3f}\n")
    print(f"{'fit':<24} {'posed err (mm)':>15} {'neutral err (mm)':>17} {'passes':>7} {'confidence':>11} {'time (s)':>9}")
    for name, (res, row) in fits.items():
        print(f"{name:<24} {row['posed_mm']:>15.3f} {row['neutral_mm']:>17.3f} {res.iterations:>7d} "
              f"{res.quality.get('confidence', 0.0):>11.2f} {res.timings['total']:>9.2f}")  # fmt: skip
    print("errors: mean vertex distance over the face region after similarity alignment")
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    print(f"wrote {out_dir}/: image.png comparison.png report.json, predicted/ (the Reconstruction: meshes, texture, "
          "overlay, predicted maps), ground_truth/ (maps, meshes, oracle fits)")  # fmt: skip
    return 0


def _run_oracle(out_dir: str, seed: int, size: int, solvers: Sequence[str]) -> int:
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.perf_counter()
    model = FlameModel.synthetic(seed=0)
    t_model = time.perf_counter() - t0
    gt = demo_params(model, seed)
    camera = demo_camera(model, gt, size)
    maps = render_maps(model, gt, camera, normal_space="camera", rgb=True, rng=np.random.default_rng([DEMO_STREAM, seed, 1]))
    image = maps.rgb if maps.rgb is not None else normals_to_rgb(maps.normals, maps.coverage)
    save_png(os.path.join(out_dir, "image.png"), image)
    save_png(os.path.join(out_dir, "normals.png"), normals_to_rgb(maps.normals, maps.coverage))
    save_png(os.path.join(out_dir, "uv.png"), uv_to_rgb(maps.uv, maps.coverage))
    save_png(os.path.join(out_dir, "mask.png"), (maps.mask * 255).astype(np.uint8))
    obs = Observation(normals=maps.normals, uv=maps.uv, mask=maps.mask, normal_space="camera")
    face = model.masks.get("face")

    print(f"p3dmm demo --oracle: synthetic FLAME-format head ({model.n_vertices} vertices) built in {t_model:.2f} s")
    print(f"fitting ORACLE maps rendered at {size}x{size} (normals + UV + face mask; no predictor network)")
    report: dict = {"mode": "oracle", "oracle_maps": True, "size": size, "seed": seed, "solvers": {}}
    rows = []
    for solver in solvers:
        result = fit(obs, model, FitConfig(solver=solver))
        sub = os.path.join(out_dir, solver)
        os.makedirs(sub, exist_ok=True)
        save_mesh(os.path.join(sub, "posed.obj"), result.vertices, model.faces, uv=model.uv)
        save_mesh(os.path.join(sub, "neutral.obj"), result.neutral_vertices, model.faces, uv=model.uv)
        save_mesh(os.path.join(sub, "posed.ply"), result.vertices, model.faces)
        save_png(os.path.join(sub, "overlay.png"), overlay_mesh(image, result.vertices, model.faces, result.camera))
        posed = vertex_errors(result.vertices, model.vertices(gt), face)
        neutral = vertex_errors(result.neutral_vertices, model.neutral_vertices(gt), face)
        report["solvers"][solver] = {"posed_error_mm": posed, "neutral_error_mm": neutral,
                                     "params": result.params.to_dict(), "camera": result.camera.to_dict(),
                                     **result.report}  # fmt: skip
        rows.append((solver, posed["mean_mm"], neutral["mean_mm"], result.iterations, result.timings["total"]))
    report["ground_truth"] = {"params": gt.to_dict(), "camera": camera.to_dict()}
    atomic_write_bytes(os.path.join(out_dir, "report.json"), (json.dumps(report, indent=1) + "\n").encode())

    print(f"{'solver':<8} {'posed err (mm)':>15} {'neutral err (mm)':>17} {'iterations':>11} {'time (s)':>9}")
    for solver, pe, ne, it, t in rows:
        print(f"{solver:<8} {pe:>15.3f} {ne:>17.3f} {it:>11d} {t:>9.2f}")
    print("errors: mean vertex distance over the face region after similarity alignment")
    print(f"wrote {out_dir}/: image.png normals.png uv.png mask.png report.json, <solver>/posed.obj neutral.obj posed.ply overlay.png")
    return 0
