"""Predictor (DINOv2 + dense head) and DINOv2 weight loading."""

from __future__ import annotations

import dataclasses
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import torch.nn.functional as F
from numpy.testing import assert_allclose
from p3dmm.fitting.base.errors import InputError, ModelFileError
from p3dmm.training.networks import (
    MINI_BACKBONE,
    TINY_BACKBONE,
    TINY_BACKBONE_ARGS,
    Predictor,
    PredictorConfig,
    build_backbone,
    linear_resample_matrix,
    param_groups,
    set_fused_attention,
)
from p3dmm.training.pretrained import load_dinov2_backbone, load_pretrained_backbone


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))


def _tiny(task: str, mask: bool = True, seed: int = 0) -> Predictor:
    torch.manual_seed(seed)
    return Predictor(PredictorConfig.tiny(task, mask_channel=mask)).eval()


# ------------------------------------------------------------------------------- Predictor


@pytest.mark.parametrize("task", ["normals", "uv"])
def test_tiny_forward_shapes_and_ranges(task: str, image: torch.Tensor) -> None:
    model = _tiny(task)
    with torch.no_grad():
        out = model(image)
    c = 3 if task == "normals" else 2
    assert set(out) == {task, "mask"}
    assert out[task].shape == (2, c, 512, 512) and out[task].dtype == torch.float32
    assert out["mask"].shape == (2, 1, 512, 512)
    assert torch.isfinite(out[task]).all() and torch.isfinite(out["mask"]).all()
    assert out["mask"].min() >= 0.0 and out["mask"].max() <= 1.0
    if task == "normals":
        assert_allclose(out[task].norm(dim=1).numpy(), 1.0, rtol=0, atol=1e-5)
    else:
        assert out[task].min() >= 0.0 and out[task].max() <= 1.0
    assert model.config.output_names == (task, "mask")


def test_no_mask_channel_and_zero_normal_is_finite() -> None:
    model = _tiny("normals", mask=False)
    with torch.no_grad():
        # A head that outputs exactly zero must not give NaN normals (eps-safe).
        for p in model.head.to_pixels.parameters():
            p.zero_()
        out = model(torch.rand(1, 3, 512, 512))
    assert set(out) == {"normals"}
    assert torch.isfinite(out["normals"]).all()


def test_forward_is_deterministic(image: torch.Tensor) -> None:
    model = _tiny("normals")
    with torch.no_grad():
        a = model(image)["normals"]
        b = model(image)["normals"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("task", ["normals", "uv"])
def test_unfused_attention_matches_fused(task: str, image: torch.Tensor) -> None:
    model = _tiny(task)
    assert model.config.fused_attn
    with torch.no_grad():
        fused = model(image)
        model.set_fused_attn(False)
        assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
        plain = model(image)
    for key in fused:
        assert_allclose(plain[key].numpy(), fused[key].numpy(), rtol=0, atol=1e-5)


def test_set_fused_attention_reaches_backbone_and_head() -> None:
    model = _tiny("uv")
    n = set_fused_attention(model, False)
    # 2 tiny backbone blocks + 1 head block
    assert n == TINY_BACKBONE_ARGS["depth"] + model.config.head_depth
    assert model.backbone.blocks[0].attn.fused_attn is False
    assert model.head.blocks[0].attn.fused_attn is False
    cfg_off = PredictorConfig.tiny("uv", fused_attn=False)
    built = Predictor(cfg_off)
    assert all(not m.fused_attn for m in built.modules() if hasattr(m, "fused_attn"))


def test_param_groups_backbone_lr_is_tenth() -> None:
    model = _tiny("normals")
    groups = param_groups(model, lr=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(1e-5)
    assert by_name["head"]["lr"] == pytest.approx(1e-4)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    torch.optim.AdamW(groups)  # accepted by an optimizer as is


def test_gradients_reach_backbone_and_head() -> None:
    model = _tiny("uv").train()
    out = model(torch.rand(1, 3, 512, 512))
    (out["uv"].mean() + out["mask"].mean()).backward()
    assert model.backbone.patch_embed.proj.weight.grad is not None
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.head.to_pixels.weight.grad.abs().sum() > 0


def test_resample_matrix_is_antialiased_bilinear(image: torch.Tensor) -> None:
    mat = linear_resample_matrix(512, 448)
    assert mat.shape == (448, 512)
    assert_allclose(mat.sum(dim=1).numpy(), 1.0, rtol=0, atol=1e-6)
    ref = F.interpolate(image, size=(448, 448), mode="bilinear", align_corners=False, antialias=True)
    got = mat @ image @ mat.T
    assert_allclose(got.numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_backbone_input_is_normalised_and_resized(image: torch.Tensor) -> None:
    model = _tiny("normals")
    x = model.backbone_input(image)
    assert x.shape == (2, 3, 448, 448)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    ref = F.interpolate((image - mean) / std, size=(448, 448), mode="bilinear", antialias=True)
    assert_allclose(x.numpy(), ref.numpy(), rtol=0, atol=1e-5)
    # static 32x32 position table, no run-time interpolation
    assert model.backbone.pos_embed.shape == (1, 1 + 32 * 32, 48)
    assert not model.backbone.dynamic_img_size
    # non-persistent constants are not in the state dict
    assert not any("resample" in k or "pixel_" in k for k in model.state_dict())


def test_real_backbone_builds_at_448() -> None:
    model = Predictor(PredictorConfig(backbone="vit_small_patch14_dinov2", head_depth=1))
    assert model.backbone.pos_embed.shape == (1, 1025, 384)
    assert model.backbone.patch_embed.grid_size == (32, 32)
    assert model.backbone.num_prefix_tokens == 1


def test_mini_backbone_of_the_embedded_predictors() -> None:
    """The embedded defaults' architecture: DINOv2-structured ViT at ViT-Ti width, 160 px io,
    a 10 x 10 token grid; 3.2 M parameters (about 6.5 MB in fp16)."""
    cfg = PredictorConfig(backbone=MINI_BACKBONE, task="uv", mask_channel=True, img_size=160, backbone_img_size=140,
                          head_dim=128, head_depth=1, head_heads=4)  # fmt: skip
    model = Predictor(cfg).eval()
    assert model.backbone.embed_dim == 192 and len(model.backbone.blocks) == 6 and cfg.grid_size == 10
    assert model.backbone.blocks[0].ls1.gamma.shape == (192,)  # DINOv2's layer scale
    assert 3.0e6 < sum(p.numel() for p in model.parameters()) < 3.5e6
    with torch.no_grad():
        out = model(torch.rand(1, 3, 160, 160))
    assert out["uv"].shape == (1, 2, 160, 160) and out["mask"].shape == (1, 1, 160, 160)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(backbone="resnet50"), "backbone"),
        (dict(task="depth"), "task"),
        (dict(head_dim=30, head_heads=8), "head_dim"),
        (dict(backbone_img_size=518), "token grid"),
    ],
)
def test_config_validation(kwargs: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        PredictorConfig(**kwargs)


def test_config_is_frozen_and_serialisable() -> None:
    cfg = PredictorConfig.tiny("uv")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.task = "normals"  # type: ignore[misc]
    assert PredictorConfig(**cfg.to_dict()) == cfg
    assert cfg.grid_size == 32 and cfg.out_channels == 2


# ------------------------------------------------------------------ DINOv2 weight files


def _source_backbone(seed: int, **kwargs) -> torch.nn.Module:
    """A tiny DINOv2-shaped ViT at 518 px (37x37 grid) with non-trivial random weights."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    args = dict(TINY_BACKBONE_ARGS, **kwargs)
    model = VisionTransformer(img_size=518, num_classes=0, **args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _reference_grid_resample(pos: torch.Tensor, n_prefix: int, grid: int = 32) -> torch.Tensor:
    """Independent bicubic antialiased resample of a (1, prefix + g*g, D) table."""
    prefix, table = pos[:, :n_prefix], pos[:, n_prefix:]
    g = round(table.shape[1] ** 0.5)
    table = table.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([prefix, table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _assert_loaded(target: torch.nn.Module, source_sd: dict, n_prefix: int = 1) -> None:
    got = target.state_dict()
    for key, value in source_sd.items():
        if key == "pos_embed":
            ref = _reference_grid_resample(value, n_prefix)
            assert_allclose(got[key].numpy(), ref.numpy(), rtol=0, atol=1e-6)
        else:
            assert torch.equal(got[key], value), key


def _meta_layout(sd: dict, dim: int) -> dict:
    meta = {k: v.clone() for k, v in sd.items()}
    meta["mask_token"] = torch.randn(1, dim)  # iBOT token, dropped by the loader
    return meta


def test_load_timm_safetensors_layout(tmp_path) -> None:
    from safetensors.torch import save_file

    source = _source_backbone(1)
    sd = {k: v.contiguous() for k, v in source.state_dict().items()}
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 48)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    model = _tiny("normals")
    report = load_pretrained_backbone(model, path)
    assert report.layout == "timm"
    assert report.missing == () and report.unexpected == () and report.dropped == ()
    assert report.pos_embed_resampled == ((37, 37), (32, 32))
    _assert_loaded(model.backbone, sd)
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 3, 512, 512))["normals"]).all()


def test_load_meta_pth_layout(tmp_path) -> None:
    source = _source_backbone(2)
    sd = source.state_dict()
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(_meta_layout(sd, 48), path)
    backbone = build_backbone(TINY_BACKBONE, img_size=448)
    report = load_dinov2_backbone(backbone, path)
    assert report.layout == "meta"
    assert report.dropped == ("mask_token",)
    assert report.missing == () and report.unexpected == ()
    _assert_loaded(backbone, sd)


def test_load_meta_layout_chunked_blocks_and_swiglu(tmp_path) -> None:
    from timm.layers import SwiGLUPacked

    kwargs = dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2.66667 * 2)
    source = _source_backbone(3, **kwargs)
    sd = source.state_dict()
    meta = {}
    for key, value in _meta_layout(sd, 48).items():
        key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        key = re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", key)  # one block chunk
        meta[key] = value
    assert "blocks.0.1.mlp.w12.weight" in meta
    path = tmp_path / "teacher.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in meta.items()}}, path)
    from timm.models.vision_transformer import VisionTransformer

    target = VisionTransformer(img_size=448, num_classes=0, **dict(TINY_BACKBONE_ARGS, **kwargs))
    report = load_dinov2_backbone(target, path)
    assert report.layout == "meta" and report.missing == () and report.unexpected == ()
    _assert_loaded(target, sd)


def test_load_meta_layout_with_registers(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    reg = dict(reg_tokens=4, no_embed_class=True)
    source = _source_backbone(4, **reg)
    sd = source.state_dict()
    assert sd["pos_embed"].shape == (1, 37 * 37, 48)
    # Meta: pos_embed carries a class entry that is added to the class token.
    class_pos = torch.randn(1, 1, 48)
    meta = _meta_layout(sd, 48)
    meta["pos_embed"] = torch.cat([class_pos, sd["pos_embed"]], dim=1)
    meta["cls_token"] = sd["cls_token"] - class_pos
    meta["register_tokens"] = meta.pop("reg_token")
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(meta, path)
    target = VisionTransformer(img_size=448, num_classes=0, **dict(TINY_BACKBONE_ARGS, **reg))
    report = load_dinov2_backbone(target, path)
    assert report.missing == () and report.unexpected == ()
    got = target.state_dict()
    assert_allclose(got["cls_token"].numpy(), sd["cls_token"].numpy(), rtol=0, atol=1e-6)
    assert torch.equal(got["reg_token"], sd["reg_token"])
    ref = _reference_grid_resample(sd["pos_embed"], n_prefix=0)
    assert_allclose(got["pos_embed"].numpy(), ref.numpy(), rtol=0, atol=1e-6)


def test_missing_weight_file_names_it(tmp_path) -> None:
    path = tmp_path / "nope" / "dinov2_vitb14_pretrain.pth"
    with pytest.raises(ModelFileError, match="dinov2_vitb14_pretrain.pth.*not found"):
        load_pretrained_backbone(_tiny("normals"), path)


def test_wrong_backbone_size_names_file_key_and_shapes(tmp_path) -> None:
    from timm.models.vision_transformer import VisionTransformer

    other = VisionTransformer(img_size=518, num_classes=0, **dict(TINY_BACKBONE_ARGS, embed_dim=60))
    path = tmp_path / "wrong.pth"
    torch.save(_meta_layout(other.state_dict(), 60), path)
    with pytest.raises(ModelFileError) as info:
        load_pretrained_backbone(_tiny("normals"), path)
    msg = str(info.value)
    assert "wrong.pth" in msg and "pos_embed" in msg and "(1, 1370, 60)" in msg and "48" in msg
    # a non-position tensor of the wrong shape names its key, got and expected shapes
    sd = _source_backbone(5).state_dict()
    sd["blocks.1.attn.qkv.weight"] = torch.zeros(10, 48)
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match=r"wrong\.pth.*'blocks\.1\.attn\.qkv\.weight'.*\(10, 48\).*\(144, 48\)"):
        load_pretrained_backbone(_tiny("normals"), path)


def test_missing_and_unexpected_keys_strict_and_lenient(tmp_path) -> None:
    sd = _source_backbone(6).state_dict()
    del sd["norm.weight"]
    sd["head.weight"] = torch.zeros(3, 48)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match="missing keys 'norm.weight'.*unexpected keys 'head.weight'"):
        load_pretrained_backbone(_tiny("normals"), path)
    model = _tiny("normals")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = load_pretrained_backbone(model, path, strict=False)
    assert report.missing == ("norm.weight",) and report.unexpected == ("head.weight",)
    assert any("partial.pth" in str(w.message) for w in caught)
    assert torch.equal(model.backbone.blocks[0].ls1.gamma, sd["blocks.0.ls1.gamma"])


def test_unreadable_weight_file(tmp_path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match="garbage.safetensors: cannot read"):
        load_pretrained_backbone(_tiny("normals"), path)


def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path) -> None:
    """Unfused attention exports to plain ONNX ops (no Resize), dynamic batch, same numbers."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _tiny("normals")
    model.set_fused_attn(False)
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.rand(1, 3, 512, 512),), str(path), input_names=["image"],
            output_names=list(model.config.output_names), opset_version=17,
            dynamic_axes={"image": {0: "batch"}}, dynamo=False,
        )
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Resize" not in ops and "LayerNormalization" in ops
    image = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(7))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref = model(image)
    for name, value in zip(model.config.output_names, got):
        assert_allclose(value, ref[name].numpy(), rtol=0, atol=1e-5, err_msg=name)
