"""Pixel3DMM-style dense predictors: a timm DINOv2 backbone and a transformer/up-conv head.

A :class:`Predictor` maps a face crop ``(B, 3, 512, 512) float32`` in ``[0, 1]`` to
per-pixel maps (``normals`` or ``uv``, optionally ``mask``). Everything between the
input contract and the outputs happens inside the graph, so one ONNX file is the whole
model:

1. ImageNet mean/std normalisation (constant buffers).
2. A fixed linear resample 512 -> 448 written as two matrix products with constant
   matrices, ``x448 = R @ x512 @ R^T`` with ``R`` of shape ``(448, 512)``. ``R`` is
   torch's *antialiased bilinear* resample (triangle filter widened by 512/448,
   ``align_corners=False``), captured once at construction by resampling an identity
   matrix. Why not ``F.interpolate`` in the graph: ONNX ``Resize`` with antialiasing
   needs opset 18 and is implemented differently (or not at all) across ONNX Runtime
   and TensorRT, and the non-antialiased variant aliases at a 0.875 scale. Two MatMul
   nodes are exact, run identically in every runtime and cost ~0.7 GMAC per image
   (about 2 % of a ViT-S/14 at 448, less for larger backbones).
3. The timm DINOv2 backbone, created at ``img_size=448`` so its position embedding
   is a 32x32 grid from the start (pretrained weights are resampled once, at load,
   by :mod:`p3dmm.training.pretrained`); no dynamic-size interpolation in the graph.
4. The head (:class:`DenseHead`): ``head_depth`` pre-LN transformer blocks over the
   1024 tokens, three stride-2 transposed convolutions with GELU (32 -> 64 -> 128 ->
   256), a per-pixel linear layer to ``4 * C`` channels (a 1x1 convolution) and a 2x2
   unpatchify (``pixel_shuffle``) to ``(B, C, 512, 512)``.
5. Output activations: normals are L2-normalised (eps-safe); uv and mask use a
   sigmoid, which keeps them in ``(0, 1)`` with a gradient everywhere (a clamp would
   stop the gradient of every pixel pushed outside the range).

Fused attention (``F.scaled_dot_product_attention``) is used in training and switched
off for ONNX export with :func:`set_fused_attention` (all timm ``Attention`` modules
carry a ``fused_attn`` attribute; the head uses timm blocks too).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from p3dmm.fitting.base.errors import InputError
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Backbone names accepted by :class:`PredictorConfig` (timm model names).
DINOV2_BACKBONES = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_giant_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "vit_giant_patch14_reg4_dinov2",
)
#: A DINOv2-shaped ViT small enough for unit tests (patch 14, embed 48, depth 2, 3 heads).
TINY_BACKBONE = "tiny_patch14_dinov2"
TINY_BACKBONE_ARGS: dict[str, Any] = {"patch_size": 14, "embed_dim": 48, "depth": 2, "num_heads": 3, "init_values": 1e-5}
#: The embedded default predictors' backbone: DINOv2's ViT structure (patch 14, layer
#: scale, class token, final norm) at ViT-Ti width (embed 192, depth 6, 3 heads; 2.7 M
#: parameters), small enough to train from scratch on two CPU cores in about an hour.
MINI_BACKBONE = "mini_patch14_dinov2"
MINI_BACKBONE_ARGS: dict[str, Any] = {"patch_size": 14, "embed_dim": 192, "depth": 6, "num_heads": 3, "init_values": 1e-5}
#: Backbones built here (not timm registry names), by name.
CUSTOM_BACKBONES: dict[str, dict[str, Any]] = {TINY_BACKBONE: TINY_BACKBONE_ARGS, MINI_BACKBONE: MINI_BACKBONE_ARGS}

TASK_CHANNELS = {"normals": 3, "uv": 2}
PATCH_SIZE = 14
UNPATCH = 2  # the last 2x2 unpatchify step
N_UPCONV = 3  # stride-2 transposed convolutions


@dataclass(frozen=True)
class PredictorConfig:
    """Architecture of a :class:`Predictor` (one source of truth; stored in checkpoints).

    Attributes:
        backbone: timm DINOv2 model name from :data:`DINOV2_BACKBONES`, or
            :data:`TINY_BACKBONE` (tests) or :data:`MINI_BACKBONE` (the embedded defaults).
        task: ``'normals'`` (3 channels, unit length) or ``'uv'`` (2 channels in [0, 1]).
        head_dim: Width E of the head (tokens and up-convolutions).
        head_depth: Number of transformer blocks in the head.
        head_heads: Attention heads in the head blocks (must divide ``head_dim``).
        mask_channel: Also predict a ``mask`` (B, 1, H, W) face-region probability.
        fused_attn: Use fused scaled-dot-product attention (off for ONNX export).
        img_size: Input and output resolution (square).
        backbone_img_size: Resolution the backbone sees; ``backbone_img_size / 14``
            must equal ``img_size / 16`` (the head upsamples the token grid 16x).
    """

    backbone: str = "vit_base_patch14_dinov2"
    task: str = "normals"
    head_dim: int = 256
    head_depth: int = 4
    head_heads: int = 8
    mask_channel: bool = False
    fused_attn: bool = True
    img_size: int = 512
    backbone_img_size: int = 448

    def __post_init__(self) -> None:
        if self.backbone not in DINOV2_BACKBONES and self.backbone not in CUSTOM_BACKBONES:
            raise InputError(
                f"PredictorConfig.backbone: got {self.backbone!r}, expected one of "
                f"{DINOV2_BACKBONES + tuple(CUSTOM_BACKBONES)}"
            )
        if self.task not in TASK_CHANNELS:
            raise InputError(f"PredictorConfig.task: got {self.task!r}, expected 'normals' or 'uv'")
        if self.head_dim <= 0 or self.head_heads <= 0 or self.head_dim % self.head_heads:
            raise InputError(
                f"PredictorConfig: head_dim {self.head_dim} must be a positive multiple of "
                f"head_heads {self.head_heads}"
            )
        if self.head_depth < 0:
            raise InputError(f"PredictorConfig.head_depth: got {self.head_depth}, expected >= 0")
        upsample = 2**N_UPCONV * UNPATCH
        if self.img_size % upsample or self.backbone_img_size % PATCH_SIZE:
            raise InputError(
                f"PredictorConfig: img_size {self.img_size} must be a multiple of {upsample} and "
                f"backbone_img_size {self.backbone_img_size} a multiple of {PATCH_SIZE}"
            )
        if self.backbone_img_size // PATCH_SIZE != self.img_size // upsample:
            raise InputError(
                f"PredictorConfig: token grid {self.backbone_img_size // PATCH_SIZE} "
                f"(backbone_img_size {self.backbone_img_size} / {PATCH_SIZE}) must equal "
                f"img_size {self.img_size} / {upsample} = {self.img_size // upsample}"
            )

    @property
    def grid_size(self) -> int:
        """Side of the backbone token grid (32 for 448 / 14)."""
        return self.backbone_img_size // PATCH_SIZE

    @property
    def task_channels(self) -> int:
        """Channels of the task output: 3 for normals, 2 for uv."""
        return TASK_CHANNELS[self.task]

    @property
    def out_channels(self) -> int:
        """Channels the head predicts (task channels plus an optional mask channel)."""
        return self.task_channels + int(self.mask_channel)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the output tensors, in the order :meth:`Predictor.forward` returns them."""
        return (self.task, "mask") if self.mask_channel else (self.task,)

    @classmethod
    def tiny(cls, task: str = "normals", **overrides: Any) -> PredictorConfig:
        """A test-sized configuration (tiny ViT backbone, head dim 32, depth 1, 2 heads)."""
        kwargs: dict[str, Any] = {
            "backbone": TINY_BACKBONE, "task": task, "head_dim": 32, "head_depth": 1, "head_heads": 2
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for checkpoints and manifests."""
        return dataclasses.asdict(self)


def build_backbone(name: str, img_size: int = 448) -> nn.Module:
    """Create a randomly initialised timm DINOv2 ViT (never downloads weights).

    Args:
        name: A name from :data:`DINOV2_BACKBONES` or :data:`CUSTOM_BACKBONES`.
        img_size: Input resolution; the absolute position embedding is created for the
            ``img_size / 14`` grid, so nothing is interpolated at run time.

    Returns:
        A timm ``VisionTransformer`` without classifier head (``num_classes=0``).
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if name in CUSTOM_BACKBONES:
        return VisionTransformer(img_size=img_size, num_classes=0, **CUSTOM_BACKBONES[name])
    if name not in DINOV2_BACKBONES:
        raise InputError(f"build_backbone: got {name!r}, expected one of {DINOV2_BACKBONES}")
    return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)


def set_fused_attention(module: nn.Module, enabled: bool) -> int:
    """Switch fused attention on or off in every submodule that has a ``fused_attn`` flag.

    Args:
        module: Any module tree (a :class:`Predictor`, a timm ViT, an official network).
        enabled: True for ``F.scaled_dot_product_attention``, False for the explicit
            softmax(QK^T)V form that exports to plain ONNX ops.

    Returns:
        Number of submodules changed.
    """
    count = 0
    for sub in module.modules():
        if hasattr(sub, "fused_attn"):
            setattr(sub, "fused_attn", bool(enabled))
            count += 1
    return count


def linear_resample_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """The matrix of torch's antialiased bilinear 1-D resample (``align_corners=False``).

    Resampling an image ``x (..., size_in, size_in)`` to ``size_out`` is
    ``R @ x @ R.T`` with the returned ``R``; this equals
    ``F.interpolate(x, size_out, mode='bilinear', antialias=True)`` (to float rounding).
    When ``size_out < size_in`` the triangle filter is widened by ``size_in / size_out``.

    Args:
        size_in: Input length.
        size_out: Output length.

    Returns:
        ``(size_out, size_in) float32``, rows sum to 1.
    """
    eye = torch.eye(size_in, dtype=torch.float32)[None, None]  # (1, 1, n_in, n_in)
    # Resampling the rows of the identity (the column axis keeps its size, where the
    # filter is the identity) gives R itself: out[i, j] = sum_k R[i, k] * I[k, j].
    with torch.no_grad():
        mat = F.interpolate(
            eye, size=(size_out, size_in), mode="bilinear", align_corners=False, antialias=True
        )
    return mat[0, 0].contiguous()


class DenseHead(nn.Module):
    """Tokens on a G x G grid -> a dense (B, C, 16 G, 16 G) map.

    Layers: ``down_proj`` (Linear D -> E), ``blocks`` (timm pre-LN transformer blocks,
    E wide), ``norm``, three ConvTranspose2d(E, E, 2, stride 2) each followed by GELU,
    ``to_pixels`` (a per-pixel linear E -> 4 C, written as a 1x1 convolution) and a 2x2
    unpatchify: channel ``c * 4 + p * 2 + q`` of position (i, j) goes to output pixel
    ``(2 i + p, 2 j + q)`` of channel ``c`` (``F.pixel_shuffle``, ONNX DepthToSpace CRD).
    """

    def __init__(
        self, in_dim: int, dim: int, depth: int, heads: int, out_channels: int, grid_size: int
    ) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.grid_size = int(grid_size)
        self.dim = int(dim)
        self.down_proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.up = nn.ModuleList(nn.ConvTranspose2d(dim, dim, 2, stride=2) for _ in range(N_UPCONV))
        self.act = nn.GELU()
        self.to_pixels = nn.Conv2d(dim, UNPATCH * UNPATCH * out_channels, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode tokens to a dense map.

        Args:
            tokens: ``(B, G*G, D) float32`` backbone tokens in row-major grid order,
                without prefix (class / register) tokens.

        Returns:
            ``(B, C, 16 G, 16 G) float32`` raw (pre-activation) outputs.
        """
        x = self.down_proj(tokens)  # (B, G*G, E)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        # (B, G*G, E) -> (B, E, G, G); sizes are Python constants, not traced values.
        x = x.transpose(1, 2).reshape(-1, self.dim, self.grid_size, self.grid_size)
        for up in self.up:
            x = self.act(up(x))  # G -> 2G -> 4G -> 8G
        x = self.to_pixels(x)  # (B, 4C, 8G, 8G)
        return F.pixel_shuffle(x, UNPATCH)  # (B, C, 16G, 16G)


class Predictor(nn.Module):
    """DINOv2 backbone + dense head: ``(B, 3, 512, 512)`` in [0, 1] -> per-pixel maps.

    Attributes:
        config: The :class:`PredictorConfig` it was built from.
        backbone: timm VisionTransformer at ``config.backbone_img_size``.
        head: :class:`DenseHead`.
    """

    # buffers and the timm backbone, typed for mypy (nn.Module.__getattr__ is untyped)
    backbone: Any
    pixel_mean: torch.Tensor
    pixel_std: torch.Tensor
    resample_rows: torch.Tensor
    resample_cols: torch.Tensor

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.backbone, img_size=config.backbone_img_size)
        self.num_prefix_tokens = int(self.backbone.num_prefix_tokens)
        self.head = DenseHead(
            in_dim=int(self.backbone.embed_dim),
            dim=config.head_dim,
            depth=config.head_depth,
            heads=config.head_heads,
            out_channels=config.out_channels,
            grid_size=config.grid_size,
        )
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        # Derived from the config, so not saved in the state dict.
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.resizes = config.img_size != config.backbone_img_size
        if self.resizes:
            rows = linear_resample_matrix(config.img_size, config.backbone_img_size)
            self.register_buffer("resample_rows", rows, persistent=False)  # (448, 512)
            self.register_buffer("resample_cols", rows.t().contiguous(), persistent=False)
        self.normal_eps = 1e-6
        set_fused_attention(self, config.fused_attn)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch fused attention on/off in the backbone and the head (off for ONNX)."""
        set_fused_attention(self, enabled)

    def backbone_input(self, image: torch.Tensor) -> torch.Tensor:
        """Normalise and resample the input as the backbone sees it.

        Args:
            image: ``(B, 3, S, S) float32`` in [0, 1], S = ``config.img_size``.

        Returns:
            ``(B, 3, S', S') float32``, S' = ``config.backbone_img_size``.
        """
        x = (image - self.pixel_mean) / self.pixel_std
        if self.resizes:
            # x'[b, c, i, j] = sum_{k, l} R[i, k] * x[b, c, k, l] * R[j, l]
            x = torch.matmul(torch.matmul(self.resample_rows, x), self.resample_cols)
        return x

    def forward_raw(self, image: torch.Tensor) -> torch.Tensor:
        """The head's raw output before activations.

        Args:
            image: ``(B, 3, 512, 512) float32`` in [0, 1].

        Returns:
            ``(B, config.out_channels, 512, 512) float32``.
        """
        x = self.backbone_input(image)
        tokens = self.backbone.forward_features(x)  # (B, prefix + G*G, D), final norm applied
        tokens = tokens[:, self.num_prefix_tokens :]
        return self.head(tokens)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict the maps of ``config.task`` (and the mask when configured).

        Args:
            image: ``(B, 3, 512, 512) float32`` RGB in [0, 1].

        Returns:
            ``{'normals': (B, 3, 512, 512) unit length}`` or ``{'uv': (B, 2, 512, 512)
            in (0, 1)}``, plus ``'mask': (B, 1, 512, 512) in (0, 1)`` when
            ``config.mask_channel``.
        """
        raw = self.forward_raw(image)
        c = self.config.task_channels
        task_raw = raw[:, :c]
        out: dict[str, torch.Tensor] = {}
        if self.config.task == "normals":
            length = torch.sqrt(torch.sum(task_raw * task_raw, dim=1, keepdim=True))
            out["normals"] = task_raw / torch.clamp(length, min=self.normal_eps)
        else:
            out["uv"] = torch.sigmoid(task_raw)
        if self.config.mask_channel:
            out["mask"] = torch.sigmoid(raw[:, c : c + 1])
        return out


def param_groups(
    model: Predictor, lr: float, backbone_lr_ratio: float = 0.1, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the backbone at ``lr * backbone_lr_ratio``, the rest at ``lr``.

    Args:
        model: A :class:`Predictor`.
        lr: Head learning rate (paper: 1e-4).
        backbone_lr_ratio: Backbone lr / head lr (paper: 1/10).
        weight_decay: Weight decay for both groups.

    Returns:
        Two dicts ``{'name', 'params', 'lr', 'weight_decay'}`` (backbone first) for
        ``torch.optim`` constructors; frozen parameters are left out.
    """
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in backbone_ids]
    return [
        {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_ratio, "weight_decay": weight_decay},
        {"name": "head", "params": head, "lr": lr, "weight_decay": weight_decay},
    ]
