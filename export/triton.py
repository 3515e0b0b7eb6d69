"""A Triton Inference Server model repository for an engine directory.

Layout (Triton's model repository convention)::

    REPO/p3dmm_normals_onnx/config.pbtxt      platform onnxruntime_onnx
    REPO/p3dmm_normals_onnx/1/model.onnx
    REPO/p3dmm_normals_trt/config.pbtxt       platform tensorrt_plan (when a plan exists)
    REPO/p3dmm_normals_trt/1/model.plan
    REPO/p3dmm_uv_onnx/...                    the same for uv
    REPO/p3dmm_predictors/config.pbtxt        platform ensemble: both predictors on one image
    REPO/p3dmm_predictors/1/                  (empty; ensembles have no file)

Every model has ``max_batch_size`` (the export's batch maximum), dims without the batch
axis, ``dynamic_batching`` (preferred sizes: the profile's opt and max) and an
``instance_group`` (ensembles take none). The ensemble uses the TensorRT models when they
exist, else the ONNX ones. The text is written by hand (it is a handful of fields), and
when ``tritonclient`` is installed each file is parsed with Triton's own protobuf schema
before the repository is moved into place (the tests always do).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from p3dmm.fitting.base.errors import EngineError, InputError
from p3dmm.runtime.manifest import ModelEntry, TensorSpec

__all__ = ["ENSEMBLE_NAME", "config_text", "parse_config", "triton_model_name", "write_triton_repo"]

log = logging.getLogger("p3dmm.export")

ENSEMBLE_NAME = "p3dmm_predictors"
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
_SEP = ",\n"
_PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


def triton_model_name(entry: ModelEntry) -> str:
    return f"p3dmm_{entry.task}_{'trt' if entry.kind == 'tensorrt' else 'onnx'}"


def _tensor(t: TensorSpec) -> str:
    dims = ", ".join(str(-1 if d == "batch" else d) for d in t.shape[1:])
    return f'  {{\n    name: "{t.name}"\n    data_type: {_TYPES[t.dtype]}\n    dims: [ {dims} ]\n  }}'


def config_text(entry: ModelEntry, max_batch: int, preferred: list[int], kind: str = "KIND_GPU", count: int = 1) -> str:
    """``config.pbtxt`` of one predictor model."""
    platform, filename = _PLATFORMS[entry.kind]
    pref = ", ".join(str(b) for b in sorted(set(preferred)))
    inputs = _SEP.join(_tensor(t) for t in entry.inputs)
    outputs = _SEP.join(_tensor(t) for t in entry.outputs)
    return (
        f'name: "{triton_model_name(entry)}"\nplatform: "{platform}"\ndefault_model_filename: "{filename}"\n'
        f"max_batch_size: {max_batch}\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {pref} ]\n  max_queue_delay_microseconds: 1000\n}}\n"
        f"instance_group [\n  {{\n    count: {count}\n    kind: {kind}\n  }}\n]\n"
    )


def _ensemble_text(members: list[ModelEntry], max_batch: int) -> str:
    image = members[0].inputs[0]
    outputs = [t for m in members for t in m.outputs]
    steps = []
    for m in members:
        outs = "\n".join(
            f'      output_map {{\n        key: "{t.name}"\n        value: "{t.name}"\n      }}' for t in m.outputs
        )
        steps.append(
            f'    {{\n      model_name: "{triton_model_name(m)}"\n      model_version: -1\n'
            f'      input_map {{\n        key: "{image.name}"\n        value: "{image.name}"\n      }}\n{outs}\n    }}'
        )
    outs_text = _SEP.join(_tensor(t) for t in outputs)
    steps_text = _SEP.join(steps)
    return (
        f'name: "{ENSEMBLE_NAME}"\nplatform: "ensemble"\nmax_batch_size: {max_batch}\n'
        f"input [\n{_tensor(image)}\n]\noutput [\n{outs_text}\n]\n"
        f"ensemble_scheduling {{\n  step [\n{steps_text}\n  ]\n}}\n"
    )


def parse_config(text: str) -> Any:
    """Parse ``config.pbtxt`` text with Triton's ``ModelConfig`` schema (needs ``tritonclient``).

    The schema module is loaded from its file, so grpcio is not needed (only protobuf).

    Raises:
        EngineError: tritonclient is not installed, or the text does not parse.
    """
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("checking Triton configs needs tritonclient: pip install tritonclient")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("_p3dmm_triton_model_config_pb2", path)
    if mod_spec is None or mod_spec.loader is None:
        raise EngineError(f"{path}: Triton's model_config_pb2 not found in tritonclient")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    from google.protobuf import text_format

    try:
        return text_format.Parse(text, module.ModelConfig())
    except text_format.ParseError as e:
        raise EngineError(f"Triton config does not parse: {e}") from e


def write_triton_repo(
    repo: Path,
    engine_dir: Path,
    entries: list[ModelEntry],
    max_batch: int,
    preferred: list[int],
    kind: str = "KIND_GPU",
) -> list[str]:
    """Write (replace) the model repository ``repo`` for the fp32 ONNX and TensorRT entries.

    Returns:
        The model names written.

    Raises:
        InputError: ``repo`` cannot be written.
        EngineError: a config does not parse with Triton's schema (when tritonclient is installed).
    """
    chosen = [m for m in entries if m.precision == "fp32"]
    if not chosen:
        raise EngineError("--triton-repo: no fp32 models to serve")
    check = importlib.util.find_spec("tritonclient") is not None
    try:
        repo.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{repo.name}.", dir=repo.parent))
    except OSError as e:
        raise InputError(f"--triton-repo {repo}: cannot write there ({type(e).__name__}: {e})") from e
    try:
        names = []
        for entry in chosen:
            name = triton_model_name(entry)
            (stage / name / "1").mkdir(parents=True)
            shutil.copyfile(engine_dir / entry.file, stage / name / "1" / _PLATFORMS[entry.kind][1])
            text = config_text(entry, max_batch, preferred, kind)
            if check:
                parse_config(text)
            (stage / name / "config.pbtxt").write_text(text)
            names.append(name)
        members = []
        for task in ("normals", "uv"):
            of_task = [m for m in chosen if m.task == task]
            if of_task:
                members.append(next((m for m in of_task if m.kind == "tensorrt"), of_task[0]))
        if members:
            (stage / ENSEMBLE_NAME / "1").mkdir(parents=True)
            text = _ensemble_text(members, max_batch)
            if check:
                parse_config(text)
            (stage / ENSEMBLE_NAME / "config.pbtxt").write_text(text)
            names.append(ENSEMBLE_NAME)
        old = None
        if repo.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{repo.name}.old.", dir=repo.parent))
            os.replace(repo, old / repo.name)
        os.replace(stage, repo)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("[triton] wrote %s: %s", repo, ", ".join(names))
        return names
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
