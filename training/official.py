"""An equivalent re-implementation of the official Pixel3DMM network, for importing checkpoints.

Written from ``shared/docs/REFERENCE_FACTS.md`` ("Official network forward, exactly"),
not from the official code. :class:`OfficialNetwork` has exactly the official parameter
names (``shared/reference/official_network_state_dict_shapes.json``), so the ``net.``
part of a released Lightning checkpoint loads with ``strict=True``, and its forward
reproduces the official one (including its non-standard layer order):

- input ``(B, N, 512, 512, 3)`` channels-last RGB in [0, 1]; ImageNet mean/std inside;
- backbone: timm ``vit_small_patch16_224.dino`` / ``vit_base_patch16_224.dino`` with
  ``dynamic_img_size=True`` (the 14x14 position grid is resampled to 32x32 at *run time*
  with bicubic, antialiased interpolation, as timm does), final norm applied, CLS dropped;
- optional view embedding (view ``0 .. N-1``) concatenated after the D channels;
- ``vol_decoder``: ``down_proj`` then L layers of
  ``x = norm1(x); x += SA1(x); x += mlp(norm2(x)); x = norm3(x); x += SA2(x);
  x += mlp2(norm4(x))`` (LayerNorm eps 1e-5, attention without biases), *no* final norm;
- ``t_conv1..3`` (ConvTranspose2d k2 s2, GELU after each), ``token_2_patch_content``
  (Linear E -> 4C) and a 2x2 unpatchify with channel order (p, q, c); no activation.

This module is for import and validation. Its run-time position-embedding resample is
an antialiased bicubic ``Resize`` in an exported graph; :meth:`OfficialNetwork.
bake_position_embedding` replaces it by the resampled 32x32 table, once (same outputs).

Unused official parameters (``dir_norm.*``, ``dir_norm_uv.*``, ``uv_enc_mlp.*``,
``vol_decoder.norm.*``) exist only so that the names match; they are never called.
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from p3dmm.fitting.base.errors import InputError, ModelFileError
from torch import nn

from .networks import IMAGENET_MEAN, IMAGENET_STD, set_fused_attention

#: Official backbone name by embedding width D.
OFFICIAL_BACKBONES = {384: "vit_small_patch16_224.dino", 768: "vit_base_patch16_224.dino"}
#: p3dmm task -> (official output key, channels C).
OFFICIAL_TASKS = {"normals": ("normals", 3), "uv": ("uv_map", 2)}
OFFICIAL_IMG_SIZE = 512
OFFICIAL_GRID = 32  # 512 / 16 tokens per side
OFFICIAL_BACKBONE_BLOCKS = 12
OFFICIAL_VIEW_DIM = 16
#: u offset added to the flipped uv prediction before averaging (2 * 0.0075).
OFFICIAL_UV_FLIP_OFFSET = 0.015
#: Keys of the Lightning system that are not part of the network.
IGNORED_CHECKPOINT_KEYS = ("vertex_weight_mask",)
NET_PREFIX = "net."
_UNSUPPORTED_BRANCHES = {
    "t_conv3_conf.weight": "pred_conf=True (confidence branch)",
    "token_2_patch_conf.weight": "pred_conf=True (confidence branch)",
    "patch_pos_enc": "use_pos_enc=True (patch position encoding)",
}


@dataclass(frozen=True)
class OfficialConfig:
    """Architecture of an official Pixel3DMM network (what a checkpoint's shapes say).

    Attributes:
        backbone: ``'vit_small_patch16_224.dino'`` or ``'vit_base_patch16_224.dino'``.
        task: ``'normals'`` (C = 3) or ``'uv'`` (C = 2; official key ``uv_map``).
        n_views: ``cfg.n_views``; a ``view_embed`` parameter exists when > 1.
        hidden_dim: E, the decoder width (official 256).
        num_layers: Decoder layers L (official 6).
        num_heads: Decoder attention heads (``cfg.model.num_heads``, official 8).
        fused_attn: Use ``F.scaled_dot_product_attention`` (False: explicit softmax,
            for ONNX export).
    """

    backbone: str = "vit_small_patch16_224.dino"
    task: str = "normals"
    n_views: int = 2
    hidden_dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    fused_attn: bool = True

    def __post_init__(self) -> None:
        if self.backbone not in OFFICIAL_BACKBONES.values():
            raise InputError(
                f"OfficialConfig.backbone: got {self.backbone!r}, expected one of "
                f"{sorted(OFFICIAL_BACKBONES.values())}"
            )
        if self.task not in OFFICIAL_TASKS:
            raise InputError(f"OfficialConfig.task: got {self.task!r}, expected 'normals' or 'uv'")
        if self.n_views < 1 or self.num_layers < 0 or self.hidden_dim <= 0:
            raise InputError(
                f"OfficialConfig: n_views {self.n_views} must be >= 1, num_layers "
                f"{self.num_layers} >= 0, hidden_dim {self.hidden_dim} > 0"
            )
        if self.num_heads <= 0 or self.hidden_dim % self.num_heads:
            raise InputError(
                f"OfficialConfig: hidden_dim {self.hidden_dim} is not divisible by num_heads "
                f"{self.num_heads}"
            )

    @property
    def embed_dim(self) -> int:
        """Backbone width D (384 small, 768 base)."""
        return {v: k for k, v in OFFICIAL_BACKBONES.items()}[self.backbone]

    @property
    def view_dim(self) -> int:
        """Channels of the view embedding concatenated to the tokens (0 when n_views == 1)."""
        return OFFICIAL_VIEW_DIM if self.n_views > 1 else 0

    @property
    def out_channels(self) -> int:
        """C: 3 for normals, 2 for uv."""
        return OFFICIAL_TASKS[self.task][1]

    @property
    def output_key(self) -> str:
        """Key of the official output dict: ``'normals'`` or ``'uv_map'``."""
        return OFFICIAL_TASKS[self.task][0]


class OfficialDinoEncoder(nn.Module):
    """``img_encoder``: ImageNet normalisation + timm DINO ViT/16 (``model.*``), CLS dropped."""

    model: Any
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor

    def __init__(self, backbone: str) -> None:
        super().__init__()
        import timm

        self.model = timm.create_model(backbone, pretrained=False, dynamic_img_size=True)
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Backbone tokens.

        Args:
            image: ``(B, 3, 512, 512) float32`` RGB in [0, 1].

        Returns:
            ``(B, 1024, D) float32``, row-major 32x32 grid, after the final norm.
        """
        x = (image - self.pixel_mean) / self.pixel_std
        tokens = self.model.forward_features(x)  # (B, 1 + 1024, D)
        return tokens[:, 1:]


class _UnusedModulation(nn.Module):
    """Holds the parameters of an official branch that the executed forward never calls.

    ``norm`` is a LayerNorm(D); ``mlp`` is ``[placeholder, Linear(in_dim, out_dim)]`` so
    the keys are ``norm.{weight,bias}`` and ``mlp.1.{weight,bias}`` as in the checkpoint.
    """

    def __init__(self, norm_dim: int | None, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if norm_dim is not None:
            self.norm = nn.LayerNorm(norm_dim)
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(in_dim, out_dim))


def _mlp(dim: int) -> nn.Sequential:
    # keys .0 (Linear E -> 4E) and .3 (Linear 4E -> E), as in the checkpoint
    return nn.Sequential(
        nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * dim, dim), nn.Dropout(0.0)
    )


def multihead_self_attention(
    x: torch.Tensor, attn: nn.MultiheadAttention, num_heads: int, fused: bool
) -> torch.Tensor:
    """Self-attention with the weights of a bias-free ``nn.MultiheadAttention``.

    Args:
        x: ``(B, L, E) float32``.
        attn: Holds ``in_proj_weight (3E, E)`` and ``out_proj.weight (E, E)``.
        num_heads: Heads; each is a contiguous chunk of ``E / num_heads`` channels.
        fused: Use ``F.scaled_dot_product_attention``; else explicit softmax (ONNX).

    Returns:
        ``(B, L, E) float32``.
    """
    qkv = F.linear(x, attn.in_proj_weight)  # (B, L, 3E): [q | k | v]
    q, k, v = qkv.chunk(3, dim=-1)
    # (B, L, E) -> (B, heads, L, hd)
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))
    if fused:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        scale = 1.0 / math.sqrt(q.shape[-1])
        # w[b, h, i, j] = softmax_j(sum_d q[b, h, i, d] * k[b, h, j, d] * scale)
        weights = torch.softmax(torch.matmul(q * scale, k.transpose(-2, -1)), dim=-1)
        out = torch.matmul(weights, v)
    out = out.transpose(1, 2).flatten(2)  # (B, L, E), heads concatenated
    return F.linear(out, attn.out_proj.weight)


class OfficialDecoderLayer(nn.Module):
    """``vol_decoder.layers.i``: two (self-attention, MLP) pairs with overwriting norms."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.fused_attn = True
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, bias=False, batch_first=True)
        self.self_attn2 = nn.MultiheadAttention(dim, num_heads, dropout=0.0, bias=False, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.norm4 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = _mlp(dim)
        self.mlp2 = _mlp(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One layer, in the official order.

        Args:
            x: ``(B, L, E) float32``.

        Returns:
            ``(B, L, E) float32``.
        """
        x = self.norm1(x)  # the stream itself is normalised (not pre-LN)
        x = x + multihead_self_attention(x, self.self_attn, self.num_heads, self.fused_attn)
        x = x + self.mlp(self.norm2(x))
        x = self.norm3(x)
        x = x + multihead_self_attention(x, self.self_attn2, self.num_heads, self.fused_attn)
        x = x + self.mlp2(self.norm4(x))
        return x


class OfficialVolDecoder(nn.Module):
    """``vol_decoder``: ``down_proj``, ``layers``; ``norm`` exists but is never applied."""

    def __init__(self, in_dim: int, dim: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.down_proj = nn.Linear(in_dim, dim)
        self.layers = nn.ModuleList(OfficialDecoderLayer(dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # unused, as in the official forward


class OfficialNetwork(nn.Module):
    """The official Pixel3DMM ``Network`` (executed branch), with its parameter names.

    Attributes:
        config: The :class:`OfficialConfig`.
        position_embedding_baked: True after :meth:`bake_position_embedding`.
    """

    img_encoder: OfficialDinoEncoder
    load_report: Any

    def __init__(self, config: OfficialConfig) -> None:
        super().__init__()
        self.config = config
        d, e = config.embed_dim, config.hidden_dim
        if config.n_views > 1:
            self.view_embed = nn.Parameter(torch.zeros(1, config.n_views, OFFICIAL_VIEW_DIM, 1, 1))
        self.img_encoder = OfficialDinoEncoder(config.backbone)
        self.dir_norm = _UnusedModulation(d, 32, 2 * d)
        self.dir_norm_uv = _UnusedModulation(d, d, 2 * d)
        self.uv_enc_mlp = _UnusedModulation(None, 24, d).mlp
        self.vol_decoder = OfficialVolDecoder(d + config.view_dim, e, config.num_layers, config.num_heads)
        self.t_conv1 = nn.ConvTranspose2d(e, e, 2, stride=2)
        self.t_conv2 = nn.ConvTranspose2d(e, e, 2, stride=2)
        self.t_conv3 = nn.ConvTranspose2d(e, e, 2, stride=2)
        self.token_2_patch_content = nn.Linear(e, 4 * config.out_channels)
        self.act = nn.GELU()
        self.position_embedding_baked = False
        set_fused_attention(self, config.fused_attn)

    def set_fused_attn(self, enabled: bool) -> None:
        """Fused attention on/off in the backbone and the decoder (off for ONNX export)."""
        set_fused_attention(self, enabled)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The official ``Network.forward`` for ``batch = {'tar_rgb': images}``.

        Args:
            images: ``(B, N, 512, 512, 3) float32`` RGB in [0, 1], N <= ``n_views``
                (N views share one decoder sequence; view n gets ``view_embed[:, n]``).

        Returns:
            ``{'normals': (B, N, 3, 512, 512)}`` or ``{'uv_map': (B, N, 2, 512, 512)}``,
            raw (no activation; the official range is about [-1, 1]).
        """
        cfg = self.config
        b, n = images.shape[0], images.shape[1]
        x = images.flatten(0, 1).permute(0, 3, 1, 2)  # (B*N, 3, H, W)
        tokens = self.img_encoder(x)  # (B*N, 1024, D)
        tokens = tokens.unflatten(0, (b, n))  # (B, N, 1024, D), channels-last
        if cfg.n_views > 1:
            # (1, n_views, 16, 1, 1) -> views 0..N-1 as (1, N, 1, 16), tiled over the grid
            view = self.view_embed[:, :n, :, 0, 0].unsqueeze(2)
            view = view.expand(b, -1, tokens.shape[2], -1)
            tokens = torch.cat([tokens, view], dim=-1)  # (B, N, 1024, D + 16)
        x = self.vol_decoder.down_proj(tokens)  # (B, N, 1024, E)
        x = x.flatten(1, 2)  # (B, N*1024, E) in (view, row, col) order
        for layer in self.vol_decoder.layers:
            x = layer(x)
        e, g = cfg.hidden_dim, OFFICIAL_GRID
        x = x.reshape(-1, g, g, e).permute(0, 3, 1, 2)  # (B*N, E, 32, 32)
        x = self.act(self.t_conv1(x))  # (B*N, E, 64, 64)
        x = self.act(self.t_conv2(x))  # (B*N, E, 128, 128)
        x = self.act(self.t_conv3(x))  # (B*N, E, 256, 256)
        x = self.token_2_patch_content(x.permute(0, 2, 3, 1))  # (B*N, 256, 256, 4C)
        c, s = cfg.out_channels, 8 * g
        # channel k = (p*2 + q)*C + c of position (i, j) -> img[c, 2i + p, 2j + q]
        x = x.reshape(-1, s, s, 2, 2, c).permute(0, 5, 1, 3, 2, 4)  # (B*N, C, i, p, j, q)
        img = x.reshape(b, n, c, 2 * s, 2 * s)
        return {cfg.output_key: img}

    @torch.no_grad()
    def bake_position_embedding(self) -> None:
        """Replace the run-time 14x14 -> 32x32 position-embedding resample by a fixed table.

        Computes the resampled ``(1, 1 + 1024, D)`` table once (the same timm call the
        dynamic path makes), rebuilds the timm ViT for 512 px without
        ``dynamic_img_size`` and loads the weights into it. Outputs are unchanged; the
        exported graph has no Resize. ``img_encoder.model.pos_embed`` then has shape
        ``(1, 1025, D)``, so the state dict no longer matches an official checkpoint.
        """
        if self.position_embedding_baked:
            return
        import timm
        from timm.layers import resample_abs_pos_embed

        old = self.img_encoder.model
        state = old.state_dict()
        state["pos_embed"] = resample_abs_pos_embed(
            old.pos_embed,
            new_size=[OFFICIAL_GRID, OFFICIAL_GRID],
            old_size=list(old.patch_embed.grid_size),
            num_prefix_tokens=0 if old.no_embed_class else old.num_prefix_tokens,
        )
        new = timm.create_model(
            self.config.backbone, pretrained=False, img_size=OFFICIAL_IMG_SIZE, dynamic_img_size=False
        )
        new.load_state_dict(state, strict=True)
        new.to(old.pos_embed.device).train(old.training)
        set_fused_attention(new, self.config.fused_attn)
        self.img_encoder.model = new
        self.position_embedding_baked = True


def official_postprocess(
    raw: torch.Tensor, task: str, flip_raw: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """The official inference script's post-processing, as p3dmm maps.

    With ``flip_raw`` (the net's output for the horizontally flipped image), the flipped
    prediction is flipped back, its channel 0 negated (plus 0.015 for uv) and averaged
    with ``raw``. Then uv -> ``clamp((a + 1) / 2, 0, 1)``; normals -> ``a / |a|`` and
    reordered to the head (FLAME) frame ``(n0, -n2, -n1)`` (raw channels are
    ``(x, -z, -y)`` of the head frame; see REFERENCE_FACTS section 4).

    Args:
        raw: ``(B, C, H, W) float32`` raw output (``net(x)[key][:, 0]``).
        task: ``'normals'`` (C = 3) or ``'uv'`` (C = 2).
        flip_raw: ``(B, C, H, W) float32`` raw output for ``image.flip(W)``, or None.
        eps: Lower bound of the normal length (the official script has none and gives
            NaN for a zero vector).

    Returns:
        ``(B, 3, H, W)`` unit normals in the head frame, or ``(B, 2, H, W)`` uv in [0, 1].
    """
    avg = average_flip(raw, task, flip_raw)
    if task == "uv":
        return torch.clamp((avg + 1.0) / 2.0, 0.0, 1.0)
    if task != "normals":
        raise InputError(f"official_postprocess: task {task!r}, expected 'normals' or 'uv'")
    n = avg / torch.clamp(torch.linalg.vector_norm(avg, dim=1, keepdim=True), min=eps)
    return torch.stack([n[:, 0], -n[:, 2], -n[:, 1]], dim=1)


def average_flip(raw: torch.Tensor, task: str, flip_raw: torch.Tensor | None) -> torch.Tensor:
    """Flip test-time augmentation of the official script (§4), before any activation.

    Args:
        raw: ``(B, C, H, W) float32``.
        task: ``'normals'`` or ``'uv'``.
        flip_raw: ``(B, C, H, W) float32`` output for the W-flipped input, or None.

    Returns:
        ``(B, C, H, W) float32``: ``(raw + f) / 2`` with ``f = flip_W(flip_raw)``,
        ``f0 <- -f0`` (``+ 0.015`` for uv); ``raw`` itself when ``flip_raw`` is None.
    """
    if flip_raw is None:
        return raw
    f = flip_raw.flip(-1)
    f0 = -f[:, :1]
    if task == "uv":
        f0 = f0 + OFFICIAL_UV_FLIP_OFFSET
    f = torch.cat([f0, f[:, 1:]], dim=1)
    return (raw + f) / 2.0


def official_saved_png_float(
    raw: torch.Tensor, task: str, flip_raw: torch.Tensor | None = None
) -> torch.Tensor:
    """The float image the official script multiplies by 255 and saves as PNG.

    Args:
        raw: ``(B, C, H, W) float32``.
        task: ``'normals'`` or ``'uv'``.
        flip_raw: As in :func:`official_postprocess`.

    Returns:
        ``(B, 3, H, W) float32`` in [0, 1]: normals ``(q0, 1 - q2, 1 - q1)`` with
        ``q = clamp((n + 1) / 2, 0, 1)``; uv ``(u, v, 0)``.
    """
    avg = average_flip(raw, task, flip_raw)
    if task == "uv":
        uv = torch.clamp((avg + 1.0) / 2.0, 0.0, 1.0)
        return torch.cat([uv, torch.zeros_like(uv[:, :1])], dim=1)
    n = avg / torch.linalg.vector_norm(avg, dim=1, keepdim=True)
    q = torch.clamp((n + 1.0) / 2.0, 0.0, 1.0)
    return torch.stack([q[:, 0], 1.0 - q[:, 2], 1.0 - q[:, 1]], dim=1)


class OfficialPredictor(nn.Module):
    """An :class:`OfficialNetwork` with p3dmm's predictor contract.

    ``(B, 3, 512, 512)`` RGB in [0, 1] -> ``{'normals': (B, 3, 512, 512)}`` unit length in
    the head frame, or ``{'uv': (B, 2, 512, 512)}`` in [0, 1]; optional flip averaging
    (one forward over the batch and its mirror, 2B images).
    """

    def __init__(self, network: OfficialNetwork, flip_tta: bool = True) -> None:
        super().__init__()
        self.network = network
        self.flip_tta = bool(flip_tta)
        self.task = network.config.task

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict.

        Args:
            image: ``(B, 3, 512, 512) float32`` RGB in [0, 1].

        Returns:
            ``{'normals': (B, 3, 512, 512)}`` or ``{'uv': (B, 2, 512, 512)}``.
        """
        x = image.permute(0, 2, 3, 1).unsqueeze(1)  # (B, 1, H, W, 3)
        b = image.shape[0]
        if self.flip_tta:
            x = torch.cat([x, x.flip(3)], dim=0)  # (2B, 1, H, W, 3)
        raw = self.network(x)[self.network.config.output_key][:, 0]  # (B or 2B, C, H, W)
        flip_raw = None
        if self.flip_tta:
            raw, flip_raw = raw[:b], raw[b:]
        return {self.task: official_postprocess(raw, self.task, flip_raw)}


# ---------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class OfficialLoadReport:
    """Key bookkeeping of :func:`load_official_checkpoint`.

    Attributes:
        missing: Network parameters the checkpoint lacks (kept at random init).
        unexpected: Checkpoint keys with no network parameter.
        ignored: Known non-network keys that were skipped (``vertex_weight_mask``).
    """

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]


def _network_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip ``net.`` (when the keys carry it) and drop the system's own keys."""
    tensors = {str(k): v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    has_prefix = any(k.startswith(NET_PREFIX) for k in tensors)
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in tensors.items():
        if key in IGNORED_CHECKPOINT_KEYS:
            ignored.append(key)
        elif has_prefix and key.startswith(NET_PREFIX):
            out[key[len(NET_PREFIX) :]] = value
        else:
            out[key] = value  # reported as unexpected by the loader
    return out, ignored


def _cfg_lookup(cfg: Any, path: Sequence[str]) -> Any:
    """``cfg.a.b`` for a dict, an OmegaConf node or an object; None when absent."""
    node = cfg
    for name in path:
        if node is None:
            return None
        if isinstance(node, Mapping):
            node = node.get(name)
        else:
            try:
                node = getattr(node, name)
            except Exception:  # noqa: BLE001 - OmegaConf raises its own errors
                return None
    return node


def infer_official_config(
    state_dict: Mapping[str, Any], hparams: Any = None, *, source: str = "checkpoint"
) -> OfficialConfig:
    """Derive an :class:`OfficialConfig` from parameter shapes (REFERENCE_FACTS §5).

    Args:
        state_dict: Network keys, with or without the ``net.`` prefix.
        hparams: ``ckpt['hyper_parameters']`` or its ``cfg`` (dict or OmegaConf), or
            None. Only ``cfg.model.num_heads`` is read (default 8): the head count is not
            visible in the shapes.
        source: Name of the checkpoint for error messages.

    Returns:
        The config.

    Raises:
        ModelFileError: A required key is missing, a shape is not an official one, or
            the checkpoint uses a branch this re-implementation does not have.
    """
    sd, _ = _network_state_dict(state_dict)

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ModelFileError(f"{source}: key {key!r} not found; not an official Pixel3DMM network")
        return sd[key]

    for key, what in _UNSUPPORTED_BRANCHES.items():
        if key in sd:
            raise ModelFileError(f"{source}: has {key!r}, i.e. {what}, which p3dmm does not implement")
    pos = need("img_encoder.model.pos_embed")
    d = int(pos.shape[-1])
    if d not in OFFICIAL_BACKBONES or tuple(pos.shape) != (1, 197, d):
        raise ModelFileError(
            f"{source}: key 'img_encoder.model.pos_embed' has shape {tuple(pos.shape)}, expected "
            f"(1, 197, 384) (ViT-S/16) or (1, 197, 768) (ViT-B/16)"
        )
    patch = need("img_encoder.model.patch_embed.proj.weight")
    if tuple(patch.shape) != (d, 3, 16, 16):
        raise ModelFileError(
            f"{source}: key 'img_encoder.model.patch_embed.proj.weight' has shape "
            f"{tuple(patch.shape)}, expected ({d}, 3, 16, 16)"
        )
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"img_encoder\.model\.blocks\.(\d+)\.", k))}
    if blocks != set(range(OFFICIAL_BACKBONE_BLOCKS)):
        raise ModelFileError(
            f"{source}: backbone has blocks {sorted(blocks)}, expected 0..{OFFICIAL_BACKBONE_BLOCKS - 1}"
        )
    view = sd.get("view_embed")
    if view is not None:
        if view.ndim != 5 or view.shape[0] != 1 or tuple(view.shape[2:]) != (OFFICIAL_VIEW_DIM, 1, 1):
            raise ModelFileError(
                f"{source}: key 'view_embed' has shape {tuple(view.shape)}, expected "
                f"(1, n_views, {OFFICIAL_VIEW_DIM}, 1, 1)"
            )
        n_views, view_dim = int(view.shape[1]), OFFICIAL_VIEW_DIM
    else:
        n_views, view_dim = 1, 0
    down = need("vol_decoder.down_proj.weight")
    if down.ndim != 2 or down.shape[1] != d + view_dim:
        raise ModelFileError(
            f"{source}: key 'vol_decoder.down_proj.weight' has shape {tuple(down.shape)}, expected "
            f"(E, {d + view_dim}) (D={d}" + (f" + view embedding {view_dim})" if view_dim else ")")
        )
    e = int(down.shape[0])
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"vol_decoder\.layers\.(\d+)\.", k))}
    if layers != set(range(len(layers))):
        raise ModelFileError(f"{source}: decoder layers {sorted(layers)} are not numbered 0..L-1")
    out = need("token_2_patch_content.weight")
    rows = int(out.shape[0])
    tasks = {4 * c: task for task, (_, c) in OFFICIAL_TASKS.items()}
    if tuple(out.shape[1:]) != (e,) or rows not in tasks:
        hint = ""
        if rows in (24, 16):
            hint = " (pred_disentangled, not supported)"
        elif rows in (256 * 3, 256 * 2):
            hint = " (conv_dec=False, not supported)"
        raise ModelFileError(
            f"{source}: key 'token_2_patch_content.weight' has shape {tuple(out.shape)}, expected "
            f"(12, {e}) for normals or (8, {e}) for uv{hint}"
        )
    heads = _cfg_lookup(hparams, ("cfg", "model", "num_heads"))
    if heads is None:
        heads = _cfg_lookup(hparams, ("model", "num_heads"))
    heads = 8 if heads is None else int(heads)
    try:
        return OfficialConfig(
            backbone=OFFICIAL_BACKBONES[d],
            task=tasks[rows],
            n_views=n_views,
            hidden_dim=e,
            num_layers=len(layers),
            num_heads=heads,
        )
    except InputError as err:
        raise ModelFileError(f"{source}: {err}") from err


def _read_checkpoint(path: Path, trusted: bool) -> Mapping[str, Any]:
    if not path.is_file():
        raise ModelFileError(f"{path}: official checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:
        if not trusted:
            raise ModelFileError(
                f"{path}: cannot be read with weights_only=True ({type(safe_error).__name__}: "
                f"{safe_error}); Lightning checkpoints pickle their OmegaConf hyper-parameters. "
                "If you trust the file, pass trusted=True (needs omegaconf installed)."
            ) from safe_error
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ModelFileError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def load_official_checkpoint(
    source: str | Path | Mapping[str, Any],
    *,
    strict: bool = True,
    num_heads: int | None = None,
    trusted: bool = False,
    fused_attn: bool = True,
) -> tuple[OfficialNetwork, OfficialConfig]:
    """Build an :class:`OfficialNetwork` from an official (Lightning) checkpoint.

    Args:
        source: A checkpoint path or an already loaded dict: a Lightning checkpoint
            (``state_dict`` with ``net.``-prefixed keys, the system buffer
            ``vertex_weight_mask`` ignored, optional ``hyper_parameters.cfg``) or a bare
            network state dict.
        strict: Raise when network parameters are missing or keys are unexpected (the
            official loader uses ``strict=False`` and silently keeps random init); when
            False, warn. The report is stored as ``model.load_report``.
        num_heads: Decoder heads, overriding ``cfg.model.num_heads`` (default 8).
        trusted: Allow a full (non ``weights_only``) unpickle of a checkpoint file.
        fused_attn: Initial fused-attention setting.

    Returns:
        ``(model, config)``; the model is in eval mode, on CPU, float32.

    Raises:
        ModelFileError: Unreadable file, non-official shapes, shape mismatches, or (with
            ``strict``) missing/unexpected keys.
    """
    name = str(source) if isinstance(source, (str, Path)) else "checkpoint dict"
    ckpt = _read_checkpoint(Path(source), trusted) if isinstance(source, (str, Path)) else source
    if not isinstance(ckpt, Mapping):
        raise ModelFileError(f"{name}: expected a dict, got {type(ckpt).__name__}")
    raw_sd = ckpt.get("state_dict", ckpt)
    if not isinstance(raw_sd, Mapping):
        raise ModelFileError(f"{name}: 'state_dict' is a {type(raw_sd).__name__}, expected a dict")
    hparams = ckpt.get("hyper_parameters")
    config = infer_official_config(raw_sd, hparams, source=name)
    overrides: dict[str, Any] = {"fused_attn": fused_attn}
    if num_heads is not None:
        overrides["num_heads"] = int(num_heads)
    try:
        config = OfficialConfig(**{**config.__dict__, **overrides})
    except InputError as err:
        raise ModelFileError(f"{name}: {err}") from err
    sd, ignored = _network_state_dict(raw_sd)
    model = OfficialNetwork(config)
    expected = model.state_dict()
    for key, value in sd.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise ModelFileError(
                f"{name}: key {key!r} has shape {tuple(value.shape)}, expected "
                f"{tuple(expected[key].shape)} for {config}"
            )
    missing = tuple(k for k in expected if k not in sd)
    unexpected = tuple(k for k in sd if k not in expected)
    if missing or unexpected:
        message = f"{name}: missing keys {list(missing)[:8]}; unexpected keys {list(unexpected)[:8]}"
        if strict:
            raise ModelFileError(message + " (pass strict=False to keep random init for them)")
        warnings.warn(message, stacklevel=2)
    model.load_state_dict({k: v.float() for k, v in sd.items() if k in expected}, strict=False)
    model.load_report = OfficialLoadReport(missing=missing, unexpected=unexpected, ignored=tuple(ignored))
    model.eval()
    return model, config


# ------------------------------------------------------------------- numeric self-check init


def crc32_init_state_dict(shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights by key name (REFERENCE_FACTS §6 "crc32 init").

    For each key, ``r = randn(shape)`` from a generator seeded with ``crc32(name)``, then
    ``0.5 r`` for ``*pos_embed``/``*cls_token``/``*view_embed``; ``1 + 0.1 r`` for 1-D
    ``*.norm*.weight`` (LayerNorm gains); ``0.1 r`` for other 1-D tensors; otherwise
    ``r / sqrt(numel / shape[0])``. A key's value depends only on its name and shape, so
    any implementation with the official names gets the same weights.

    Args:
        shapes: ``{name: shape}`` (e.g. one config of the official shapes JSON, or
            ``{k: v.shape for k, v in model.state_dict().items()}``).

    Returns:
        ``{name: float32 tensor}``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        r = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith(("pos_embed", "cls_token", "view_embed")):
            value = 0.5 * r
        elif len(shape) == 1 and fnmatch.fnmatchcase(name, "*.norm*.weight"):
            value = 1.0 + 0.1 * r
        elif len(shape) == 1:
            value = 0.1 * r
        else:
            value = r / math.sqrt(r.numel() / shape[0])
        out[name] = value
    return out
