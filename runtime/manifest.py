"""The engine directory's ``manifest.json``: what each model file is, and the checks on load.

``export-engines`` writes it (:mod:`p3dmm.export`); the runtime reads it before it
trusts a file. One entry per model file (``<task>.onnx``, ``<task>.fp16.onnx``,
``<task>.plan``)::

    {"format": "p3dmm-engines", "format_version": 1, "p3dmm_version": "0.1.0",
     "created": "2026-12-01T12:00:00Z",
     "models": [{"name": "normals", "file": "normals.onnx", "task": "normals",
                 "kind": "onnx", "precision": "fp32", "opset": 20,
                 "inputs": [{"name": "image", "shape": ["batch", 3, 512, 512], "dtype": "float32"}],
                 "outputs": [{"name": "normals", "shape": ["batch", 3, 512, 512], "dtype": "float32"}],
                 "normal_space": "camera", "uv_layout": null, "flip_tta": false,
                 "sha256": "...", "source": {"path": "...", "sha256": "...", "format": "p3dmm-train-checkpoint",
                 "config": {...}},
                 "validation": {...}, "tensorrt": null}]}

``tensorrt`` is ``{"version", "compute_capability", "batch": [min, opt, max],
"workspace_bytes", "builder_optimization_level", "from": "<onnx file>"}`` for a plan.
This module is torch-free and imports nothing of the export package.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import EngineError

__all__ = [
    "IMAGE_INPUT",
    "KINDS",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "PRECISIONS",
    "TASKS",
    "Manifest",
    "ModelEntry",
    "TensorSpec",
    "read_manifest",
    "rebuild_command",
    "sha256_file",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "p3dmm-engines"
MANIFEST_VERSION = 1
#: The input tensor of every predictor: (B, 3, 512, 512) float32 RGB in [0, 1].
IMAGE_INPUT = "image"
TASKS = ("normals", "uv")
KINDS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16")
_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape (``"batch"`` for the dynamic batch axis) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TensorSpec:
        return TensorSpec(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))


@dataclass(frozen=True)
class ModelEntry:
    """One model file of an engine directory (see the module docstring for the fields)."""

    name: str
    file: str
    task: str
    kind: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str
    normal_space: str | None = None
    uv_layout: str | None = None
    flip_tta: bool = False
    opset: int | None = None
    source: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    tensorrt: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any], where: str = "manifest") -> ModelEntry:
        try:
            entry = ModelEntry(
                name=str(d["name"]),
                file=str(d["file"]),
                task=str(d["task"]),
                kind=str(d["kind"]),
                precision=str(d["precision"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
                sha256=str(d["sha256"]),
                normal_space=d.get("normal_space"),
                uv_layout=d.get("uv_layout"),
                flip_tta=bool(d.get("flip_tta", False)),
                opset=d.get("opset"),
                source=dict(d.get("source") or {}),
                validation=dict(d.get("validation") or {}),
                tensorrt=d.get("tensorrt"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{where}: a model entry is malformed ({type(e).__name__}: {e})") from e
        for attr, allowed in (("task", TASKS), ("kind", KINDS), ("precision", PRECISIONS)):
            if getattr(entry, attr) not in allowed:
                raise EngineError(f"{where}: model {entry.name!r} has {attr} {getattr(entry, attr)!r}, expected one of {allowed}")
        if entry.kind == "tensorrt" and not entry.tensorrt:
            raise EngineError(f"{where}: TensorRT model {entry.name!r} has no 'tensorrt' record (version, compute capability)")
        return entry


@dataclass
class Manifest:
    """``manifest.json`` of an engine directory."""

    models: list[ModelEntry]
    p3dmm_version: str = ""
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "p3dmm_version": self.p3dmm_version,
             "created": self.created, "models": [m.to_dict() for m in self.models]},
            indent=1,
        ) + "\n"  # fmt: skip

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/manifest.json`` atomically."""
        path = Path(directory) / MANIFEST_NAME
        atomic_write_bytes(path, self.to_json().encode())
        return path

    def find(self, task: str, kind: str | None = None, precision: str | None = None) -> list[ModelEntry]:
        """Entries of ``task`` (optionally of one kind / precision), in manifest order."""
        return [
            m for m in self.models
            if m.task == task and (kind is None or m.kind == kind) and (precision is None or m.precision == precision)
        ]  # fmt: skip

    def verify_file(self, directory: str | os.PathLike[str], entry: ModelEntry, rebuild: str = "") -> Path:
        """Check that ``entry.file`` exists in ``directory`` and has the recorded sha256.

        Raises:
            EngineError: missing file or a different sha256, naming the file and, when
                given, the ``rebuild`` command.
        """
        path = Path(directory) / entry.file
        hint = f"; rebuild with: {rebuild}" if rebuild else ""
        if not path.is_file():
            raise EngineError(f"{path}: listed in {MANIFEST_NAME} but missing{hint}")
        got = sha256_file(path)
        if got != entry.sha256:
            raise EngineError(
                f"{path}: sha256 {got[:16]}... differs from {MANIFEST_NAME}'s {entry.sha256[:16]}... "
                f"(the file was changed, truncated or replaced){hint}"
            )
        return path


def rebuild_command(entry: ModelEntry, out: str | os.PathLike[str] = "DIR") -> str:
    """The ``export-engines`` command that rebuilds ``entry``'s file into ``out`` (for error messages)."""
    flags = [str(entry.source.get("path", "CHECKPOINT")), "--out", str(out)]
    flags += ["--fp16"] if entry.precision == "fp16" else []
    flags += ["--tensorrt"] if entry.kind == "tensorrt" else []
    flags += ["--flip-tta"] if entry.flip_tta else []
    return "export-engines " + " ".join(flags)


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and check ``directory/manifest.json``.

    Raises:
        EngineError: missing, unreadable or malformed manifest, or another format/version.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"{path}: no {MANIFEST_NAME}; an engine directory is written by `export-engines`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EngineError(f"{path}: not a readable JSON manifest ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise EngineError(f"{path}: format {got!r}, expected {MANIFEST_FORMAT!r}")
    if int(data.get("format_version", 0)) > MANIFEST_VERSION:
        raise EngineError(f"{path}: manifest version {data.get('format_version')}, this p3dmm reads up to {MANIFEST_VERSION}")
    models = data.get("models")
    if not isinstance(models, list):
        raise EngineError(f"{path}: 'models' is {type(models).__name__}, expected a list")
    return Manifest(
        models=[ModelEntry.from_dict(m, where=str(path)) for m in models],
        p3dmm_version=str(data.get("p3dmm_version", "")),
        created=str(data.get("created", "")),
    )
