"""Training loop of the Pixel3DMM predictors (single process or ``torchrun`` DDP).

:func:`train` runs one :class:`TrainConfig`:

* model: :class:`~p3dmm.training.networks.Predictor`, optionally with pretrained DINOv2
  weights (:func:`~p3dmm.training.pretrained.load_pretrained_backbone`);
* optimiser: AdamW over :func:`~p3dmm.training.networks.param_groups` (backbone lr =
  head lr x ``backbone_lr_ratio``, the paper's 1/10), linear warm-up then cosine decay
  (:func:`lr_factor`), gradient clipping;
* loss: masked per-pixel L2 (or L1) of the task map over the face mask or the head
  coverage (:func:`task_loss`), plus BCE on the optional mask channel;
* steps whose loss or gradient norm is not finite are skipped (no update) and counted;
  all processes take the same decision;
* mixed precision on CUDA only (``bf16``, or ``fp16`` with a ``GradScaler``);
* checkpoints (``OUT/last.pt``, written atomically) hold the model, optimiser,
  scheduler, scaler, step, RNG states and the config. Resuming continues exactly: the
  data order comes from :class:`~p3dmm.training.data.ResumableDistributedSampler`
  (seeded per epoch) and the augmentations from per-``(seed, epoch, index)``
  generators, so an interrupted and resumed run reproduces an uninterrupted one;
* validation: normal angular error (mean / median, degrees) or UV error (mean /
  median L2 in UV units, and the mean in texels of a 512 texture) over the face mask,
  sharded over the processes and reduced exactly (medians from 0.01 degree / 1e-4 UV
  histograms);
* logging: ``OUT/metrics.jsonl`` (one JSON object a line, appended, flushed and
  fsynced), tqdm progress and TensorBoard (only when the ``tensorboard`` package is
  installed) on rank 0.

Distributed: under ``torchrun`` the process group is created from the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) with NCCL
on CUDA and Gloo on the CPU; an already initialised group is used as it is. Only rank 0
writes files. ``python -m p3dmm.training ARGS`` (and so ``torchrun --nproc_per_node=N
-m p3dmm.training ARGS``) runs the ``train`` command line (:mod:`p3dmm.training.train_cli`).
Checkpoints are read and written by :mod:`p3dmm.training.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import InputError
from torch import nn

from .augment import AugmentConfig, UVMirror
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    CHECKPOINT_VERSION,
    load_checkpoint,
    save_checkpoint,
    weights_digest,
)
from .data import MapsDataset, ResumableDistributedSampler
from .networks import Predictor, PredictorConfig, param_groups

__all__ = [
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "lr_factor",
    "task_loss",
    "train",
]

log = logging.getLogger("p3dmm.train")

METRICS_NAME = "metrics.jsonl"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ANGLE_BINS = (18000, 180.0)  # 0.01 degree bins
_UV_BINS = (15000, 1.5)  # 1e-4 UV bins
_UV_TEXTURE = 512
#: Fields that may differ between a checkpoint and the config that resumes it.
_RESUMABLE_CHANGES = frozenset(
    {"steps", "log_every", "val_every", "ckpt_every", "num_workers", "device", "tensorboard", "resume",
     "val_max_samples", "val_at_start", "out"}
)


# ------------------------------------------------------------------------- config
@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (one source of truth; stored in checkpoints).

    Attributes:
        data: Training dataset directory (p3dmm-maps format).
        out: Output directory (``last.pt``, ``metrics.jsonl``, TensorBoard events).
        task: ``'normals'`` or ``'uv'``; must equal ``predictor.task``.
        val: Validation dataset directory, or None for no validation.
        predictor: Network architecture; None builds ``PredictorConfig(task=task)``.
        augment: Augmentation of the training images; None for none.
        steps: Optimiser steps in total (the cosine schedule ends here).
        batch_size: Samples per step and process.
        lr: Head learning rate (paper: 1e-4).
        backbone_lr_ratio: Backbone lr / head lr (paper: 0.1).
        weight_decay: AdamW weight decay (0 = Adam, as in the paper).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Floor of the cosine decay, as a fraction of the peak lr.
        amp: ``'bf16'``, ``'fp16'`` or None; autocast is used on CUDA only.
        grad_clip: Max global gradient norm, or None for no clipping.
        loss: ``'l2'`` (squared error, summed over channels) or ``'l1'``.
        supervise: Pixels of the task loss: ``'coverage'`` (the whole head) or ``'mask'``
            (the face region).
        mask_loss_weight: Weight of the BCE of the mask channel (when the predictor has one).
        occluder_weight: Loss weight of pixels under augmentation occluders (1 = keep
            full supervision, the network hallucinates behind occluders).
        log_every: Steps between training-metric lines.
        val_every: Steps between validations (0: only at the end).
        val_at_start: Validate before the first step of a fresh run (the step-0 baseline).
        val_max_samples: Validate on at most this many samples (None: all).
        ckpt_every: Steps between checkpoints (one is always written at the end).
        seed: Seed of the initialisation, the data order and the augmentations.
        num_workers: DataLoader worker processes per training process.
        pretrained_backbone: Local DINOv2 weight file (Meta ``.pth`` or timm
            ``.safetensors``), or None for a random backbone.
        flame_model: FLAME model file, for the UV mirror map of uv flips (None: the
            synthetic head).
        flame_uv: ``head_template.obj`` of ``flame_model``.
        device: ``'cpu'``, ``'cuda'`` or None (CUDA when available; under torchrun
            ``cuda:LOCAL_RANK``).
        tensorboard: Also write TensorBoard events when the package is installed.
        resume: ``'auto'`` (resume from ``out/last.pt`` when it exists), a checkpoint
            path, or None (start fresh).
    """

    data: str
    out: str
    task: str = "normals"
    val: str | None = None
    predictor: PredictorConfig | None = None
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    steps: int = 20000
    batch_size: int = 8
    lr: float = 1e-4
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    amp: str | None = "bf16"
    grad_clip: float | None = 1.0
    loss: str = "l2"
    supervise: str = "coverage"
    mask_loss_weight: float = 1.0
    occluder_weight: float = 1.0
    log_every: int = 50
    val_every: int = 1000
    val_at_start: bool = True
    val_max_samples: int | None = None
    ckpt_every: int = 1000
    seed: int = 0
    num_workers: int = 4
    pretrained_backbone: str | None = None
    flame_model: str | None = None
    flame_uv: str | None = None
    device: str | None = None
    tensorboard: bool = True
    resume: str | None = None

    def __post_init__(self) -> None:
        if self.predictor is None:
            object.__setattr__(self, "predictor", PredictorConfig(task=self.task))
        if not isinstance(self.predictor, PredictorConfig):
            raise InputError(f"TrainConfig.predictor is a {type(self.predictor).__name__}, expected PredictorConfig")
        if self.augment is not None and not isinstance(self.augment, AugmentConfig):
            raise InputError(f"TrainConfig.augment is a {type(self.augment).__name__}, expected AugmentConfig or None")
        if self.predictor.task != self.task:
            raise InputError(
                f"TrainConfig: task {self.task!r} but predictor.task {self.predictor.task!r}; they must agree"
            )
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"TrainConfig.{name}={getattr(self, name)!r}, expected a positive integer")
        for name in ("warmup_steps", "log_every", "val_every", "ckpt_every", "num_workers", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise InputError(f"TrainConfig.{name}={getattr(self, name)!r}, expected a non-negative integer")
        if not self.lr > 0 or not self.backbone_lr_ratio >= 0 or not self.weight_decay >= 0:
            raise InputError(
                f"TrainConfig: lr {self.lr}, backbone_lr_ratio {self.backbone_lr_ratio}, weight_decay "
                f"{self.weight_decay}: expected lr > 0 and non-negative ratio and decay"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InputError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio}, expected a value in [0, 1]")
        if self.amp not in (None, *AMP_DTYPES):
            raise InputError(f"TrainConfig.amp={self.amp!r}, expected 'bf16', 'fp16' or None")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"TrainConfig.grad_clip={self.grad_clip}, expected a positive norm or None")
        if self.loss not in ("l2", "l1"):
            raise InputError(f"TrainConfig.loss={self.loss!r}, expected 'l2' or 'l1'")
        if self.supervise not in ("coverage", "mask"):
            raise InputError(f"TrainConfig.supervise={self.supervise!r}, expected 'coverage' or 'mask'")
        if self.mask_loss_weight < 0 or not 0.0 <= self.occluder_weight <= 1.0:
            raise InputError(
                f"TrainConfig: mask_loss_weight {self.mask_loss_weight} must be >= 0 and occluder_weight "
                f"{self.occluder_weight} in [0, 1]"
            )
        if self.val_max_samples is not None and self.val_max_samples < 1:
            raise InputError(f"TrainConfig.val_max_samples={self.val_max_samples}, expected a positive integer or None")

    @property
    def predictor_config(self) -> PredictorConfig:
        """``predictor`` (never None after construction)."""
        return cast(PredictorConfig, self.predictor)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (nested configs as dicts) for checkpoints and logs."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["predictor"] = self.predictor_config.to_dict()
        d["augment"] = None if self.augment is None else self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if d.get("predictor") is not None:
            d["predictor"] = PredictorConfig(**d["predictor"])
        if d.get("augment") is not None:
            d["augment"] = AugmentConfig.from_dict(d["augment"])
        return cls(**d)


@dataclass
class TrainResult:
    """What :func:`train` did (on every rank; files are written by rank 0 only).

    Attributes:
        step: The step reached (optimiser steps taken plus skipped steps).
        skipped_steps: Steps skipped because the loss or the gradient was not finite.
        checkpoint: Path of the last checkpoint (None on ranks other than 0).
        val_history: One dict per validation: ``step`` and the metrics.
        model: The trained predictor (unwrapped from DDP), on the training device.
        rank: This process's rank.
        world_size: Number of processes.
    """

    step: int
    skipped_steps: int
    checkpoint: Path | None
    val_history: list[dict[str, Any]] = field(default_factory=list)
    model: Predictor | None = None
    rank: int = 0
    world_size: int = 1


# ---------------------------------------------------------------- schedule, loss
def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier of ``step`` (0-based): linear warm-up, then cosine decay.

    ``(step + 1) / warmup`` during the first ``warmup`` steps; afterwards
    ``min + (1 - min) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup) /
    (total - warmup)`` clipped to [0, 1].

    Args:
        step: Optimiser step.
        warmup_steps: Warm-up length.
        total_steps: Steps of the whole run.
        min_ratio: The factor at the end of the decay.

    Returns:
        The factor in ``[min_ratio, 1]`` (warm-up: in ``(0, 1]``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def task_loss(
    outputs: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], config: TrainConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked per-pixel regression of the task map, plus BCE of the mask channel.

    ``loss = sum_p w_p e_p / max(sum_p w_p, 1)`` with ``e_p`` the squared (L2) or
    absolute (L1) error summed over the task channels, and ``w_p`` the supervised region
    (``config.supervise``) times ``occluder_weight`` under occluders. Computed in float32.

    Args:
        outputs: Predictor outputs: ``task (B, C, H, W)`` and optionally ``mask (B, 1, H, W)``.
        batch: ``task (B, C, H, W)``, ``mask``, ``coverage``, ``occluder`` ``(B, 1, H, W)``.
        config: Loss settings.

    Returns:
        ``(loss () float32, parts)`` with the detached terms ``task`` and ``mask``.
    """
    task = config.task
    pred = outputs[task].float()
    target = batch[task].float()
    region = batch["mask"] if config.supervise == "mask" else batch["coverage"]
    w = region.float()
    if config.occluder_weight != 1.0 and "occluder" in batch:
        w = w * (1.0 - (1.0 - config.occluder_weight) * batch["occluder"].float())
    diff = pred - target
    err = diff.square().sum(1, keepdim=True) if config.loss == "l2" else diff.abs().sum(1, keepdim=True)
    loss = (w * err).sum() / w.sum().clamp_min(1.0)
    parts = {"task": loss.detach()}
    if "mask" in outputs and config.mask_loss_weight > 0:
        p = outputs["mask"].float().clamp(1e-6, 1.0 - 1e-6)
        t = batch["mask"].float()
        bce = -(t * torch.log(p) + (1.0 - t) * torch.log1p(-p)).mean()
        loss = loss + config.mask_loss_weight * bce
        parts["mask"] = bce.detach()
    return loss, parts


# ------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class _Dist:
    rank: int
    world_size: int
    local_rank: int
    created: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _init_distributed(want_cuda: bool) -> _Dist:
    """Join (or create from the torchrun environment) the default process group."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(0, 1, 0, False)
    if not dist.is_available():
        raise InputError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    backend = "nccl" if want_cuda else "gloo"
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, True)


def _all_reduce(t: torch.Tensor, dist_info: _Dist, op: str = "sum") -> torch.Tensor:
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return t


def _pick_device(config: TrainConfig, local_rank: int, world: int) -> torch.device:
    name = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("TrainConfig.device='cuda' but no CUDA device is available")
        return torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    return torch.device(name)


# ------------------------------------------------------------------ checkpoints
def _numpy_rng_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]


def _rng_states(device: torch.device) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": _numpy_rng_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
    }


def _restore_rng(states: Mapping[str, Any], device: torch.device) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda"):
        torch.cuda.set_rng_state_all(states["cuda"])


# ------------------------------------------------------------------------ logging
class _MetricsLog:
    """``metrics.jsonl`` (appended, flushed, fsynced) and optional TensorBoard, rank 0 only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_step: int | None) -> None:
        self.path = out / METRICS_NAME
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Drop lines a crashed run wrote after the checkpoint it is resumed from.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= resume_step:
                        kept.append(line)
                except (ValueError, AttributeError):
                    continue
            atomic_write_bytes(self.path, ("".join(k + "\n" for k in kept)).encode("utf-8"))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.debug("tensorboard is not installed; writing metrics.jsonl only")
            else:
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(dict(record), sort_keys=False) + "\n"
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if self.writer is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.writer.add_scalar(f"{split}/{k}", v, int(record.get("step", 0)))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------- evaluate
def _hist_median(hist: torch.Tensor, bins: int, top: float) -> float:
    total = float(hist.sum())
    if total <= 0:
        return float("nan")
    cum = torch.cumsum(hist.double(), 0)
    k = int(torch.searchsorted(cum, torch.tensor([total / 2.0], dtype=torch.float64)).item())
    k = min(k, bins - 1)
    before = float(cum[k - 1]) if k > 0 else 0.0
    inside = float(hist[k])
    frac = (total / 2.0 - before) / inside if inside > 0 else 0.5
    return (k + frac) * top / bins


@torch.no_grad()
def evaluate(
    model: Predictor,
    dataset: MapsDataset,
    config: TrainConfig,
    device: torch.device,
    dist_info: _Dist | None = None,
) -> dict[str, float]:
    """Validation metrics over the face mask, sharded over the processes.

    Args:
        model: The (unwrapped) predictor; evaluated in eval mode, restored afterwards.
        dataset: Validation data (no augmentation).
        config: Task, batch size, ``val_max_samples``, amp.
        device: Where the model is.
        dist_info: Process group layout (None: a single process).

    Returns:
        ``loss`` and ``pixels``, and for normals ``normal_angle_mean_deg``,
        ``normal_angle_median_deg``; for uv ``uv_l2_mean``, ``uv_l2_median``,
        ``uv_texel512_mean``; with a mask channel ``mask_iou``.
    """
    dist_info = dist_info or _Dist(0, 1, 0, False)
    was_training = model.training
    model.eval()
    n = len(dataset) if config.val_max_samples is None else min(len(dataset), config.val_max_samples)
    shard = list(range(dist_info.rank, n, dist_info.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, shard),
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=min(config.num_workers, max(len(shard) // max(config.batch_size, 1), 0)),
        generator=torch.Generator().manual_seed(config.seed),
    )
    task = config.task
    bins, top = _ANGLE_BINS if task == "normals" else _UV_BINS
    hist = torch.zeros(bins, dtype=torch.float64, device=device)
    # sums: [error sum, pixels, loss * batch, batches, mask intersection, mask union]
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(config, device):
            out = model(batch["image"])
        loss, _ = task_loss(out, batch, config)
        pred = out[task].float()
        target = batch[task]
        sel = batch["mask"][:, 0] > 0.5  # (B, H, W)
        if task == "normals":
            cos = (pred * target).sum(1).clamp(-1.0, 1.0)
            err = torch.rad2deg(torch.acos(cos))[sel]
        else:
            err = torch.linalg.vector_norm(pred - target, dim=1)[sel]
        err = err.double()
        hist += torch.histc(err.clamp(max=top * (1 - 1e-9)), bins=bins, min=0.0, max=top)
        sums[0] += err.sum()
        sums[1] += err.numel()
        sums[2] += loss.double() * len(pred)
        sums[3] += len(pred)
        if "mask" in out:
            pm = out["mask"][:, 0].float() > 0.5
            sums[4] += (pm & sel).sum()
            sums[5] += (pm | sel).sum()
    _all_reduce(hist, dist_info)
    _all_reduce(sums, dist_info)
    if was_training:
        model.train()
    pixels = float(sums[1])
    mean = float(sums[0]) / pixels if pixels > 0 else float("nan")
    metrics = {"loss": float(sums[2]) / max(float(sums[3]), 1.0), "pixels": pixels}
    if task == "normals":
        metrics["normal_angle_mean_deg"] = mean
        metrics["normal_angle_median_deg"] = _hist_median(hist.cpu(), bins, top)
    else:
        metrics["uv_l2_mean"] = mean
        metrics["uv_l2_median"] = _hist_median(hist.cpu(), bins, top)
        metrics["uv_texel512_mean"] = mean * _UV_TEXTURE
    if model.config.mask_channel:
        metrics["mask_iou"] = float(sums[4]) / max(float(sums[5]), 1.0)
    return metrics


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and config.amp is not None:
        return torch.autocast(device_type="cuda", dtype=AMP_DTYPES[config.amp])
    return contextlib.nullcontext()


# ------------------------------------------------------------------------- data
def _uv_mirror(config: TrainConfig) -> UVMirror:
    from p3dmm.fitting import FlameModel

    if config.flame_model is None:
        model = FlameModel.synthetic(seed=0)
    else:
        if config.flame_uv is None:
            raise InputError("TrainConfig.flame_model is set but flame_uv (head_template.obj) is not")
        model = FlameModel.load(config.flame_model, uv=config.flame_uv)
    return UVMirror.from_model(model)


def _datasets(config: TrainConfig) -> tuple[MapsDataset, MapsDataset | None]:
    pcfg = config.predictor_config
    aug = config.augment
    mirror = _uv_mirror(config) if config.task == "uv" and aug is not None and aug.flip_prob > 0 else None
    train_set = MapsDataset(
        config.data, img_size=pcfg.img_size, augment=aug, uv_mirror=mirror, seed=config.seed, targets=(config.task,)
    )
    val_set = None
    if config.val is not None:
        val_set = MapsDataset(config.val, img_size=pcfg.img_size, augment=None, targets=(config.task,))
        if val_set.normal_space != train_set.normal_space:
            raise InputError(
                f"{config.val}: normal_space {val_set.normal_space!r}, but the training data "
                f"{config.data} has {train_set.normal_space!r}"
            )
    return train_set, val_set


def _epochs(
    loader: torch.utils.data.DataLoader,
    sampler: ResumableDistributedSampler,
    dataset: MapsDataset,
    start_step: int,
    batches_per_epoch: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from ``start_step`` on, epoch after epoch (resumes mid-epoch)."""
    epoch, skip = divmod(start_step, batches_per_epoch)
    while True:
        sampler.set_epoch(epoch, skip)
        dataset.set_epoch(epoch)
        yield from loader
        epoch, skip = epoch + 1, 0


# ------------------------------------------------------------------------- train
def train(config: TrainConfig, *, stop_at_step: int | None = None) -> TrainResult:
    """Train a predictor (see the module docstring).

    Args:
        config: The run.
        stop_at_step: Stop (with a checkpoint) when this step is reached, before
            ``config.steps``; the schedule still follows ``config.steps``. For staged
            jobs and tests of resuming.

    Returns:
        :class:`TrainResult`.

    Raises:
        InputError: Bad data directories, a dataset smaller than one global batch, a
            resume checkpoint of another architecture.
        ModelFileError: Unreadable checkpoint or pretrained weights.
    """
    pcfg = config.predictor_config
    want_cuda = (config.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    dist_info = _init_distributed(want_cuda)
    try:
        return _train(config, pcfg, dist_info, stop_at_step)
    finally:
        if dist_info.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _resume_path(config: TrainConfig, out: Path) -> Path | None:
    if config.resume is None:
        return None
    if config.resume == "auto":
        p = out / CHECKPOINT_NAME
        return p if p.is_file() else None
    return Path(config.resume)


def _train(config: TrainConfig, pcfg: PredictorConfig, dist_info: _Dist, stop_at_step: int | None) -> TrainResult:
    device = _pick_device(config, dist_info.local_rank, dist_info.world_size)
    out = Path(config.out)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    if config.amp is not None and device.type != "cuda" and dist_info.is_main:
        log.info("train: amp=%s ignored on %s (autocast is used on CUDA only)", config.amp, device)

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    train_set, val_set = _datasets(config)
    per_rank = len(train_set) // dist_info.world_size
    batches_per_epoch = per_rank // config.batch_size
    if batches_per_epoch < 1:
        raise InputError(
            f"{config.data}: {len(train_set)} samples cannot fill one batch of {config.batch_size} on each of "
            f"{dist_info.world_size} processes"
        )

    model = Predictor(pcfg)
    resume_from = _resume_path(config, out)
    ckpt = load_checkpoint(resume_from) if resume_from is not None else None
    if ckpt is None and dist_info.is_main and (out / CHECKPOINT_NAME).exists():
        log.warning("train: starting fresh; %s will be overwritten (use --resume to continue it)", out / CHECKPOINT_NAME)
    if ckpt is None and config.pretrained_backbone is not None:
        report = _load_pretrained(model, config.pretrained_backbone)
        log.info("train: loaded %s backbone weights from %s", report.layout, report.path)
    model.to(device)
    groups = param_groups(model, config.lr, config.backbone_lr_ratio, config.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" and device.type == "cuda" else None

    step, skipped = 0, 0
    val_history: list[dict[str, Any]] = []
    if ckpt is not None:
        stored = PredictorConfig(**ckpt["predictor"])
        if stored != pcfg:
            raise InputError(
                f"{resume_from}: checkpoint of predictor {stored}, but the config asks for {pcfg}; "
                "resume with the same architecture or start a new --out"
            )
        old = ckpt.get("config", {})
        new = config.to_dict()
        changed = sorted(k for k in new if k not in _RESUMABLE_CHANGES and old.get(k) != new[k])
        if changed:
            log.warning("train: resuming %s with changed settings %s", resume_from, changed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step, skipped = int(ckpt["step"]), int(ckpt["skipped_steps"])
        val_history = list(ckpt.get("val_history", []))
        _restore_rng(ckpt["rng"], device)
        if dist_info.is_main:
            log.info("train: resumed from %s at step %d", resume_from, step)

    raw_model = model
    wrapped: nn.Module = model
    if dist_info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ResumableDistributedSampler(
        train_set, config.batch_size, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=True,
        seed=config.seed, drop_last=True,
    )
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=config.batch_size,
        sampler=sampler,
        num_workers=config.num_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(config.seed),
    )
    metrics_log = _MetricsLog(out, dist_info.is_main, config.tensorboard, step if ckpt is not None else None)
    end_step = config.steps if stop_at_step is None else min(config.steps, int(stop_at_step))
    ckpt_path = out / CHECKPOINT_NAME

    def checkpoint() -> None:
        if not dist_info.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT,
                "format_version": CHECKPOINT_VERSION,
                "step": step,
                "skipped_steps": skipped,
                "model": raw_model.state_dict(),
                "predictor": pcfg.to_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_states(device),
                "config": config.to_dict(),
                "val_history": val_history,
                "normal_space": train_set.normal_space,
                "uv_layout": train_set.reader.manifest.get("uv_layout"),
                "world_size": dist_info.world_size,
            },
        )

    def validate() -> None:
        if val_set is None:
            return
        metrics = evaluate(raw_model, val_set, config, device, dist_info)
        record = {"step": step, "split": "val", **metrics}
        val_history.append(record)
        metrics_log.write(record)
        if dist_info.is_main:
            log.info("train: step %d validation %s", step, {k: round(v, 5) for k, v in metrics.items()})

    from tqdm import tqdm

    bar = tqdm(total=end_step, initial=step, desc=f"train {config.task}", unit="step", disable=not dist_info.is_main)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    window: dict[str, float] = {"loss": 0.0, "task": 0.0, "n": 0.0, "samples": 0.0}
    t_window = time.monotonic()
    try:
        if ckpt is None and config.val_at_start and step < end_step:
            validate()
        batches = _epochs(loader, sampler, train_set, step, batches_per_epoch)
        while step < end_step:
            batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            wrapped.train()
            with _autocast(config, device):
                outputs = wrapped(batch["image"])
            loss, parts = task_loss(outputs, batch, config)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            max_norm = config.grad_clip if config.grad_clip is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            # One decision for all processes: gradients are already all-reduced, the loss is not.
            ok = torch.stack([torch.isfinite(loss.detach()), torch.isfinite(grad_norm)]).all().float().reshape(1)
            ok = _all_reduce(ok, dist_info, "min")
            if bool(ok.item()):
                if scaler is not None:
                    scaler.step(optimizer)
                else:
                    optimizer.step()
                window["loss"] += float(loss.detach())
                window["task"] += float(parts["task"])
                window["n"] += 1
            else:
                skipped += 1
                log.warning(
                    "train: step %d skipped (loss %s, gradient norm %s)", step, float(loss.detach()), float(grad_norm)
                )
            if scaler is not None:
                scaler.update()
            lrs = {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            scheduler.step()
            step += 1
            window["samples"] += config.batch_size * dist_info.world_size
            bar.update(1)
            if config.log_every and (step % config.log_every == 0 or step == end_step):
                elapsed = max(time.monotonic() - t_window, 1e-9)
                record = {
                    "step": step,
                    "split": "train",
                    "loss": window["loss"] / max(window["n"], 1.0),
                    "task_loss": window["task"] / max(window["n"], 1.0),
                    "grad_norm": float(grad_norm),
                    "lr_head": lrs.get("head", 0.0),
                    "lr_backbone": lrs.get("backbone", 0.0),
                    "skipped_steps": skipped,
                    "samples_per_s": window["samples"] / elapsed,
                }
                metrics_log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                window = {"loss": 0.0, "task": 0.0, "n": 0.0, "samples": 0.0}
                t_window = time.monotonic()
            final = step == end_step
            if (config.val_every and step % config.val_every == 0) or (final and step == config.steps):
                validate()
            if (config.ckpt_every and step % config.ckpt_every == 0) or final:
                checkpoint()
        if dist_info.world_size > 1:
            import torch.distributed as dist

            digests: list[Any] = [None] * dist_info.world_size
            dist.all_gather_object(digests, weights_digest(raw_model))
            metrics_log.write({"step": step, "split": "final", "rank_weight_digests": digests})
            if len(set(digests)) != 1:
                log.warning("train: model weights differ between ranks: %s", digests)
    finally:
        bar.close()
        metrics_log.close()
    return TrainResult(
        step=step,
        skipped_steps=skipped,
        checkpoint=ckpt_path if dist_info.is_main else None,
        val_history=val_history,
        model=raw_model,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
    )


def _load_pretrained(model: Predictor, path: str) -> Any:
    from .pretrained import load_pretrained_backbone

    return load_pretrained_backbone(model, path)
