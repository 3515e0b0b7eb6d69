"""The ``p3dmm train`` command (argparse only; torch is imported when the command runs).

``add_parsers`` adds the sub-command to the ``p3dmm`` CLI (registered as a
``p3dmm.commands`` entry point, so the torch-free CLI never imports this package); :func:`main`
is the same command as a standalone program, used by ``python -m p3dmm.training`` (and so
by ``torchrun --nproc_per_node=N -m p3dmm.training ARGS``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from p3dmm.fitting.base.cli import run

log = logging.getLogger("p3dmm.train")

_BACKBONE_ALIASES = {
    "tiny": "tiny_patch14_dinov2",
    "mini": "mini_patch14_dinov2",
    "small": "vit_small_patch14_dinov2",
    "base": "vit_base_patch14_dinov2",
    "large": "vit_large_patch14_dinov2",
    "giant": "vit_giant_patch14_dinov2",
}


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive integer")
    return v


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a non-negative integer")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"{text}: expected a positive number")
    return v


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, metavar="DIR", help="training dataset (p3dmm-maps directory)")
    p.add_argument("--val", metavar="DIR", default=None, help="validation dataset (default: none)")
    p.add_argument("--task", required=True, choices=("normals", "uv"), help="what the network predicts")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--steps", type=_positive_int, default=20000, help="optimiser steps (default: 20000)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="samples per step and process (default: 8)")
    p.add_argument("--lr", type=_positive_float, default=1e-4, help="head learning rate (default: 1e-4)")
    p.add_argument(
        "--backbone-lr-ratio", type=float, default=0.1, help="backbone lr / head lr (default: 0.1, the paper's)"
    )
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    p.add_argument("--warmup", type=_non_negative_int, default=500, help="linear warm-up steps (default: 500)")
    p.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor / peak lr (default: 0)")
    p.add_argument(
        "--backbone",
        default="base",
        metavar="NAME",
        help="timm DINOv2 name, or tiny/mini/small/base/large/giant (default: base = vit_base_patch14_dinov2)",
    )
    p.add_argument(
        "--img-size",
        type=_positive_int,
        default=512,
        help="input/output side, a multiple of 16; the backbone sees img_size/16*14 (default: 512)",
    )
    p.add_argument("--head-dim", type=_positive_int, default=None, help="head width (default: 256; tiny: 32)")
    p.add_argument("--head-depth", type=_non_negative_int, default=None, help="head blocks (default: 4; tiny: 1)")
    p.add_argument("--head-heads", type=_positive_int, default=None, help="head attention heads (default: 8; tiny: 2)")
    p.add_argument("--mask-channel", action="store_true", help="also predict the face mask (BCE loss)")
    p.add_argument(
        "--amp", choices=("bf16", "fp16", "none"), default="bf16", help="mixed precision on CUDA (default: bf16)"
    )
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 for none (default: 1)")
    p.add_argument("--loss", choices=("l2", "l1"), default="l2", help="per-pixel loss (default: l2)")
    p.add_argument(
        "--supervise", choices=("coverage", "mask"), default="coverage",
        help="pixels of the task loss: the whole head or the face region (default: coverage)",
    )
    p.add_argument("--mask-loss-weight", type=float, default=1.0, help="weight of the mask BCE (default: 1)")
    p.add_argument(
        "--occluder-weight", type=float, default=1.0, help="loss weight under augmentation occluders (default: 1)"
    )
    p.add_argument("--no-augment", action="store_true", help="train without augmentation")
    p.add_argument("--log-every", type=_non_negative_int, default=50, help="steps between log lines (default: 50)")
    p.add_argument("--val-every", type=_non_negative_int, default=1000, help="steps between validations (default: 1000)")
    p.add_argument("--val-max-samples", type=_positive_int, default=None, help="validate on at most N samples")
    p.add_argument("--ckpt-every", type=_non_negative_int, default=1000, help="steps between checkpoints (default: 1000)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="seed (default: 0)")
    p.add_argument("--workers", type=_non_negative_int, default=4, help="DataLoader workers per process (default: 4)")
    p.add_argument("--pretrained", metavar="FILE", default=None, help="local DINOv2 weights (.pth or .safetensors)")
    p.add_argument("--flame-model", metavar="FILE", default=None, help="FLAME model of the data (uv flips)")
    p.add_argument("--flame-uv", metavar="FILE", default=None, help="head_template.obj of --flame-model")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard events")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="resume from CKPT, or (without a value) from OUT/last.pt when it exists",
    )


def config_from_args(args: argparse.Namespace) -> Any:
    """Build the :class:`~p3dmm.training.train.TrainConfig` of parsed ``train`` arguments."""
    from .augment import AugmentConfig
    from .networks import TINY_BACKBONE, PredictorConfig
    from .train import TrainConfig

    backbone = _BACKBONE_ALIASES.get(args.backbone, args.backbone)
    size = int(args.img_size)
    head: dict[str, Any] = {}
    if backbone == TINY_BACKBONE:
        head = {"head_dim": 32, "head_depth": 1, "head_heads": 2}
    for key in ("head_dim", "head_depth", "head_heads"):
        if getattr(args, key) is not None:
            head[key] = getattr(args, key)
    predictor = PredictorConfig(
        backbone=backbone,
        task=args.task,
        mask_channel=bool(args.mask_channel),
        img_size=size,
        backbone_img_size=size // 16 * 14,
        **head,
    )
    return TrainConfig(
        data=args.data,
        out=args.out,
        task=args.task,
        val=args.val,
        predictor=predictor,
        augment=None if args.no_augment else AugmentConfig(),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        backbone_lr_ratio=args.backbone_lr_ratio,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        min_lr_ratio=args.min_lr_ratio,
        amp=None if args.amp == "none" else args.amp,
        grad_clip=args.grad_clip if args.grad_clip and args.grad_clip > 0 else None,
        loss=args.loss,
        supervise=args.supervise,
        mask_loss_weight=args.mask_loss_weight,
        occluder_weight=args.occluder_weight,
        log_every=args.log_every,
        val_every=args.val_every,
        val_max_samples=args.val_max_samples,
        ckpt_every=args.ckpt_every,
        seed=args.seed,
        num_workers=args.workers,
        pretrained_backbone=args.pretrained,
        flame_model=args.flame_model,
        flame_uv=args.flame_uv,
        device=args.device,
        tensorboard=not args.no_tensorboard,
        resume=args.resume,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    result = train(config_from_args(args))
    if result.rank == 0:
        last = result.val_history[-1] if result.val_history else {}
        shown = {k: round(v, 5) for k, v in last.items() if isinstance(v, float)}
        log.info(
            "train: %d steps (%d skipped); checkpoint %s%s",
            result.step,
            result.skipped_steps,
            result.checkpoint,
            f"; validation {shown}" if shown else "",
        )
    return 0


def add_parsers(subparsers: Any) -> None:
    """Add ``train`` to an ``argparse`` sub-parser group (sets ``func``: args -> exit code).

    Args:
        subparsers: The object ``ArgumentParser.add_subparsers()`` returned.
    """
    t = subparsers.add_parser(
        "train",
        help="train a normal or UV predictor (torchrun-compatible: python -m p3dmm.training)",
        description="Train a Pixel3DMM-style predictor on p3dmm-maps data. Resumable (--resume); under "
        "torchrun --nproc_per_node=N -m p3dmm.training the same arguments run DDP.",
    )
    _add_train_arguments(t)
    t.set_defaults(func=_cmd_train)


def build_parser() -> argparse.ArgumentParser:
    """The standalone ``train`` parser of ``python -m p3dmm.training``."""
    p = argparse.ArgumentParser(
        prog="python -m p3dmm.training", description="Train a Pixel3DMM-style predictor (torchrun-compatible)."
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _add_train_arguments(p)
    p.set_defaults(func=_cmd_train)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``train`` command; returns the exit code (2 on a p3dmm error)."""
    return run(build_parser(), argv, "train")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
