"""export-engines: checkpoints -> ONNX (fp32, fp16) -> TensorRT (recording stand-in) ->
manifest -> Triton repository, numerically against PyTorch and the official reference table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from p3dmm.export import engines, tensorrt_build
from p3dmm.export.cli import main as export_main
from p3dmm.export.engines import ExportOptions, export_engines, rebuild_command
from p3dmm.export.onnx_export import fp32_islands
from p3dmm.export.validate import (
    FP16_TOLERANCES,
    compare_outputs,
    face_images,
    ort_runner,
)
from p3dmm.fitting.base.errors import EngineError
from p3dmm.runtime.manifest import MANIFEST_NAME, read_manifest, sha256_file
from p3dmm.training.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_predictor,
    save_checkpoint,
)
from p3dmm.training.networks import Predictor, PredictorConfig
from p3dmm.training.official import crc32_init_state_dict

from .fake_tensorrt import FakeTensorRT

SHAPES_JSON = Path(__file__).resolve().parents[1] / "data" / "official_network_state_dict_shapes.json"


def _checkpoint(path: Path, task: str, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    cfg = PredictorConfig.tiny(task, **overrides)
    model = Predictor(cfg)
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": 0,
                           "model": model.state_dict(), "predictor": cfg.to_dict(), "normal_space": "camera",
                           "uv_layout": "uv-0123456789abcdef"})  # fmt: skip
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both tiny predictors (normals with a mask channel) exported with fp16, the TensorRT
    stand-in and a Triton repository."""
    root = tmp_path_factory.mktemp("export")
    ckpts = [_checkpoint(root / "normals.pt", "normals", mask_channel=True), _checkpoint(root / "uv.pt", "uv", seed=1)]
    fake = FakeTensorRT()
    mp = pytest.MonkeyPatch()
    mp.setitem(sys.modules, "tensorrt", fake)
    mp.setattr(tensorrt_build, "compute_capability", lambda: "9.0")
    try:
        options = ExportOptions(out=root / "engines", fp16=True, tensorrt=True, batch=(1, 2, 8),
                                triton_repo=root / "triton", n_random=1, n_faces=1)  # fmt: skip
        manifest = export_engines([str(c) for c in ckpts], options)
    finally:
        mp.undo()
    return {"root": root, "ckpts": ckpts, "manifest": manifest, "out": root / "engines", "fake": fake}


# ----------------------------------------------------------------------- fp32 ONNX
def test_exported_onnx_equals_pytorch_at_any_batch(exported):
    x = np.random.default_rng(7).random((3, 3, 512, 512), dtype=np.float32)  # a batch size not exported with
    x[1] = face_images(1, seed=5)[0]
    for ckpt, task in zip(exported["ckpts"], ("normals", "uv")):
        model = load_predictor(ckpt)
        with torch.no_grad():
            ref = {k: v.numpy() for k, v in model(torch.from_numpy(x)).items()}
        got = ort_runner(exported["out"] / f"{task}.onnx")(x)
        assert sorted(got) == sorted(ref)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-4, err_msg=name)
        if task == "normals":
            np.testing.assert_allclose(np.linalg.norm(got["normals"], axis=1), 1.0, atol=1e-5)
            assert 0 <= got["mask"].min() and got["mask"].max() <= 1
        else:
            assert 0 <= got["uv"].min() and got["uv"].max() <= 1


def test_graph_io_and_no_resize(exported):
    m = onnx.load(str(exported["out"] / "normals.onnx"))
    assert [i.name for i in m.graph.input] == ["image"]
    assert [o.name for o in m.graph.output] == ["normals", "mask"]
    ops = {n.op_type for n in m.graph.node}
    assert "Resize" not in ops and "LayerNormalization" in ops  # opset >= 17: one LayerNorm node
    assert m.opset_import[0].version == 20


# ------------------------------------------------------------------------ manifest
def test_manifest_describes_every_file(exported):
    man = read_manifest(exported["out"])
    files = sorted(m.file for m in man.models)
    assert files == sorted(["normals.onnx", "normals.fp16.onnx", "normals.plan", "normals.fp16.plan",
                            "uv.onnx", "uv.fp16.onnx", "uv.plan", "uv.fp16.plan"])  # fmt: skip
    for m in man.models:
        assert man.verify_file(exported["out"], m).name == m.file
        assert m.sha256 == sha256_file(exported["out"] / m.file)
        assert m.source["sha256"] == sha256_file(m.source["path"])
        assert m.inputs[0].to_dict() == {"name": "image", "shape": ["batch", 3, 512, 512], "dtype": "float32"}
        assert m.opset == 20
    n32 = man.find("normals", "onnx", "fp32")[0]
    assert [o.name for o in n32.outputs] == ["normals", "mask"] and n32.normal_space == "camera"
    assert n32.validation["worst"]["normals"]["max_deg"] < 0.1
    uv16 = man.find("uv", "onnx", "fp16")[0]
    assert uv16.uv_layout == "uv-0123456789abcdef" and uv16.normal_space is None
    assert uv16.validation["against"] == "fp32 onnx" and uv16.validation["worst"]["uv"]["max_px"] < 5.0
    plan = man.find("uv", "tensorrt", "fp32")[0]
    assert plan.tensorrt["version"] == FakeTensorRT.__version__ and plan.tensorrt["compute_capability"] == "9.0"
    assert plan.tensorrt["batch"] == [1, 2, 8] and plan.tensorrt["from"] == "uv.onnx"
    assert "--tensorrt" in rebuild_command(plan, "engines/") and str(exported["ckpts"][1]) in rebuild_command(plan)
    # nothing but the models, the manifest and the timing cache; no staging left
    assert sorted(p.name for p in exported["out"].iterdir()) == sorted(files + [MANIFEST_NAME, "timing.cache"])


def test_a_changed_file_fails_the_manifest_check(exported, tmp_path):
    import shutil

    out = tmp_path / "e"
    shutil.copytree(exported["out"], out)
    with open(out / "uv.onnx", "r+b") as f:
        f.truncate(1000)
    man = read_manifest(out)
    with pytest.raises(EngineError, match=r"uv.onnx: sha256 .* differs .*rebuild with: export-engines"):
        man.verify_file(out, man.find("uv", "onnx", "fp32")[0], rebuild="export-engines uv.pt --out e")
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(EngineError, match="not a readable JSON manifest"):
        read_manifest(out)


# ----------------------------------------------------------------------------- fp16
def test_fp16_graph_keeps_the_sensitive_parts_in_float32(exported):
    path = exported["out"] / "normals.fp16.onnx"
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    inits = {i.name: i.data_type for i in m.graph.initializer}
    big = [i for i in m.graph.initializer if np.prod(i.dims) > 1000]
    assert big and all(i.data_type == f16 for i in big), "large weights are float16"
    types = {v.name: v.type.tensor_type.elem_type for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    types.update(inits)
    assert all(types[v.name] == f32 for v in list(m.graph.input) + list(m.graph.output)), "io stays float32"
    fp32_ops = [n for n in m.graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert fp32_ops and all(types.get(n.input[0]) == f32 for n in fp32_ops)
    # attention scores: the MatMul feeding each Softmax runs in float32
    original = onnx.load(str(exported["out"] / "normals.onnx"))
    islands = set(fp32_islands(original))
    score_mm = [n for n in original.graph.node if n.name in islands and n.op_type == "MatMul"]
    assert score_mm
    by_name = {n.name: n for n in m.graph.node}
    for n in score_mm:
        assert all(types.get(i) == f32 for i in by_name[n.name].input), n.name
    # and something heavy really is half precision
    assert any(n.op_type in ("Conv", "ConvTranspose", "MatMul") and types.get(n.input[0]) == f16 for n in m.graph.node)


def test_fp16_is_within_its_tolerance_of_fp32(exported):
    x = face_images(2, seed=3)
    for task in ("normals", "uv"):
        ref = ort_runner(exported["out"] / f"{task}.onnx")(x)
        got = ort_runner(exported["out"] / f"{task}.fp16.onnx")(x)
        stats = compare_outputs(task, ref[task], got[task])
        for key, bound in FP16_TOLERANCES[task].items():
            assert stats[key] <= bound, (task, key, stats)
        assert stats["max_abs"] > 0  # it is a different graph


# ---------------------------------------------------------------------------- Triton
def _parse(text: str):
    from p3dmm.export.triton import parse_config

    return parse_config(text)


def test_triton_repository_parses_with_tritons_schema(exported):
    pytest.importorskip("tritonclient")
    repo = exported["root"] / "triton"
    names = sorted(p.name for p in repo.iterdir())
    assert names == ["p3dmm_normals_onnx", "p3dmm_normals_trt", "p3dmm_predictors", "p3dmm_uv_onnx", "p3dmm_uv_trt"]
    for name in names:
        cfg = _parse((repo / name / "config.pbtxt").read_text())
        assert cfg.name == name and cfg.max_batch_size == 8
        if name == "p3dmm_predictors":
            assert cfg.platform == "ensemble" and not cfg.instance_group
            steps = {s.model_name: s for s in cfg.ensemble_scheduling.step}
            assert sorted(steps) == ["p3dmm_normals_trt", "p3dmm_uv_trt"]  # the engines when they exist
            assert dict(steps["p3dmm_normals_trt"].input_map) == {"image": "image"}
            assert sorted(o.name for o in cfg.output) == ["mask", "normals", "uv"]
            continue
        task, kind = name.split("_")[1], name.split("_")[2]
        model_file = repo / name / "1" / ("model.onnx" if kind == "onnx" else "model.plan")
        src = exported["out"] / (f"{task}.onnx" if kind == "onnx" else f"{task}.plan")
        assert sha256_file(model_file) == sha256_file(src)
        assert cfg.platform == ("onnxruntime_onnx" if kind == "onnx" else "tensorrt_plan")
        assert list(cfg.dynamic_batching.preferred_batch_size) == [2, 8]
        assert cfg.instance_group[0].count == 1
        graph = onnx.load(str(exported["out"] / f"{task}.onnx")).graph
        for proto, cfg_list in ((graph.input, cfg.input), (graph.output, cfg.output)):
            want = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim][1:]) for v in proto]
            assert [(t.name, list(t.dims)) for t in cfg_list] == want
            assert all(t.data_type == 1 + 10 for t in cfg_list)  # TYPE_FP32 (enum 11)


def test_a_bad_triton_field_is_rejected_by_the_schema():
    pytest.importorskip("tritonclient")
    with pytest.raises(EngineError, match="max_batchsize"):
        _parse('name: "x"\nmax_batchsize: 4\n')


# ---------------------------------------------------------------- TensorRT stand-in
def test_tensorrt_build_makes_the_documented_calls(exported, tmp_path):
    fake = exported["fake"]
    names = fake.names()
    first = names.index("create_network")
    assert fake.args("create_network")[0] == (1 << 1,)  # 1 << int(STRONGLY_TYPED)
    assert names.count("build_serialized_network") == 4  # fp32 + fp16, two tasks
    assert ("image", (1, 3, 512, 512), (2, 3, 512, 512), (8, 3, 512, 512)) in fake.args("set_shape")
    assert fake.args("set_memory_pool_limit")[0] == ("WORKSPACE", 4 << 30)
    assert fake.args("builder_optimization_level")[0] == (3,)
    assert names.index("parse_from_file") > first and "deserialize_cuda_engine" in names
    # the timing cache is reused across builds: empty first, then what the last build wrote
    caches = [a[0] for a in fake.args("create_timing_cache")]
    assert caches[0] == b"" and caches[1] == b"+timed" and caches[-1].startswith(b"+timed")
    assert (exported["out"] / "timing.cache").read_bytes().startswith(b"+timed")


@pytest.mark.parametrize(
    ("fail", "match"),
    [
        ("parse", r"ONNX parser failed: node node_Gelu_7 \(Gelu\): No importer registered for op: Gelu"),
        ("build", "build_serialized_network failed"),
        ("deserialize", "does not deserialise"),
        ("profile", "optimisation profile for batch"),
        ("io", r"engine io .* expected"),
    ],
)
def test_tensorrt_failures_are_engine_errors_and_write_nothing(exported, tmp_path, fail, match):
    from p3dmm.export.onnx_export import onnx_io

    src = exported["out"] / "uv.onnx"
    io = onnx_io(onnx.load(str(src)))
    fake = FakeTensorRT(fail=None if fail == "io" else fail,
                        engine_io=[("image", "INPUT", (-1, 3, 512, 512)), ("wrong", "OUTPUT", (-1, 2, 512, 512))] if fail == "io" else None)  # fmt: skip
    plan = tmp_path / "uv.plan"
    with pytest.raises(EngineError, match=match):
        tensorrt_build.build_engine(src, plan, io, tensorrt_build.BuildOptions(), trt=fake, capability="9.0")
    assert not plan.exists()


def test_a_foreign_timing_cache_is_replaced(exported, tmp_path, caplog):
    from p3dmm.export.onnx_export import onnx_io

    src = exported["out"] / "uv.onnx"
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from-another-gpu")
    fake = FakeTensorRT(fail="cache")
    record = tensorrt_build.build_engine(src, tmp_path / "uv.plan", onnx_io(onnx.load(str(src))),
                                         tensorrt_build.BuildOptions(timing_cache=cache), trt=fake, capability="8.9")  # fmt: skip
    assert record["compute_capability"] == "8.9" and (tmp_path / "uv.plan").is_file()
    assert [a[0] for a in fake.args("set_timing_cache")] == [b"from-another-gpu", b""]
    assert "does not match this device" in caplog.text


def test_without_tensorrt_the_error_says_what_to_install(monkeypatch):
    from p3dmm.fitting.base.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BackendUnavailableError, match="pip install tensorrt"):
        tensorrt_build.tensorrt_module()


# ---------------------------------------------------------------- official checkpoint
def test_official_checkpoint_reproduces_the_reference_table(tmp_path):
    """REFERENCE_FACTS §6: crc32 weights, ViT-S/16, E=256, L=6, 8 heads, n_views 2, uv, flip TTA;
    the exported graph on ONNX Runtime gives the official saved-PNG floats."""
    shapes = json.loads(SHAPES_JSON.read_text())["vit_small_patch16_224.dino|uv_map"]
    sd = crc32_init_state_dict(shapes)
    ckpt = {"state_dict": {**{f"net.{k}": v for k, v in sd.items()}, "vertex_weight_mask": torch.ones(5023)},
            "hyper_parameters": {"cfg": {"model": {"num_heads": 8}, "n_views": 2}}}  # fmt: skip
    path = tmp_path / "official_uv.ckpt"
    torch.save(ckpt, path)
    man = export_engines([str(path)], ExportOptions(out=tmp_path / "eng", flip_tta=True, n_random=1, n_faces=1))
    entry = man.models[0]
    assert entry.task == "uv" and entry.flip_tta and entry.uv_layout == "flame2020" and entry.source["format"] == "pixel3dmm-lightning"
    x = torch.rand(1, 1, 512, 512, 3, generator=torch.Generator().manual_seed(1))
    uv = ort_runner(tmp_path / "eng" / "uv.onnx")(x[:, 0].permute(0, 3, 1, 2).numpy())["uv"]
    np.testing.assert_allclose(uv[0, :, 255, 256], [0.530933, 0.509719], rtol=0, atol=3e-6)
    assert abs(float(uv.mean()) - 0.520485) <= 3e-6


# ------------------------------------------------------------------- errors and CLI
@pytest.fixture(scope="module")
def tiny_normals(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "normals.pt", "normals")


def _cli(capsys, *argv: str) -> tuple[int, str]:
    rc = export_main(list(argv))
    return rc, capsys.readouterr().err


def test_corrupt_and_truncated_checkpoints_exit_2(tmp_path, capsys, tiny_normals):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage" * 100)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_normals.read_bytes()[: tiny_normals.stat().st_size // 2])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, what in ((junk, "not a readable checkpoint"), (cut, "not a readable checkpoint"), (empty, "empty"),
                       (tmp_path / "missing.pt", "not found")):  # fmt: skip
        rc, err = _cli(capsys, str(path), "--out", str(tmp_path / "out"))
        assert rc == 2 and str(path) in err and what in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_task_and_foreign_dicts_exit_2(tmp_path, capsys, tiny_normals):
    ck = torch.load(tiny_normals, weights_only=True)
    ck["predictor"]["task"] = "depth"
    bad = tmp_path / "depth.pt"
    torch.save(ck, bad)
    rc, err = _cli(capsys, str(bad), "--out", str(tmp_path / "o"))
    assert rc == 2 and "depth" in err and "expected 'normals' or 'uv'" in err
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    rc, err = _cli(capsys, str(other), "--out", str(tmp_path / "o"))
    assert rc == 2 and "neither a p3dmm training checkpoint" in err


def test_bad_options_exit_2(tmp_path, capsys, tiny_normals):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = _cli(capsys, str(tiny_normals), "--out", str(blocker / "sub"))
    assert rc == 2 and "cannot write there" in err
    rc, err = _cli(capsys, str(tiny_normals), "--out", str(blocker))
    assert rc == 2 and "is not a directory" in err
    rc, err = _cli(capsys, str(tiny_normals), str(tiny_normals), "--out", str(tmp_path / "o"))
    assert rc == 2 and "two normals checkpoints" in err
    uv = _checkpoint(tmp_path / "uv.pt", "uv")
    rc, err = _cli(capsys, str(uv), "--flip-tta", "--out", str(tmp_path / "o"))
    assert rc == 2 and "--flip-tta" in err and "mirror map" in err
    with pytest.raises(SystemExit):
        export_main([str(tiny_normals), "--out", "o", "--batch", "4,2,1"])


def test_failed_validation_exits_1_with_the_table_and_writes_nothing(tmp_path, capsys, tiny_normals, monkeypatch):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr(engines, "TOLERANCES", {"normals": {"max_abs": -1.0}})  # nothing can pass
    rc, err = _cli(capsys, str(tiny_normals), "--out", str(out), "--fp16")
    assert rc == 1, err
    assert "validation failed" in err and "normals.onnx" in err and "NO" in err and "max_deg" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # no model, no manifest, no staging


def test_separate_runs_merge_into_one_manifest_and_user_images_validate(tmp_path, tiny_normals, capsys):
    from PIL import Image

    out = tmp_path / "e"
    export_engines([str(tiny_normals)], ExportOptions(out=out, n_random=1, n_faces=0))
    uv = _checkpoint(tmp_path / "uv.pt", "uv")
    crops = tmp_path / "crops"
    crops.mkdir()
    rgb = (face_images(1, seed=9)[0].transpose(1, 2, 0) * 255).astype(np.uint8)
    Image.fromarray(rgb).resize((300, 300)).save(crops / "face.png")  # any size: resized to 512
    Image.fromarray(rgb).convert("L").save(crops / "grey.jpg")
    man = export_engines([str(uv)], ExportOptions(out=out, n_random=1, validate_images=crops))
    assert sorted(m.file for m in man.models) == ["normals.onnx", "uv.onnx"]
    assert sorted(m.file for m in read_manifest(out).models) == ["normals.onnx", "uv.onnx"]
    (crops / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    rc, err = _cli(capsys, str(uv), "--out", str(out), "--validate-images", str(crops))
    assert rc == 2 and "broken.png is not a readable image" in err
    rc, err = _cli(capsys, str(uv), "--out", str(out), "--validate-images", str(tmp_path / "none"))
    assert rc == 2 and "is not a directory" in err


def test_p3dmm_export_is_the_same_command(capsys):
    from p3dmm.runtime.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "--help"])
    assert "--tensorrt" in capsys.readouterr().out


def test_official_normals_keep_the_official_conventions(tmp_path):
    from p3dmm.export.sources import load_source
    from p3dmm.training.official import OfficialConfig, OfficialNetwork

    cfg = OfficialConfig(task="normals", n_views=1, hidden_dim=32, num_layers=1, num_heads=2)
    sd = crc32_init_state_dict({k: v.shape for k, v in OfficialNetwork(cfg).state_dict().items()})
    path = tmp_path / "official_normals.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in sd.items()},
                "hyper_parameters": {"cfg": {"model": {"num_heads": 2}}}}, path)  # fmt: skip
    src = load_source(path, flip_tta=False)
    assert (src.task, src.normal_space, src.uv_layout, src.format) == ("normals", "head", None, "pixel3dmm-lightning")
    assert src.config["backbone"] == "vit_small_patch16_224.dino" and src.outputs == ("normals",)
    with torch.no_grad():
        n = src.module(torch.rand(1, 3, 512, 512))["normals"]
    assert n.shape == (1, 3, 512, 512) and torch.allclose(n.norm(dim=1), torch.ones(1, 512, 512), atol=1e-5)


def test_a_low_resolution_predictor_keeps_the_512_contract(tmp_path):
    """A predictor trained at 64 px (the embedded defaults train at 160) exports with the
    512 x 512 io: its graph equals the independent torch pipeline antialiased resize ->
    predictor -> bilinear upsample (normals renormalised), UV and mask stay in (0, 1)."""
    import torch.nn.functional as F

    ckpts = [_checkpoint(tmp_path / "n.pt", "normals", img_size=64, backbone_img_size=56),
             _checkpoint(tmp_path / "u.pt", "uv", seed=1, img_size=64, backbone_img_size=56, mask_channel=True)]  # fmt: skip
    export_engines([str(c) for c in ckpts], ExportOptions(out=tmp_path / "e", n_random=1, n_faces=1))
    x = face_images(2, seed=3)
    for ckpt, task in zip(ckpts, ("normals", "uv")):
        model = load_predictor(ckpt)
        with torch.no_grad():
            small = F.interpolate(torch.from_numpy(x), size=64, mode="bilinear", align_corners=False, antialias=True)
            ref = {k: F.interpolate(v, size=512, mode="bilinear", align_corners=False) for k, v in model(small).items()}
        if task == "normals":
            ref["normals"] = ref["normals"] / ref["normals"].norm(dim=1, keepdim=True)
        got = ort_runner(tmp_path / "e" / f"{task}.onnx")(x)
        assert sorted(got) == sorted(ref) and got[task].shape == (2, 2 if task == "uv" else 3, 512, 512)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name].numpy(), rtol=0, atol=2e-4, err_msg=name)
        if task == "uv":
            assert 0 < got["uv"].min() and got["uv"].max() < 1 and 0 < got["mask"].min() and got["mask"].max() < 1
    man = read_manifest(tmp_path / "e")
    assert man.find("uv", "onnx", "fp32")[0].source["config"]["img_size"] == 64


def test_fp16_only_keeps_only_the_fp16_files_with_the_fp32_record(tmp_path, tiny_normals):
    man = export_engines([str(tiny_normals)], ExportOptions(out=tmp_path / "e", fp16_only=True, n_random=1, n_faces=1))
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(["normals.fp16.onnx", MANIFEST_NAME])
    (entry,) = man.models
    assert entry.precision == "fp16" and entry.validation["against"] == "fp32 onnx"
    assert entry.validation["fp32_against_pytorch"]["normals"]["max_deg"] < 0.1  # the dropped fp32 graph was checked
    assert read_manifest(tmp_path / "e").verify_file(tmp_path / "e", entry).name == "normals.fp16.onnx"
