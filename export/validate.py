"""Validation of exported files with ONNX Runtime against a reference, per output.

Inputs: seeded random images (uniform in [0, 1]) and face images: synthetic renders of
the FLAME-format head by default (photo-like, at several yaws), or a directory of the
user's own 512 px face crops (``--validate-images``). Statistics per output: max / mean
absolute error; for normals the angle between the two unit vectors (mean / max degrees);
for UV the distance in pixels of a 512 px map (mean / max). A file passes when every
statistic is within its :data:`TOLERANCES` (fp32 vs PyTorch) or
:data:`FP16_TOLERANCES` (fp16 vs the fp32 ONNX, both on ONNX Runtime CPU).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from p3dmm.fitting.base.errors import EngineError, InputError

__all__ = [
    "FP16_TOLERANCES",
    "TOLERANCES",
    "ValidationReport",
    "compare_outputs",
    "face_images",
    "load_validation_images",
    "ort_runner",
    "validate",
]

log = logging.getLogger("p3dmm.export")

#: fp32 ONNX vs PyTorch (both float32 on the CPU: only summation order differs).
TOLERANCES: dict[str, dict[str, float]] = {
    "normals": {"max_abs": 1e-3, "mean_deg": 0.01, "max_deg": 0.1},
    "uv": {"max_abs": 1e-3, "mean_px": 0.005, "max_px": 0.1},
    "mask": {"max_abs": 1e-3},
}
#: fp16 ONNX vs fp32 ONNX (half-precision activations: what fp16 costs).
FP16_TOLERANCES: dict[str, dict[str, float]] = {
    "normals": {"mean_deg": 0.5, "max_deg": 5.0},
    "uv": {"mean_px": 0.5, "max_px": 5.0},
    "mask": {"max_abs": 0.02},
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def compare_outputs(name: str, ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Statistics of ``got`` against ``ref`` for output ``name`` (``(B, C, H, W)`` float arrays)."""
    ref = np.asarray(ref, np.float64)
    got = np.asarray(got, np.float64)
    if ref.shape != got.shape:
        raise EngineError(f"output {name!r}: shape {got.shape}, expected {ref.shape}")
    diff = np.abs(got - ref)
    stats = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    if name == "normals":
        cos = (ref * got).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
        deg = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
        stats.update(mean_deg=float(deg.mean()), max_deg=float(deg.max()))
    elif name == "uv":
        px = np.linalg.norm(got - ref, axis=1) * ref.shape[-1]
        stats.update(mean_px=float(px.mean()), max_px=float(px.max()))
    if not all(math.isfinite(v) for v in stats.values()):
        stats = {k: (v if math.isfinite(v) else float("inf")) for k, v in stats.items()}
    return stats


@dataclass
class ValidationReport:
    """Rows ``{"file", "against", "inputs", "output", stats..., "passed"}`` and the verdict."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r["passed"] for r in self.rows)

    def table(self) -> str:
        """A plain-text table of every row (what a failed export prints)."""
        cols = ["file", "against", "inputs", "output", "max_abs", "mean_abs", "mean_deg", "max_deg", "mean_px",
                "max_px", "passed"]  # fmt: skip
        cells = [cols] + [[_cell(r.get(c)) for c in cols] for r in self.rows]
        widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)

    def summary(self) -> dict[str, dict[str, float]]:
        """Worst value of each statistic per output (for the manifest)."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            d = out.setdefault(r["output"], {})
            for k, v in r.items():
                if isinstance(v, float):
                    d[k] = max(d.get(k, 0.0), v)
        return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def face_images(n: int = 3, seed: int = 0) -> np.ndarray:
    """``(n, 3, 512, 512) float32`` photo-like renders of the synthetic head (yaw -40..40)."""
    from p3dmm.fitting import Camera, FlameModel, render_maps

    model = FlameModel.synthetic(seed=0)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        p = model.zero_params()
        p.shape = (rng.normal(size=model.n_shape) * 0.8).astype(np.float32)
        p.expr = (rng.normal(size=model.n_expr) * 0.6).astype(np.float32)
        yaw = -40.0 + 80.0 * i / max(n - 1, 1)
        p.pose[0] = np.radians([5.0, yaw, 0.0]).astype(np.float32)
        cam = Camera.frontal(distance=1.0, focal=1200.0, width=512, height=512)
        maps = render_maps(model, p, cam, rgb=True, rng=rng)
        out.append(np.asarray(maps.rgb, np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out).astype(np.float32)


def load_validation_images(directory: str | os.PathLike[str], limit: int = 8) -> tuple[np.ndarray, list[str]]:
    """Face crops from ``directory`` as ``(n, 3, 512, 512) float32`` in [0, 1] (resized to 512).

    Raises:
        InputError: not a directory, no images in it, or a file that is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    d = Path(directory)
    if not d.is_dir():
        raise InputError(f"--validate-images: {d} is not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--validate-images: {d} holds no images ({', '.join(_IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                rgb = im.convert("RGB").resize((512, 512), Image.Resampling.BICUBIC)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"--validate-images: {f} is not a readable image ({e})") from e
        out.append(np.asarray(rgb, np.float32).transpose(2, 0, 1) / 255.0)
    return np.stack(out), [f.name for f in files]


def ort_runner(path: Path) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """An ONNX Runtime CPU session of ``path`` as ``image batch -> {output: array}``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise EngineError("validation needs onnxruntime: pip install 'p3dmm[onnx]'") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EngineError(f"{path}: ONNX Runtime cannot load it ({type(e).__name__}: {e})") from e
    names = [o.name for o in sess.get_outputs()]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(names, sess.run(names, {"image": np.ascontiguousarray(x, np.float32)})))

    return run


def validate(
    file: str,
    run: Callable[[np.ndarray], dict[str, np.ndarray]],
    reference: Callable[[np.ndarray], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    tolerances: dict[str, dict[str, float]],
    against: str,
    report: ValidationReport | None = None,
) -> ValidationReport:
    """Compare ``run`` with ``reference`` on each input set; one row per (input set, output).

    Args:
        file: the validated file's name (for the table).
        run / reference: image batch -> outputs.
        inputs: input-set name -> ``(B, 3, 512, 512)`` batch.
        tolerances: per output, statistic -> upper bound.
        against: what ``reference`` is (``"pytorch"``, ``"fp32 onnx"``).
        report: add the rows to this report.
    """
    report = report if report is not None else ValidationReport()
    for set_name, x in inputs.items():
        ref, got = reference(x), run(x)
        for out_name, ref_out in ref.items():
            if out_name not in got:
                raise EngineError(f"{file}: no output {out_name!r} (has {sorted(got)})")
            stats = compare_outputs(out_name, ref_out, got[out_name])
            limits = tolerances.get(out_name, {})
            passed = all(stats.get(k, 0.0) <= v for k, v in limits.items())
            report.rows.append({"file": file, "against": against, "inputs": set_name, "output": out_name, **stats,
                                "passed": passed})  # fmt: skip
            log.debug("validate %s vs %s on %s: %s %s", file, against, set_name, out_name, stats)
    return report
