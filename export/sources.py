"""What ``export-engines`` exports: a checkpoint read into a module with the predictor contract.

Two kinds of checkpoint are accepted; the kind, task, backbone and head are read from the
file:

* a ``p3dmm train`` checkpoint (``format: "p3dmm-train-checkpoint"``): a
  :class:`~p3dmm.training.networks.Predictor`, whose graph already contains the
  normalisation, the 512 -> 448 resample and the output activations; its normal space
  and UV layout id are those of its training data;
* an official Pixel3DMM Lightning checkpoint (``state_dict`` with ``net.``-prefixed keys,
  or a bare network state dict): an :class:`~p3dmm.training.official.OfficialNetwork`
  with its position embedding baked for 512 px, wrapped in
  :class:`~p3dmm.training.official.OfficialPredictor`; the official conventions stay
  (head-space normals, ``uv = clamp((x + 1) / 2)``; UV layout ``"flame2020"``).

``flip_tta`` bakes the official horizontal-flip averaging into the graph (the model runs on
the batch and its mirror, 2B images). For p3dmm normals it is the same rule (mirror back,
negate x); a p3dmm UV predictor is refused, since mirroring UV needs the layout's mirror
map rather than the official ``u -> -u + 0.015``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from p3dmm.fitting.base.errors import InputError, ModelFileError
from p3dmm.runtime.manifest import TASKS, sha256_file
from p3dmm.training.checkpoint import CHECKPOINT_FORMAT, check_checkpoint
from p3dmm.training.networks import Predictor, PredictorConfig, linear_resample_matrix, set_fused_attention
from p3dmm.training.official import (
    NET_PREFIX,
    OfficialPredictor,
    average_flip,
    load_official_checkpoint,
)
from torch import nn

__all__ = ["OFFICIAL_FORMAT", "OFFICIAL_UV_LAYOUT", "AtContractSize", "ExportSource", "FlipAveraged", "load_source"]

log = logging.getLogger("p3dmm.export")

OFFICIAL_FORMAT = "pixel3dmm-lightning"
#: The predictor contract's input and output side.
IMAGE_SIZE = 512
#: UV layout id recorded for official checkpoints (FLAME 2020's head_template UVs).
OFFICIAL_UV_LAYOUT = "flame2020"


@dataclass
class ExportSource:
    """A checkpoint ready to export.

    Attributes:
        module: eval-mode module, ``image (B, 3, 512, 512) -> {output name: tensor}``,
            fused attention off.
        task: ``"normals"`` or ``"uv"``.
        outputs: output names in order (the task, plus ``"mask"`` for a mask channel).
        path: the checkpoint file.
        sha256: its sha256.
        format: ``"p3dmm-train-checkpoint"`` or :data:`OFFICIAL_FORMAT`.
        normal_space: ``"camera"`` / ``"head"`` for a normals model, else None.
        uv_layout: the UV layout id for a uv model, else None.
        flip_tta: the flip averaging is in the graph.
        config: the architecture, for the manifest.
    """

    module: nn.Module
    task: str
    outputs: tuple[str, ...]
    path: Path
    sha256: str
    format: str
    normal_space: str | None
    uv_layout: str | None
    flip_tta: bool
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` record."""
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format, "config": self.config}


class AtContractSize(nn.Module):
    """A predictor trained at ``img_size`` S != 512 behind the fixed 512 x 512 contract.

    The input crop is resampled 512 -> S with the antialiased bilinear filter (the same
    two constant matrix products the predictor uses for its backbone resample, so no ONNX
    ``Resize`` node), the predictor runs at S, and every output map is resampled S -> 512
    bilinearly (``align_corners=False``) the same way; normals are renormalised after it.
    UV and mask stay in (0, 1): bilinear weights are non-negative and sum to 1.
    """

    down_rows: torch.Tensor
    down_cols: torch.Tensor
    up_rows: torch.Tensor
    up_cols: torch.Tensor

    def __init__(self, predictor: Predictor, size: int = 512) -> None:
        super().__init__()
        self.predictor = predictor
        s = int(predictor.config.img_size)
        down = linear_resample_matrix(size, s)  # (S, 512)
        up = linear_resample_matrix(s, size)  # (512, S)
        self.register_buffer("down_rows", down, persistent=False)
        self.register_buffer("down_cols", down.t().contiguous(), persistent=False)
        self.register_buffer("up_rows", up, persistent=False)
        self.register_buffer("up_cols", up.t().contiguous(), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.matmul(torch.matmul(self.down_rows, image), self.down_cols)
        out = self.predictor(x)
        result: dict[str, torch.Tensor] = {}
        for name, value in out.items():
            y = torch.matmul(torch.matmul(self.up_rows, value), self.up_cols)
            if name == "normals":
                y = y / torch.clamp(torch.linalg.vector_norm(y, dim=1, keepdim=True), min=1e-6)
            result[name] = y
        return result


class FlipAveraged(nn.Module):
    """A p3dmm normals predictor with the official flip averaging: the model runs on the
    batch and its horizontal mirror; the mirrored normals are flipped back, x negated,
    averaged and renormalised."""

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        b = image.shape[0]
        out = self.predictor(torch.cat([image, image.flip(-1)], dim=0))
        n = average_flip(out["normals"][:b], "normals", out["normals"][b:])
        result = {"normals": n / torch.clamp(torch.linalg.vector_norm(n, dim=1, keepdim=True), min=1e-6)}
        if "mask" in out:
            result["mask"] = (out["mask"][:b] + out["mask"][b:].flip(-1)) / 2.0
        return result


def _read(path: Path, trusted: bool) -> Mapping[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: checkpoint is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad or truncated file
        if not trusted:
            raise ModelFileError(
                f"{path}: not a readable checkpoint with weights_only=True ({type(e).__name__}: {e}); "
                "a truncated or corrupt file, or a Lightning checkpoint that pickles its hyper-parameters "
                "(if you trust it, pass --trusted)"
            ) from e
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ModelFileError(f"{path}: cannot read checkpoint ({type(e2).__name__}: {e2})") from e2
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"{path}: checkpoint holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


def _is_official(ckpt: Mapping[str, Any]) -> bool:
    sd = ckpt.get("state_dict", ckpt)
    if not isinstance(sd, Mapping):
        return False
    keys = [str(k) for k in sd]
    return any(k.startswith((NET_PREFIX + "img_encoder.", "img_encoder.")) for k in keys)


def load_source(path: str | os.PathLike[str], *, flip_tta: bool = False, trusted: bool = False) -> ExportSource:
    """Read a checkpoint for export (see the module docstring).

    Args:
        path: a ``p3dmm train`` checkpoint or an official Pixel3DMM checkpoint.
        flip_tta: bake the horizontal-flip averaging into the graph.
        trusted: allow a full unpickle (official Lightning checkpoints with OmegaConf).

    Raises:
        ModelFileError: missing, empty, truncated or unreadable file; a dict that is
            neither kind of checkpoint; weights that do not fit.
        InputError: ``flip_tta`` for a p3dmm UV predictor.
    """
    path = Path(path)
    ckpt = _read(path, trusted)
    digest = sha256_file(path)
    if ckpt.get("format") == CHECKPOINT_FORMAT:
        check_checkpoint(ckpt, path)  # the version check, on the dict already read
        try:
            pcfg = PredictorConfig(**{**dict(ckpt["predictor"]), "fused_attn": False})
        except (KeyError, TypeError, InputError) as e:
            raise ModelFileError(f"{path}: the stored predictor config is not usable ({type(e).__name__}: {e})") from e
        model = Predictor(pcfg)
        try:
            model.load_state_dict(ckpt["model"])
        except (KeyError, RuntimeError) as e:
            raise ModelFileError(f"{path}: model weights do not fit the stored predictor config ({e})") from e
        model.eval()
        task = pcfg.task
        module: nn.Module = model
        if pcfg.img_size != IMAGE_SIZE:
            module = AtContractSize(model, IMAGE_SIZE).eval()
        if flip_tta:
            if task != "normals":
                raise InputError(
                    f"--flip-tta: {path} is a p3dmm {task} predictor; flip averaging of UV needs the layout's mirror "
                    "map, so it is only baked for normals and for official checkpoints"
                )
            module = FlipAveraged(module).eval()
        normal_space = str(ckpt.get("normal_space") or "camera") if task == "normals" else None
        uv_layout = str(ckpt.get("uv_layout") or "unknown") if task == "uv" else None
        return ExportSource(module=module, task=task, outputs=pcfg.output_names, path=path, sha256=digest,
                            format=CHECKPOINT_FORMAT, normal_space=normal_space, uv_layout=uv_layout,
                            flip_tta=flip_tta, config=pcfg.to_dict())  # fmt: skip
    if _is_official(ckpt):
        network, ocfg = load_official_checkpoint(ckpt, strict=True, fused_attn=False)
        network.bake_position_embedding()
        set_fused_attention(network, False)
        task = ocfg.task
        if task not in TASKS:  # pragma: no cover - infer_official_config only yields TASKS
            raise ModelFileError(f"{path}: task {task!r}, expected one of {TASKS}")
        module = OfficialPredictor(network, flip_tta=flip_tta).eval()
        config = {k: v for k, v in vars(ocfg).items() if isinstance(v, (int, float, str, bool))}
        return ExportSource(module=module, task=task, outputs=(task,), path=path, sha256=digest,
                            format=OFFICIAL_FORMAT, normal_space="head" if task == "normals" else None,
                            uv_layout=OFFICIAL_UV_LAYOUT if task == "uv" else None, flip_tta=flip_tta,
                            config=config)  # fmt: skip
    got = ckpt.get("format")
    raise ModelFileError(
        f"{path}: neither a p3dmm training checkpoint (format {CHECKPOINT_FORMAT!r}, got {got!r}) nor an official "
        "Pixel3DMM checkpoint (state_dict keys 'net.img_encoder.*')"
    )
