"""``export-engines``: checkpoints -> validated ONNX (fp32, fp16) -> TensorRT plans ->
``manifest.json`` -> a Triton model repository.

Per checkpoint, in stages (each logged as ``[stage] ...``):

* ``load``: :func:`~p3dmm.export.sources.load_source` (task, architecture and conventions
  from the file);
* ``export``: ``<task>.onnx`` (:func:`~p3dmm.export.onnx_export.export_onnx`);
* ``validate``: ONNX Runtime against PyTorch on random images and face images;
* ``fp16``: ``<task>.fp16.onnx``, validated against the fp32 ONNX (``--fp16``);
* ``engine``: ``<task>.plan`` (and ``<task>.fp16.plan``) (``--tensorrt``);

then ``manifest.json`` and, with ``--triton-repo``, the ``triton`` stage.

Atomicity: every file is written into a staging directory inside ``--out`` and moved into
place only after every checkpoint passed; the manifest is moved last. A failure removes
the staging directory and leaves ``--out`` as it was. Entries of an existing manifest for
tasks not exported this time are kept (export normals and uv in two runs into one
directory), unless their files are gone.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from p3dmm.fitting.base.errors import EngineError, InputError
from p3dmm.runtime.manifest import (
    MANIFEST_NAME,
    Manifest,
    ModelEntry,
    read_manifest,
    rebuild_command,
    sha256_file,
)

from .onnx_export import DEFAULT_OPSET, convert_fp16, export_onnx, onnx_io
from .sources import ExportSource, load_source
from .tensorrt_build import BuildOptions, build_engine
from .triton import write_triton_repo
from .validate import (
    FP16_TOLERANCES,
    TOLERANCES,
    ValidationReport,
    face_images,
    load_validation_images,
    ort_runner,
    validate,
)

__all__ = ["ExportOptions", "ValidationFailed", "export_engines", "rebuild_command"]

log = logging.getLogger("p3dmm.export")


class ValidationFailed(EngineError):
    """An exported file is outside its tolerances; ``report`` holds every row."""

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExportOptions:
    """What ``export-engines`` does (the CLI's flags).

    Attributes:
        out: the engine directory.
        fp16: also write and validate ``<task>.fp16.onnx``.
        fp16_only: write only the fp16 files (implies ``fp16``): the fp32 graph is still
            exported and validated against PyTorch, and the fp16 one against it, but only
            the fp16 files (and their plans) are kept, for size-limited deployments.
        tensorrt: also build TensorRT plans (needs TensorRT and a GPU).
        batch: ``(min, opt, max)`` batch sizes (TensorRT profile, Triton max_batch_size).
        flip_tta: bake horizontal-flip averaging into the graphs.
        triton_repo: also write a Triton model repository here.
        validate_images: a directory of face crops used for validation instead of
            synthetic renders.
        opset: ONNX opset.
        trusted: allow a full unpickle of official Lightning checkpoints.
        n_random / n_faces: random / synthetic face images per validation.
        build: TensorRT build settings (its batch is replaced by ``batch``).
        tolerances / fp16_tolerances: validation bounds per output.
    """

    out: Path
    fp16: bool = False
    fp16_only: bool = False
    tensorrt: bool = False
    batch: tuple[int, int, int] = (1, 1, 4)
    flip_tta: bool = False
    triton_repo: Path | None = None
    validate_images: Path | None = None
    opset: int = DEFAULT_OPSET
    trusted: bool = False
    n_random: int = 2
    n_faces: int = 2
    build: BuildOptions = field(default_factory=BuildOptions)
    tolerances: dict[str, dict[str, float]] = field(default_factory=lambda: TOLERANCES)
    fp16_tolerances: dict[str, dict[str, float]] = field(default_factory=lambda: FP16_TOLERANCES)


def _torch_runner(module: torch.nn.Module) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
        return {k: v.numpy() for k, v in out.items()}

    return run


def _validation_inputs(options: ExportOptions) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    inputs = {"random": rng.random((options.n_random, 3, 512, 512), dtype=np.float32)}
    if options.validate_images is not None:
        images, names = load_validation_images(options.validate_images)
        inputs[f"images ({len(names)} from {options.validate_images})"] = images
    elif options.n_faces > 0:
        inputs[f"synthetic faces ({options.n_faces})"] = face_images(options.n_faces)
    return inputs


def _entry(source: ExportSource, file: str, kind: str, precision: str, path: Path, io: Any, **kw: Any) -> ModelEntry:
    return ModelEntry(
        name=source.task + (".fp16" if precision == "fp16" else "") + (".trt" if kind == "tensorrt" else ""),
        file=file, task=source.task, kind=kind, precision=precision, inputs=io[0], outputs=io[1],
        sha256=sha256_file(path), normal_space=source.normal_space, uv_layout=source.uv_layout,
        flip_tta=source.flip_tta, source=source.describe(), **kw,
    )  # fmt: skip


def _export_one(source: ExportSource, stage: Path, options: ExportOptions,
                inputs: dict[str, np.ndarray]) -> list[ModelEntry]:  # fmt: skip
    import onnx

    task = source.task
    fp32 = stage / f"{task}.onnx"
    log.info("[export] %s -> %s (opset %d, dynamic batch)", source.path, fp32.name, options.opset)
    export_onnx(source, fp32, options.opset)
    io = onnx_io(onnx.load(str(fp32)))
    log.info("[validate] %s: ONNX Runtime CPU vs PyTorch on %s", fp32.name, ", ".join(inputs))
    torch_run = _torch_runner(source.module)
    ort32 = ort_runner(fp32)
    report = validate(fp32.name, ort32, torch_run, inputs, options.tolerances, "pytorch")
    entries = [_entry(source, fp32.name, "onnx", "fp32", fp32, io, opset=options.opset,
                      validation={"against": "pytorch", "worst": report.summary(), "tolerances": options.tolerances})]  # fmt: skip
    if options.fp16 or options.fp16_only:
        fp16 = stage / f"{task}.fp16.onnx"
        log.info("[fp16] %s -> %s (LayerNorm, Softmax, attention scores and the output tail in float32)",
                 fp32.name, fp16.name)  # fmt: skip
        info = convert_fp16(fp32, fp16)
        info["fp32_against_pytorch"] = report.summary()
        sub = validate(fp16.name, ort_runner(fp16), ort32, inputs, options.fp16_tolerances, "fp32 onnx")
        report.rows.extend(sub.rows)
        entries.append(_entry(source, fp16.name, "onnx", "fp16", fp16, io, opset=options.opset,
                              validation={"against": "fp32 onnx", "worst": sub.summary(),
                                          "tolerances": options.fp16_tolerances, **info}))  # fmt: skip
    if not report.passed:
        raise ValidationFailed(
            f"{source.path}: validation failed (rows marked NO are outside their tolerances):\n{report.table()}", report
        )
    for line in report.table().splitlines():
        log.info("[validate]   %s", line)
    if options.tensorrt:
        build = replace(options.build, batch=options.batch,
                        timing_cache=options.build.timing_cache or options.out / "timing.cache")  # fmt: skip
        for onnx_entry in list(entries):
            plan = stage / onnx_entry.file.replace(".onnx", ".plan")
            record = build_engine(stage / onnx_entry.file, plan, io, build)
            log.info("[engine] %s: TensorRT %s, compute capability %s", plan.name, record["version"], record["compute_capability"])
            entries.append(_entry(source, plan.name, "tensorrt", onnx_entry.precision, plan, io, opset=options.opset,
                                  tensorrt=record, validation={"against": "not validated: no TensorRT runner in the export "
                                                               "(the runtime compares it with ONNX Runtime on load)"}))  # fmt: skip
    return entries


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({type(e).__name__}: {e})") from e


def export_engines(checkpoints: list[str | os.PathLike[str]], options: ExportOptions) -> Manifest:
    """Export every checkpoint into ``options.out`` (see the module docstring).

    Returns:
        The manifest written.

    Raises:
        ModelFileError: a checkpoint is missing, corrupt or of an unknown kind.
        InputError: bad options, two checkpoints of one task, an unwritable ``--out``.
        ValidationFailed: an exported file is outside its tolerances (nothing is written).
        EngineError / BackendUnavailableError: export, fp16 or TensorRT failed.
    """
    if not checkpoints:
        raise InputError("export-engines: give at least one CHECKPOINT")
    lo, opt, hi = options.batch
    if not 1 <= lo <= opt <= hi:
        raise InputError(f"--batch {lo},{opt},{hi}: need 1 <= MIN <= OPT <= MAX")
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a directory")
    sources: list[ExportSource] = []
    for ckpt in checkpoints:
        log.info("[load] %s", ckpt)
        src = load_source(ckpt, flip_tta=options.flip_tta, trusted=options.trusted)
        log.info("[load] %s: %s %s checkpoint (%s)", Path(ckpt).name, src.format, src.task,
                 src.config.get("backbone", "?"))  # fmt: skip
        if any(s.task == src.task for s in sources):
            raise InputError(f"export-engines: two {src.task} checkpoints given ({sources[0].path} and {ckpt}); give one per task")
        sources.append(src)
    inputs = _validation_inputs(options)
    stage = _prepare_out(out)
    try:
        entries: list[ModelEntry] = []
        for src in sources:
            entries.extend(_export_one(src, stage, options, inputs))
        if options.fp16_only:
            entries = [e for e in entries if e.precision == "fp16"]
        exported = {e.task for e in entries}
        kept: list[ModelEntry] = []
        if (out / MANIFEST_NAME).is_file():
            try:
                old = read_manifest(out)
                kept = [m for m in old.models if m.task not in exported and (out / m.file).is_file()]
            except EngineError as e:
                log.warning("[manifest] ignoring the existing %s: %s", out / MANIFEST_NAME, e)
        try:
            version = metadata.version("p3dmm")
        except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
            version = "unknown"
        manifest = Manifest(models=kept + entries, p3dmm_version=version,
                            created=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))  # fmt: skip
        manifest.write(stage)
        for entry in entries:
            os.replace(stage / entry.file, out / entry.file)
        os.replace(stage / MANIFEST_NAME, out / MANIFEST_NAME)
        log.info("[manifest] %s: %s", out / MANIFEST_NAME, ", ".join(m.file for m in manifest.models))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if options.triton_repo is not None:
        write_triton_repo(Path(options.triton_repo), out, manifest.models, hi, [opt, hi])
    return manifest
