"""Official Pixel3DMM network re-implementation: names, shapes, import and the §6 test vectors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from numpy.testing import assert_allclose
from p3dmm.fitting.base.errors import ModelFileError
from p3dmm.training.official import (
    OfficialConfig,
    OfficialNetwork,
    OfficialPredictor,
    crc32_init_state_dict,
    infer_official_config,
    load_official_checkpoint,
    official_postprocess,
    official_saved_png_float,
)

# copy of shared/reference/official_network_state_dict_shapes.json (official parameter
# names and shapes), kept with the tests so a plain clone can run them
SHAPES_JSON = Path(__file__).resolve().parents[1] / "data" / "official_network_state_dict_shapes.json"

# REFERENCE_FACTS.md §6 (official code, CPU, torch 2.14.1 / timm 1.0.31).
# Pixels are (row, col); "png" is the post-flip-TTA saved float before x255.
SELF_CHECK = {
    ("normals", 2): dict(
        mean=0.0110117, std=0.1116162,
        at00=(-0.1950843, 0.2193447, 0.1340846),
        at255_256=(-0.1137942, -0.0404645, -0.0384889),
        at511_100=(-0.0669057, -0.0455161, -0.0870382),
        png=(0.081957, 0.707683, 0.679186), png_mean=0.479471,
    ),
    ("normals", 1): dict(
        mean=0.0113271, std=0.1131048,
        at00=(-0.1259815, 0.1587885, 0.1271233),
        at255_256=(-0.0502474, -0.0567410, -0.0416742),
        at511_100=(-0.0729874, -0.0435782, -0.0884674),
        png=(0.168989, 0.726678, 0.798410), png_mean=0.478689,
    ),
    ("uv", 2): dict(
        mean=0.0287066, std=0.1212135,
        at00=(-0.1950843, 0.2193447),
        at255_256=(0.0114051, 0.0931013),
        at511_100=(0.0286041, 0.0764706),
        png=(0.530933, 0.509719), png_mean=0.520485,
    ),
    ("uv", 1): dict(
        mean=0.0290306, std=0.1221828,
        at00=(-0.1259815, 0.1587885),
        at255_256=(0.0440144, 0.1376607),
        at511_100=(0.0420544, 0.0598559),
        png=(0.532055, 0.537688), png_mean=0.520533,
    ),
}
# The table prints 7 decimals (rounding +-5e-8) and 6 for png floats (+-5e-7); the
# official code agrees with an independent implementation to <= 3e-7 on one CPU.
RAW_ATOL = 3e-6
PNG_ATOL = 3e-6


@pytest.fixture(scope="module")
def official_shapes() -> dict[str, dict[str, list[int]]]:
    if not SHAPES_JSON.is_file():
        pytest.skip(f"{SHAPES_JSON} not found")
    return json.loads(SHAPES_JSON.read_text())


def _lightning(state_dict: dict, num_heads: int | None = 8) -> dict:
    ckpt = {
        "state_dict": {**{f"net.{k}": v for k, v in state_dict.items()}, "vertex_weight_mask": torch.ones(5023)},
        "epoch": 3,
    }
    if num_heads is not None:
        ckpt["hyper_parameters"] = {"cfg": {"model": {"num_heads": num_heads}, "n_views": 2}}
    return ckpt


def _small_head(**kw) -> OfficialConfig:
    """vit_small backbone with a narrow decoder, for fast structural tests."""
    return OfficialConfig(**dict(dict(hidden_dim=32, num_layers=1, num_heads=2), **kw))


def _crc32_network(config: OfficialConfig) -> OfficialNetwork:
    net = OfficialNetwork(config)
    net.load_state_dict(crc32_init_state_dict({k: v.shape for k, v in net.state_dict().items()}))
    return net.eval()


@pytest.fixture(scope="module")
def self_check_input() -> torch.Tensor:
    return torch.rand(1, 1, 512, 512, 3, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ names, shapes, import


@pytest.mark.parametrize(
    "key",
    [
        "vit_small_patch16_224.dino|normals",
        "vit_small_patch16_224.dino|uv_map",
        "vit_base_patch16_224.dino|normals",
        "vit_base_patch16_224.dino|uv_map",
    ],
)
def test_official_json_configs_load_strict(key: str, official_shapes: dict) -> None:
    shapes = official_shapes[key]
    sd = crc32_init_state_dict(shapes)
    model, config = load_official_checkpoint(_lightning(sd))
    backbone, task = key.split("|")
    assert config.backbone == backbone
    assert config.task == {"normals": "normals", "uv_map": "uv"}[task]
    assert (config.n_views, config.hidden_dim, config.num_layers, config.num_heads) == (2, 256, 6, 8)
    assert model.load_report.missing == () and model.load_report.unexpected == ()
    assert model.load_report.ignored == ("vertex_weight_mask",)
    got = model.state_dict()
    # exactly the official names and shapes, nothing more
    assert {k: list(v.shape) for k, v in got.items()} == shapes
    for name in ("view_embed", "vol_decoder.layers.5.self_attn2.in_proj_weight", "token_2_patch_content.bias"):
        assert torch.equal(got[name], sd[name])
    assert all(torch.isfinite(v).all() for v in got.values())
    # the official names load with strict=True
    model.load_state_dict(sd, strict=True)


def test_infer_config_single_view_and_heads_from_hparams() -> None:
    net = OfficialNetwork(OfficialConfig(backbone="vit_small_patch16_224.dino", task="uv", n_views=1, num_layers=2))
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert "view_embed" not in shapes and shapes["vol_decoder.down_proj.weight"] == (256, 384)
    cfg = infer_official_config({f"net.{k}": torch.empty(s) for k, s in shapes.items()}, {"cfg": {"model": {"num_heads": 4}}})
    assert (cfg.n_views, cfg.num_layers, cfg.num_heads, cfg.task) == (1, 2, 4, "uv")
    assert infer_official_config({k: torch.empty(s) for k, s in shapes.items()}).num_heads == 8


def _small_sd(**kw) -> dict:
    return crc32_init_state_dict({k: v.shape for k, v in OfficialNetwork(_small_head(**kw)).state_dict().items()})


def test_checkpoint_errors_name_key_and_shapes(tmp_path) -> None:
    sd = _small_sd()
    bad = dict(sd)
    bad["token_2_patch_content.weight"] = torch.zeros(24, 32)
    with pytest.raises(ModelFileError, match=r"'token_2_patch_content.weight'.*\(24, 32\).*pred_disentangled"):
        load_official_checkpoint(_lightning(bad))
    bad = dict(sd)
    bad["vol_decoder.down_proj.weight"] = torch.zeros(32, 384)  # view_embed present: 400 expected
    with pytest.raises(ModelFileError, match=r"down_proj.weight'.*\(32, 384\).*\(E, 400\)"):
        load_official_checkpoint(_lightning(bad))
    bad = dict(sd)
    bad["vol_decoder.layers.0.mlp.0.weight"] = torch.zeros(100, 32)
    with pytest.raises(ModelFileError, match=r"'vol_decoder.layers.0.mlp.0.weight' has shape \(100, 32\), expected \(128, 32\)"):
        load_official_checkpoint(_lightning(bad))
    with pytest.raises(ModelFileError, match="pred_conf"):
        load_official_checkpoint(_lightning({**sd, "t_conv3_conf.weight": torch.zeros(32, 32, 2, 2)}))
    with pytest.raises(ModelFileError, match="pos_embed' not found"):
        load_official_checkpoint(_lightning({k: v for k, v in sd.items() if "pos_embed" not in k}))
    with pytest.raises(ModelFileError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.ckpt")


def test_checkpoint_missing_and_unexpected_keys(tmp_path) -> None:
    sd = _small_sd()
    partial = {k: v for k, v in sd.items() if not k.startswith("dir_norm_uv.")}
    partial["extra.weight"] = torch.zeros(3)
    with pytest.raises(ModelFileError, match="missing keys.*dir_norm_uv.*unexpected keys.*extra.weight"):
        load_official_checkpoint(_lightning(partial))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_official_checkpoint(_lightning(partial), strict=False)
    assert caught
    assert set(model.load_report.missing) == {k for k in sd if k.startswith("dir_norm_uv.")}
    assert model.load_report.unexpected == ("extra.weight",)
    # from a file (plain dict hparams: readable with weights_only=True)
    path = tmp_path / "normals.ckpt"
    torch.save(_lightning(sd, num_heads=2), path)
    model, config = load_official_checkpoint(path)
    assert config == _small_head()
    assert torch.equal(model.state_dict()["t_conv2.weight"], sd["t_conv2.weight"])


# ------------------------------------------------------------------------ numeric self-check


@pytest.mark.parametrize("task, n_views", [("normals", 2), ("normals", 1), ("uv", 2), ("uv", 1)])
def test_reference_self_check_table(task: str, n_views: int, self_check_input, official_shapes) -> None:
    """REFERENCE_FACTS §6: crc32 init, vit_small, E=256, L=6, 8 heads."""
    config = OfficialConfig(backbone="vit_small_patch16_224.dino", task=task, n_views=n_views)
    if n_views == 2:  # exactly the JSON's names and shapes, through the checkpoint importer
        shapes = official_shapes[f"vit_small_patch16_224.dino|{config.output_key}"]
    else:  # single-view variant: shapes from the model (crc32 init depends on names only)
        shapes = {k: v.shape for k, v in OfficialNetwork(config).state_dict().items()}
    net, inferred = load_official_checkpoint(_lightning(crc32_init_state_dict(shapes)))
    assert inferred == config
    x = self_check_input
    with torch.no_grad():
        both = net(torch.cat([x, x.flip(3)], dim=0))[config.output_key]  # (2, 1, C, 512, 512)
    raw, flip_raw = both[:1, 0], both[1:, 0]
    ref = SELF_CHECK[(task, n_views)]
    assert both.shape == (2, 1, config.out_channels, 512, 512)
    assert abs(raw.mean().item() - ref["mean"]) <= RAW_ATOL
    assert abs(torch.std(raw).item() - ref["std"]) <= RAW_ATOL
    for name, (row, col) in (("at00", (0, 0)), ("at255_256", (255, 256)), ("at511_100", (511, 100))):
        assert_allclose(raw[0, :, row, col].numpy(), ref[name], rtol=0, atol=RAW_ATOL, err_msg=name)
    png = official_saved_png_float(raw, task, flip_raw)
    c = len(ref["png"])
    assert_allclose(png[0, :c, 255, 256].numpy(), ref["png"], rtol=0, atol=PNG_ATOL)
    assert abs(png[:, :c].mean().item() - ref["png_mean"]) <= PNG_ATOL
    # p3dmm contract: head-frame normals / uv agree with the saved image
    post = official_postprocess(raw, task, flip_raw)
    if task == "normals":
        assert_allclose(post.norm(dim=1).numpy(), 1.0, rtol=0, atol=1e-5)
        assert_allclose(((post + 1) / 2).clamp(0, 1).numpy(), png.numpy(), rtol=0, atol=1e-6)
    else:
        assert_allclose(post.numpy(), png[:, :2].numpy(), rtol=0, atol=0)


# ---------------------------------------------------------------- export-oriented variants


def test_baked_position_embedding_and_unfused_attention_match(self_check_input) -> None:
    net = _crc32_network(_small_head(task="normals", n_views=2))
    x = self_check_input
    with torch.no_grad():
        ref = net(x)["normals"]
        net.bake_position_embedding()
        assert net.position_embedding_baked
        assert net.img_encoder.model.pos_embed.shape == (1, 1025, 384)
        assert not net.img_encoder.model.dynamic_img_size
        baked = net(x)["normals"]
        net.set_fused_attn(False)
        assert all(not m.fused_attn for m in net.modules() if hasattr(m, "fused_attn"))
        plain = net(x)["normals"]
    assert_allclose(baked.numpy(), ref.numpy(), rtol=0, atol=1e-6)
    assert_allclose(plain.numpy(), ref.numpy(), rtol=0, atol=1e-5)


def test_official_predictor_contract_and_flip_tta() -> None:
    net = _crc32_network(_small_head(task="normals", n_views=1))
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    predictor = OfficialPredictor(net, flip_tta=True)
    with torch.no_grad():
        out = predictor(image)["normals"]
        x = image.permute(0, 2, 3, 1).unsqueeze(1)
        raw = net(x)["normals"][:, 0]
        flip_raw = net(x.flip(3))["normals"][:, 0]
    assert out.shape == (1, 3, 512, 512)
    assert_allclose(out.norm(dim=1).numpy(), 1.0, rtol=0, atol=1e-5)
    assert_allclose(out.numpy(), official_postprocess(raw, "normals", flip_raw).numpy(), rtol=0, atol=1e-5)
    # no TTA: plain normalisation of the raw output in the head frame (n0, -n2, -n1)
    n = raw / raw.norm(dim=1, keepdim=True)
    expected = torch.stack([n[:, 0], -n[:, 2], -n[:, 1]], dim=1)
    assert_allclose(official_postprocess(raw, "normals").numpy(), expected.numpy(), rtol=0, atol=1e-6)


def test_flip_tta_uv_rule() -> None:
    raw = torch.full((1, 2, 4, 4), 0.2)
    flip_raw = torch.zeros(1, 2, 4, 4)
    flip_raw[:, 0, :, 0] = 0.4  # column 0 of the mirrored output = last column
    flip_raw[:, 1] = -0.2
    uv = official_postprocess(raw, "uv", flip_raw)
    # u: (0.2 + (-0.4 + 0.015)) / 2 at the last column, (0.2 + 0.015) / 2 elsewhere
    assert_allclose(uv[0, 0, :, 3].numpy(), ((0.2 - 0.4 + 0.015) / 2 + 1) / 2, atol=1e-7)
    assert_allclose(uv[0, 0, :, 0].numpy(), ((0.2 + 0.015) / 2 + 1) / 2, atol=1e-7)
    assert_allclose(uv[0, 1].numpy(), 0.5, atol=1e-7)
    assert uv.min() >= 0 and uv.max() <= 1


def test_multi_view_sequence_shapes() -> None:
    net = _crc32_network(_small_head(task="uv", n_views=2))
    x = torch.rand(1, 2, 512, 512, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = net(x)["uv_map"]
        single = net(x[:, :1])["uv_map"]
    assert out.shape == (1, 2, 2, 512, 512) and torch.isfinite(out).all()
    # views share one decoder sequence, so view 0 depends on view 1
    assert not torch.allclose(out[:, :1], single)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["normals", "uv_map"])
def test_official_base_configs_forward(task: str, official_shapes: dict) -> None:
    model, config = load_official_checkpoint(_lightning(crc32_init_state_dict(official_shapes[f"vit_base_patch16_224.dino|{task}"])))
    x = torch.rand(1, 1, 512, 512, 3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model(x)[task]
        b = model(x)[task]
    assert a.shape == (1, 1, config.out_channels, 512, 512)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


@pytest.mark.slow
def test_baked_official_predictor_exports_to_onnx(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = _crc32_network(_small_head(task="uv", n_views=1))
    net.bake_position_embedding()
    net.set_fused_attn(False)
    predictor = OfficialPredictor(net, flip_tta=True).eval()
    path = tmp_path / "official_uv.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            predictor, (torch.rand(1, 3, 512, 512),), str(path), input_names=["image"],
            output_names=["uv"], opset_version=17, dynamic_axes={"image": {0: "batch"}}, dynamo=False,
        )
    assert "Resize" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(8))
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": image.numpy()})
    with torch.no_grad():
        ref = predictor(image)["uv"]
    assert_allclose(got, ref.numpy(), rtol=0, atol=1e-5)
