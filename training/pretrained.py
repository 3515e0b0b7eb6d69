"""Load pretrained DINOv2 backbone weights from a local file (nothing is downloaded).

Two on-disk layouts are understood:

``meta``
    The original facebookresearch/dinov2 ``.pth`` files (``dinov2_vits14_pretrain.pth``
    ...): ``cls_token (1, 1, D)``, ``pos_embed (1, 1 + 37*37, D)`` for 518 px,
    ``mask_token (1, D)`` (an iBOT training token, unused at inference and dropped),
    ``patch_embed.proj.*``, ``blocks.i.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm.*``. ViT-g uses a fused SwiGLU MLP,
    ``mlp.w12`` / ``mlp.w3``, which are timm's ``mlp.fc1`` / ``mlp.fc2``. Register
    variants add ``register_tokens (1, R, D)``; their ``pos_embed`` still has a class
    entry, which timm (``no_embed_class=True``) folds into ``cls_token``. Training
    checkpoints with chunked blocks (``blocks.<chunk>.<i>.``) are flattened.
``timm``
    timm's ``model.safetensors`` (hub repos ``timm/vit_*_patch14_dinov2.lvd142m``):
    already timm names, ``pos_embed`` at 518 px (``(1, 1370, D)``; ``(1, 1369, D)`` plus
    ``reg_token`` for register variants).

The position embedding grid (37 x 37 for 518 px) is resampled once, here, to the grid
of the model (32 x 32 for 448 px) with bicubic, antialiased interpolation on CPU -- the
same call timm makes when it loads pretrained weights at another image size -- so the
network graph itself never interpolates.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from p3dmm.fitting.base.errors import ModelFileError
from torch import nn

from .networks import Predictor

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.(.*)$")
_SWIGLU = {".mlp.w12.": ".mlp.fc1.", ".mlp.w3.": ".mlp.fc2."}
_WRAPPER_KEYS = ("model", "state_dict", "teacher")
_KEY_PREFIXES = ("module.", "backbone.")
_MAX_LISTED = 8


@dataclass(frozen=True)
class BackboneLoadReport:
    """What :func:`load_dinov2_backbone` did.

    Attributes:
        path: The weight file.
        layout: ``'meta'`` or ``'timm'``.
        missing: Backbone parameters the file did not provide (left as initialised).
        unexpected: File keys that match no backbone parameter (ignored).
        dropped: File keys deliberately not loaded (``mask_token``).
        pos_embed_resampled: ``(old_grid, new_grid)`` when the position embedding was
            resampled, e.g. ``((37, 37), (32, 32))``, else None.
    """

    path: Path
    layout: str
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    dropped: tuple[str, ...]
    pos_embed_resampled: tuple[tuple[int, int], tuple[int, int]] | None


def _listed(keys: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from ``.safetensors`` or a torch ``.pth``/``.pt``/``.bin`` file, on CPU.

    Torch files are read with ``weights_only=True`` (no arbitrary pickles). A single
    wrapping level (``{'model': {...}}``, ``{'state_dict': ...}``, ``{'teacher': ...}``)
    is unwrapped.

    Args:
        path: The file.

    Returns:
        ``{name: tensor}``.

    Raises:
        ModelFileError: The file is missing, unreadable or holds no tensor dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: DINOv2 weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: object = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelFileError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from e
    if isinstance(data, Mapping):
        for key in _WRAPPER_KEYS:
            inner = data.get(key)
            if isinstance(inner, Mapping) and inner and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                data = inner
                break
    if not isinstance(data, Mapping) or not data:
        raise ModelFileError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    tensors = {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelFileError(f"{path}: holds no tensors")
    return tensors


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``'meta'`` when the keys are facebookresearch/dinov2's, else ``'timm'``."""
    keys = list(state_dict)
    meta_only = ("mask_token", "register_tokens")
    if any(k in state_dict for k in meta_only):
        return "meta"
    if any(_CHUNKED_BLOCK.match(k) or ".mlp.w12." in k or ".mlp.w3." in k for k in keys):
        return "meta"
    return "timm"


def convert_meta_state_dict(
    state_dict: Mapping[str, torch.Tensor], backbone: nn.Module
) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Rename a Meta DINOv2 state dict to timm's names (position grid not yet resampled).

    Args:
        state_dict: Meta-layout tensors (prefixes already stripped).
        backbone: The timm ViT it is meant for (decides the register-token handling).

    Returns:
        ``(timm_state_dict, dropped_keys)``.
    """
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    has_reg = getattr(backbone, "reg_token", None) is not None
    no_embed_class = bool(getattr(backbone, "no_embed_class", False))
    for key, value in state_dict.items():
        if key == "mask_token":
            dropped.append(key)
            continue
        m = _CHUNKED_BLOCK.match(key)
        if m:  # blocks.<chunk>.<i>.rest -> blocks.<i>.rest (block indices are global)
            key = f"blocks.{m.group(1)}.{m.group(2)}"
        for old, new in _SWIGLU.items():
            key = key.replace(old, new)
        if key == "register_tokens":
            key = "reg_token"
        out[key] = value
    if "reg_token" in out and has_reg and no_embed_class and "pos_embed" in out and "cls_token" in out:
        # Meta adds pos_embed[:, 0] to the class token and none to registers; timm's
        # no_embed_class model adds the grid part only, so fold the class entry in.
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out, tuple(dropped)


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    changed = True
        out[key] = value
    return out


def _resample_pos_embed(
    pos: torch.Tensor, backbone: Any, path: Path
) -> tuple[torch.Tensor, tuple[tuple[int, int], tuple[int, int]] | None]:
    """Resample a ``(1, prefix + g*g, D)`` position embedding to the backbone's grid."""
    from timm.layers import resample_abs_pos_embed

    target = backbone.pos_embed
    n_prefix = 0 if getattr(backbone, "no_embed_class", False) else int(backbone.num_prefix_tokens)
    gy, gx = (int(s) for s in backbone.patch_embed.grid_size)
    new_grid = (gy, gx)
    if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != target.shape[2]:
        raise ModelFileError(
            f"{path}: key 'pos_embed' has shape {tuple(pos.shape)}, expected "
            f"(1, N, {target.shape[2]}) (embedding width of the backbone)"
        )
    if pos.shape == target.shape:
        return pos, None
    n_grid = pos.shape[1] - n_prefix
    side = round(n_grid**0.5)
    if n_grid <= 0 or side * side != n_grid:
        raise ModelFileError(
            f"{path}: key 'pos_embed' has shape {tuple(pos.shape)}: {pos.shape[1]} tokens are not "
            f"{n_prefix} prefix tokens plus a square grid (expected e.g. {tuple(target.shape)})"
        )
    with torch.no_grad():
        resampled = resample_abs_pos_embed(
            pos.detach().float().cpu(),
            new_size=list(new_grid),
            old_size=[side, side],
            num_prefix_tokens=n_prefix,
            interpolation="bicubic",
            antialias=True,
        ).to(target.dtype)
    return resampled, ((side, side), new_grid)


def load_dinov2_backbone(
    backbone: nn.Module, path: str | Path, *, strict: bool = True
) -> BackboneLoadReport:
    """Load DINOv2 weights from a local Meta ``.pth`` or timm ``.safetensors`` into a timm ViT.

    Args:
        backbone: A timm ``VisionTransformer`` built by
            :func:`p3dmm.training.networks.build_backbone` (any image size; the
            position embedding is resampled to its grid).
        path: The weight file.
        strict: Raise when backbone parameters are missing from the file or the file has
            keys the backbone does not know; when False these only warn (and are listed
            in the report).

    Returns:
        A :class:`BackboneLoadReport`.

    Raises:
        ModelFileError: Missing/unreadable file; a tensor whose shape does not match the
            backbone (message names the file, key, got and expected shape); with
            ``strict``, missing or unexpected keys.
    """
    path = Path(path)
    raw = _strip_prefixes(read_state_dict_file(path))
    layout = detect_layout(raw)
    if layout == "meta":
        converted, dropped = convert_meta_state_dict(raw, backbone)
    else:
        converted, dropped = dict(raw), ()
    expected = backbone.state_dict()
    resampled_info = None
    if "pos_embed" in converted and "pos_embed" in expected:
        converted["pos_embed"], resampled_info = _resample_pos_embed(
            converted["pos_embed"], backbone, path
        )
    for key, value in converted.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ModelFileError(
                f"{path}: key {key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[key].shape)} for this backbone ({type(backbone).__name__}, "
                f"embed dim {getattr(backbone, 'embed_dim', '?')}); is it the right DINOv2 size?"
            )
    missing = tuple(k for k in expected if k not in converted)
    unexpected = tuple(k for k in converted if k not in expected)
    if missing or unexpected:
        message = (
            f"{path} ({layout} layout): "
            + (f"missing keys {_listed(missing)}" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected keys {_listed(unexpected)}" if unexpected else "")
        )
        if strict:
            raise ModelFileError(message + " (pass strict=False to load anyway)")
        warnings.warn(message, stacklevel=2)
    loadable = {k: v for k, v in converted.items() if k in expected}
    backbone.load_state_dict(loadable, strict=False)
    return BackboneLoadReport(
        path=path,
        layout=layout,
        missing=missing,
        unexpected=unexpected,
        dropped=dropped,
        pos_embed_resampled=resampled_info,
    )


def load_pretrained_backbone(
    model: Predictor, path: str | Path, *, strict: bool = True
) -> BackboneLoadReport:
    """Load DINOv2 weights into ``model.backbone`` (see :func:`load_dinov2_backbone`)."""
    return load_dinov2_backbone(model.backbone, path, strict=strict)
