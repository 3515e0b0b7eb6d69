"""Training checkpoints: write, read and rebuild a predictor, without the training loop.

A checkpoint (``OUT/last.pt``, written by :func:`p3dmm.training.train.train`) is a
``torch.save`` dict with ``format``/``format_version`` and the model, optimiser,
scheduler and scaler states, the step, RNG states and the config. Export needs only
:func:`load_predictor`, so this module imports the network definitions and nothing of
the loop.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import ModelFileError
from torch import nn

from .networks import Predictor, PredictorConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "CHECKPOINT_VERSION",
    "check_checkpoint",
    "load_checkpoint",
    "load_predictor",
    "save_checkpoint",
    "weights_digest",
]

CHECKPOINT_FORMAT = "p3dmm-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "last.pt"


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write a checkpoint dict with ``torch.save``, atomically."""
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training checkpoint on the CPU (``weights_only``: no arbitrary pickles).

    Args:
        path: A ``last.pt`` written by :func:`p3dmm.training.train.train`.

    Returns:
        The checkpoint dict (``model``, ``predictor``, ``optimizer``, ``scheduler``,
        ``scaler``, ``step``, ``skipped_steps``, ``rng``, ``config``, ``val_history``, ...).

    Raises:
        ModelFileError: Missing or unreadable file, or not a p3dmm training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: training checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a bad file
        raise ModelFileError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    return check_checkpoint(ckpt, path)


def check_checkpoint(ckpt: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """``ckpt`` (an already loaded object) if it is a p3dmm training checkpoint this
    version reads; else a :class:`ModelFileError` naming ``path``."""
    if not isinstance(ckpt, Mapping) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ModelFileError(f"{path}: format {got!r}, expected a {CHECKPOINT_FORMAT!r} file")
    if int(ckpt.get("format_version", 0)) > CHECKPOINT_VERSION:
        raise ModelFileError(
            f"{path}: checkpoint version {ckpt.get('format_version')}, this p3dmm reads up to {CHECKPOINT_VERSION}"
        )
    return dict(ckpt)


def load_predictor(path: str | os.PathLike[str]) -> Predictor:
    """Rebuild the trained :class:`Predictor` of a checkpoint (CPU, eval mode).

    Raises:
        ModelFileError: See :func:`load_checkpoint`; also a state dict that does not fit.
    """
    ckpt = load_checkpoint(path)
    model = Predictor(PredictorConfig(**ckpt["predictor"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ModelFileError(f"{path}: model weights do not fit the stored predictor config ({e})") from e
    return model.eval()


def weights_digest(model: nn.Module) -> str:
    """sha256 (16 hex digits) of the model's state dict bytes, in key order."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
