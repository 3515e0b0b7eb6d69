"""The runtime end to end: engine directory -> backend -> crop -> predict -> fit -> outputs,
on oracle-map engines (known ground truth), plus the manifest checks, the registry, thread
safety and the batch command."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from p3dmm.fitting import Camera, FitConfig, FlameModel, render_maps  # noqa: E402
from p3dmm.fitting.base.errors import BackendUnavailableError, EngineError, InputError  # noqa: E402
from p3dmm.fitting.metrics import vertex_errors  # noqa: E402
from p3dmm.runtime.backends import load_backend  # noqa: E402
from p3dmm.runtime.cli import main  # noqa: E402
from p3dmm.runtime.manifest import read_manifest, sha256_file  # noqa: E402
from p3dmm.runtime.reconstruct import Reconstruction, Reconstructor, crop_camera_to_image, mask_from_uv  # noqa: E402

from .fake_engines import oracle_engines  # noqa: E402


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    model = FlameModel.synthetic(seed=0)
    rng = np.random.default_rng(4)
    p = model.zero_params()
    p.shape[:50] = rng.normal(size=50).astype(np.float32)
    p.expr[:50] = (rng.normal(size=50) * 0.5).astype(np.float32)
    p.pose[0] = np.radians([4.0, 20.0, 2.0]).astype(np.float32)
    cam = Camera.frontal(distance=1.0, focal=1200.0, width=512, height=512)
    maps = render_maps(model, p, cam, rgb=True, rng=np.random.default_rng(1))
    root = tmp_path_factory.mktemp("rt")
    engines = oracle_engines(root / "engines", maps, model.uv.layout_id())
    return {"model": model, "params": p, "camera": cam, "maps": maps, "engines": engines, "root": root}


@pytest.fixture(scope="module")
def rec(scene):
    return Reconstructor.from_engines(scene["engines"], backend="ort-cpu", detector=None, model=scene["model"])


def _err(scene, r):
    m = scene["model"]
    return vertex_errors(r.vertices, m.vertices(scene["params"]), m.masks["face"])["mean_mm"]


def _reprojection_px(scene, r: Reconstruction, gt_camera: Camera) -> float:
    m = scene["model"]
    face = m.masks["face"]
    a = r.camera_image.project(r.vertices[face])
    b = gt_camera.project(m.vertices(scene["params"])[face])
    return float(np.linalg.norm(a - b, axis=1).mean())


# ------------------------------------------------------------------ end to end
def test_a_face_crop_reconstructs(scene, rec):
    r = rec.reconstruct(scene["maps"].rgb, box="full")
    assert _err(scene, r) < 1.0
    assert r.fit.converged and r.confidence > 0.9
    assert r.crop == (0, 0, 512) and r.normal_space == "camera"
    assert _reprojection_px(scene, r, scene["camera"]) < 1.0
    assert set(r.timings) >= {"decode", "detect", "crop", "predict", "fit", "total"}


def test_the_camera_in_the_original_photo(scene, rec):
    """The crop sits at (100, 50) of a 700x600 photo: the image camera is the crop camera
    shifted, and the fitted mesh reprojects onto the photo's pixels."""
    photo = np.full((600, 700, 3), 90, np.uint8)
    photo[50:562, 100:612] = scene["maps"].rgb
    side = 512 / 1.42  # the detection whose official crop is exactly the 512 px face crop
    cx, cy = 100 + 256, 50 + 256
    r = rec.reconstruct(photo, box=(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    assert r.crop == (100, 50, 512)
    gt = scene["camera"]
    shifted = Camera(focal=gt.focal, principal=np.asarray(gt.principal) + [100, 50], R=gt.R, t=gt.t, width=700, height=600)
    assert _reprojection_px(scene, r, shifted) < 1.0
    assert (r.camera_image.width, r.camera_image.height) == (700, 600)


def test_crop_camera_convention_for_a_scaled_crop():
    cam = Camera(focal=np.float32(1000.0), principal=np.array([255.5, 255.5], np.float32), R=np.eye(3, dtype=np.float32),
                 t=np.array([0, 0, 1.0], np.float32), width=512, height=512)  # fmt: skip
    big = crop_camera_to_image(cam, 40, 30, 1024, 2000, 1500)  # a 1024 px crop shrunk to 512: s = 2
    assert float(big.focal) == 2000.0
    # crop pixel x covers original 40 + 2x .. 40 + 2x + 2, centre 40 + 2x + 0.5
    np.testing.assert_allclose(big.principal, [40 + 2 * 255.5 + 0.5, 30 + 2 * 255.5 + 0.5])
    X = np.array([[0.01, -0.02, 0.0]], np.float32)
    np.testing.assert_allclose(big.project(X), 2 * cam.project(X) + [40.5, 30.5], atol=1e-3)


def test_known_focal_in_photo_pixels(scene, rec):
    r = rec.reconstruct(scene["maps"].rgb, box="full", focal=1200.0)
    assert abs(float(r.camera.focal) - 1200.0) < 1e-3 and abs(float(r.camera.t[2]) - 1.0) < 0.05


def test_save_writes_every_output(scene, rec, tmp_path):
    r = rec.reconstruct(scene["maps"].rgb, box="full")
    out = r.save(tmp_path / "face")
    names = {"posed.obj", "neutral.obj", "posed.ply", "params.npz", "camera.json", "overlay.png", "crop.png",
             "normals.png", "uv.png", "mask.png", "texture.png", "texture.mtl", "report.json"}  # fmt: skip
    assert names <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    obj = (out / "posed.obj").read_text()
    assert obj.startswith("mtllib texture.mtl\nusemtl face\n") and obj.count("\nvt ") > 5000
    assert "map_Kd texture.png" in (out / "texture.mtl").read_text()
    import trimesh

    mesh = trimesh.load(out / "posed.ply", process=False)
    np.testing.assert_allclose(mesh.vertices, r.vertices, atol=1e-6)
    npz = np.load(out / "params.npz")
    assert {"shape", "expr", "pose", "transl", "camera_focal", "camera_principal", "camera_R", "camera_t"} <= set(npz.files)
    assert npz["pose"].shape == (5, 3)
    cams = json.loads((out / "camera.json").read_text())
    assert cams["image"]["width"] == 512 and abs(cams["image"]["focal"] - float(r.camera_image.focal)) < 1e-3
    report = json.loads((out / "report.json").read_text())
    assert report["fit"]["quality"]["confidence"] == pytest.approx(r.confidence)
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape == r.image.shape and np.abs(overlay.astype(int) - r.image).max() > 30  # blended, not a copy
    tex = np.asarray(Image.open(out / "texture.png"))
    assert tex.shape == (1024, 1024, 4)
    visible = tex[..., 3] == 255
    assert 0.05 < visible.mean() < 0.6  # the front of the head, not the back
    # visible texels carry the photo's colours: the face region's texels are skin, not the background
    assert tex[visible, :3].mean() > 40


def test_texture_samples_where_the_mesh_projects(scene, rec):
    """A photo coloured by pixel position: each visible texel holds its surface point's projection."""
    from p3dmm.runtime.texture import photo_texture

    r = rec.reconstruct(scene["maps"].rgb, box="full")
    H = W = 512
    yy, xx = np.mgrid[0:H, 0:W]
    coded = np.stack([xx // 2, yy // 2, np.zeros_like(xx)], -1).astype(np.uint8)  # position code
    tex = photo_texture(scene["model"], r.vertices, r.camera_image, coded, 256)
    vis = tex[..., 3] == 255
    assert vis.sum() > 1000
    # texels of one small chart neighbourhood map to nearby photo pixels: the code varies smoothly
    gx = np.abs(np.diff(tex[..., 0].astype(int), axis=1))[vis[:, 1:] & vis[:, :-1]]
    assert np.median(gx) <= 2


def test_mask_from_uv_when_engines_have_no_mask(scene, tmp_path):
    engines = oracle_engines(tmp_path / "nomask", scene["maps"], scene["model"].uv.layout_id(), mask=False)
    rec = Reconstructor.from_engines(engines, backend="ort-cpu", detector=None, model=scene["model"])
    r = rec.reconstruct(scene["maps"].rgb, box="full")
    m = mask_from_uv(np.where(scene["maps"].mask[..., None], scene["maps"].uv, 0), scene["model"], ("face", "left_ear", "right_ear"))
    assert m.sum() > 0.5 * scene["maps"].mask.sum() and not m[0, 0]
    assert _err(scene, r) < 1.5


# ------------------------------------------------------------------ batch and threads
def test_batch_and_threads_give_the_serial_results(scene, rec, monkeypatch):
    from p3dmm.runtime import reconstruct as mod

    img = scene["maps"].rgb
    serial = rec.reconstruct(img, box="full")
    sizes = []
    orig = mod.fit_batch
    monkeypatch.setattr(mod, "fit_batch", lambda obs, *a, **k: sizes.append(len(obs)) or orig(obs, *a, **k))
    batch = rec.reconstruct_batch([img, img, img], boxes=["full", "full", "full"])
    assert sizes == [3]  # one batched fit for the batch
    batch += rec.reconstruct_batch([img, img], boxes=["full", "full"], focal=900.0)  # a known focal: one batch too
    assert sizes == [3, 2]
    for b in batch[:3]:
        np.testing.assert_array_equal(b.vertices, serial.vertices)
    np.testing.assert_allclose(float(batch[3].camera_image.focal), 900.0, rtol=1e-5)
    results: list = [None] * 4

    def work(i):
        results[i] = rec.reconstruct(img, box="full")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r.vertices, serial.vertices)


def test_a_bad_item_in_a_batch(scene, rec, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = rec.reconstruct_batch([scene["maps"].rgb, bad], boxes=["full", "full"], errors="return")
    assert isinstance(out[0], Reconstruction) and isinstance(out[1], InputError) and "bad.jpg" in str(out[1])
    with pytest.raises(InputError, match="bad.jpg"):
        rec.reconstruct_batch([bad], boxes=["full"])


def test_bad_boxes_and_focal(scene, rec):
    img = scene["maps"].rgb
    with pytest.raises(InputError, match="box 'half'"):
        rec.reconstruct(img, box="half")
    with pytest.raises(InputError, match="x1 > x0"):
        rec.reconstruct(img, box=(10, 10, 5, 20))
    with pytest.raises(InputError, match="focal"):
        rec.reconstruct(img, box="full", focal=-3.0)
    with pytest.raises(InputError, match="no face detector"):
        rec.reconstruct(img)


# ------------------------------------------------------------------ engines and backends
def test_registry_picks_ort_cpu_here_and_says_why(scene, caplog):
    with caplog.at_level(logging.INFO, logger="p3dmm"):
        b = load_backend(scene["engines"], "normals", "auto")
    assert b.name == "ort-cpu"
    assert "skipped tensorrt: no plan file" in caplog.text and "ort-cuda" in caplog.text
    with b:
        out = b.infer({"image": np.zeros((2, 3, 512, 512), np.float32)})
    assert out["normals"].shape == (2, 3, 512, 512) and out["mask"].shape == (2, 1, 512, 512)
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider"):
        load_backend(scene["engines"], "normals", "ort-cuda")
    with pytest.raises(InputError, match="backend 'onnx'"):
        load_backend(scene["engines"], "normals", "onnx")
    with pytest.raises(InputError, match="input 'image' has shape"):
        b2 = load_backend(scene["engines"], "uv", "ort-cpu")
        b2.infer({"image": np.zeros((1, 3, 256, 256), np.float32)})


def _copy(scene, tmp_path) -> Path:
    import shutil

    d = tmp_path / "e"
    shutil.copytree(scene["engines"], d)
    return d


def test_a_changed_model_file_is_an_engine_error_with_the_rebuild_command(scene, tmp_path):
    d = _copy(scene, tmp_path)
    with open(d / "uv.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(EngineError, match=r"uv.onnx: sha256 .* differs .*rebuild with: export-engines"):
        Reconstructor.from_engines(d, backend="ort-cpu", detector=None)


def test_a_truncated_model_file_is_an_engine_error(scene, tmp_path):
    d = _copy(scene, tmp_path)
    (d / "uv.onnx").write_bytes((d / "uv.onnx").read_bytes()[:500])
    man = json.loads((d / "manifest.json").read_text())
    for m in man["models"]:
        if m["file"] == "uv.onnx":
            m["sha256"] = sha256_file(d / "uv.onnx")  # the manifest agrees: the load itself must fail
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EngineError, match="uv.onnx: ONNX Runtime cannot load it"):
        load_backend(d, "uv", "ort-cpu")


def test_io_that_differs_from_the_manifest_is_an_engine_error(scene, tmp_path):
    d = _copy(scene, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    man["models"][1]["outputs"][0]["name"] = "uv_map"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EngineError, match="differs from the manifest"):
        load_backend(d, "uv", "ort-cpu")


def test_missing_manifest_task_or_layout(scene, tmp_path):
    with pytest.raises(EngineError, match="no manifest.json"):
        Reconstructor.from_engines(tmp_path, detector=None)
    d = _copy(scene, tmp_path)
    man = json.loads((d / "manifest.json").read_text())
    man["models"][1]["uv_layout"] = "uv-ffffffffffffffff"
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(EngineError, match="UV layout 'uv-ffffffffffffffff'"):
        Reconstructor.from_engines(d, backend="ort-cpu", detector=None)

def test_an_installation_without_the_embedded_engines_says_so(monkeypatch, tmp_path):
    from p3dmm.runtime import reconstruct

    monkeypatch.setattr(reconstruct, "default_engines_dir", lambda: tmp_path / "engines")
    with pytest.raises(EngineError, match="embedded engines are missing from this installation"):
        Reconstructor.default()


# ------------------------------------------------------------------ the command
def test_reconstruct_command_reports_bad_files_and_resumes(scene, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(scene["maps"].rgb).save(photos / "a.png")
    Image.fromarray(scene["maps"].rgb).save(photos / "b.jpg", quality=95)
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    argv = ["reconstruct", str(photos), "--engines", str(scene["engines"]), "--out", str(out), "--box", "full",
            "--workers", "2", "--quiet"]  # fmt: skip
    assert main(argv) == 1
    text = capsys.readouterr()
    assert "2 reconstructed, 1 failed, 0 already done (of 3)" in text.out and "broken.png" in text.out
    for stem in ("a", "b"):
        assert (out / stem / "done.json").is_file() and (out / stem / "posed.obj").is_file()
    assert not (out / "broken" / "done.json").exists()
    assert main(argv) == 1  # a rerun: the two finished images are skipped
    assert "0 reconstructed, 1 failed, 2 already done (of 3)" in capsys.readouterr().out
    assert main(["reconstruct", str(tmp_path / "nothing"), "--engines", str(scene["engines"]), "--out", str(out)]) == 2
    assert "no such file or directory" in capsys.readouterr().err


# ------------------------------------------------------------------ real photographs
def test_real_photographs_detect_crop_fit_and_save(scene, tmp_path):
    """astronaut and grace_hopper: the real detector box and crop rule, through the fit
    and the writers. The predictor is the oracle-map stand-in (it outputs the synthetic
    face's maps for any input), so the mesh is the synthetic face: what is tested is the
    image side (box, crop, camera in the photo's frame, files)."""
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    from p3dmm.runtime.decode import load_image
    from p3dmm.runtime.detect import crop_box

    rec = Reconstructor.from_engines(scene["engines"], backend="ort-cpu", detector="dlib", model=scene["model"])
    for name, img in (("astronaut", data.astronaut()),
                      ("grace_hopper", load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))):  # fmt: skip
        r = rec.reconstruct(img)
        H, W = img.shape[:2]
        assert r.crop == crop_box(r.box, W, H)
        left, top, side = r.crop
        assert 0 <= left and left + side <= W and 0 <= top and top + side <= H
        assert (r.camera_image.width, r.camera_image.height) == (W, H)
        # the mesh lands inside the crop in the photo's frame
        uv = r.camera_image.project(r.vertices[scene["model"].masks["face"]])
        assert (uv[:, 0] > left).all() and (uv[:, 0] < left + side).all() and (uv[:, 1] > top).all()
        out = r.save(tmp_path / name)
        assert np.asarray(Image.open(out / "overlay.png")).shape == img.shape
        assert json.loads((out / "report.json").read_text())["box"] == list(r.box)


def test_all_faces_command(scene, tmp_path, capsys):
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    cbook = pytest.importorskip("matplotlib.cbook")
    from p3dmm.runtime.decode import load_image

    a = data.astronaut()
    g = load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    both = np.zeros((600, 1024, 3), np.uint8)
    both[:512, :512] = a
    both[:600, 512:] = g[:, :512]
    photos = tmp_path / "in"
    photos.mkdir()
    Image.fromarray(both).save(photos / "two.png")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(photos / "blank.png")
    out = tmp_path / "out"
    rc = main(["reconstruct", str(photos), "--engines", str(scene["engines"]), "--out", str(out), "--all-faces", "--quiet"])
    text = capsys.readouterr().out
    assert rc == 1 and "1 reconstructed, 1 failed" in text and "blank.png" in text and "no face found" in text
    assert (out / "two" / "face0" / "posed.obj").is_file() and (out / "two" / "face1" / "posed.obj").is_file()
    assert json.loads((out / "two" / "done.json").read_text())["faces"] == 2


def test_a_tiny_exported_predictor_runs_end_to_end(tmp_path, capsys):
    """A real export (untrained tiny predictors) through the runtime: the backends and the
    crop run; the untrained maps give no UV correspondences, which is reported per image."""
    pytest.importorskip("onnxscript")
    import torch
    from p3dmm.export.engines import ExportOptions, export_engines
    from p3dmm.fitting.base.errors import FittingError
    from p3dmm.training.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, save_checkpoint
    from p3dmm.training.networks import Predictor, PredictorConfig

    layout = FlameModel.synthetic(seed=0).uv.layout_id()
    ckpts = []
    for task in ("normals", "uv"):
        torch.manual_seed(0)
        cfg = PredictorConfig.tiny(task, mask_channel=task == "normals")
        path = tmp_path / f"{task}.pt"
        save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": 0,
                               "model": Predictor(cfg).state_dict(), "predictor": cfg.to_dict(),
                               "normal_space": "camera", "uv_layout": layout})  # fmt: skip
        ckpts.append(str(path))
    export_engines(ckpts, ExportOptions(out=tmp_path / "engines", n_random=1, n_faces=0))
    rec = Reconstructor.from_engines(tmp_path / "engines", detector=None)
    assert rec.normals.name == "ort-cpu" and rec.normal_space == "camera"
    maps = rec.predict(np.zeros((2, 512, 512, 3), np.uint8))
    assert maps["normals"].shape == (2, 512, 512, 3) and maps["uv"].shape == (2, 512, 512, 2) and maps["mask"].dtype == bool
    with pytest.raises(FittingError, match="UV"):
        rec.reconstruct(np.zeros((512, 512, 3), np.uint8), box="full")


def test_batches_are_split_to_the_engines_largest_batch(scene):
    rec = Reconstructor.from_engines(scene["engines"], backend="ort-cpu", detector=None, model=scene["model"])
    calls = []

    class Limited:
        def __init__(self, inner):
            self.inner, self.max_batch, self.name, self.entry = inner, 2, inner.name, inner.entry

        def infer(self, feeds):
            calls.append(len(feeds["image"]))
            return self.inner.infer(feeds)

    rec.normals = Limited(rec.normals)  # type: ignore[assignment]
    maps = rec.predict(np.zeros((5, 512, 512, 3), np.uint8))
    assert calls == [2, 2, 1] and maps["normals"].shape[0] == 5


@pytest.mark.gpu
def test_the_gpu_fit_matches_the_cpu_fit(scene):
    cpu = Reconstructor.from_engines(scene["engines"], backend="ort-cpu", detector=None, model=scene["model"])
    gpu = Reconstructor.from_engines(scene["engines"], backend="ort-cpu", detector=None, model=scene["model"])
    gpu.device = "cuda"
    a = cpu.reconstruct(scene["maps"].rgb, box="full")
    b = gpu.reconstruct(scene["maps"].rgb, box="full")
    assert _err(scene, b) < 1.0 and np.abs(a.vertices - b.vertices).mean() < 5e-4
