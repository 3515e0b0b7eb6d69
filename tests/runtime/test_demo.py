"""The demo command end to end: predicted maps (the embedded predictors), --oracle, --image,
and its CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from p3dmm.runtime.cli import main


def test_demo_predicts_fits_and_reports_against_the_ground_truth(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out synthetic face" in text and "normals.fp16.onnx" in text and "oracle maps, fast" in text
    for name in ("image.png", "comparison.png", "report.json", "predicted/posed.obj", "predicted/neutral.obj",
                 "predicted/texture.png", "predicted/overlay.png", "predicted/normals.png", "predicted/uv.png",
                 "predicted/mask.png", "predicted/params.npz", "predicted/camera.json", "ground_truth/normals.png",
                 "ground_truth/uv.png", "ground_truth/mask.png", "ground_truth/posed.obj", "ground_truth/oracle_fit_fast.obj"):  # fmt: skip
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "predicted" and report["files"] == ["normals.fp16.onnx", "uv.fp16.onnx"]
    e = report["map_errors"]
    # measured with the committed weights: 16.3 deg, 8.9 px, IoU 0.878, 5.8 / 3.9 mm (oracle 0.55 mm)
    assert 0 < e["normal_mean_deg"] < 20 and 0 < e["uv_mean_px"] < 16 and e["mask_iou"] > 0.78, e
    pred, oracle = report["fits"]["predicted maps, fast"], report["fits"]["oracle maps, fast"]
    assert oracle["posed_mm"] < 1.0 and pred["posed_mm"] < 8.0 and pred["neutral_mm"] < 6.0, report["fits"]
    assert set(report["timings"]) >= {"render", "predict", "fit", "save"}
    assert np.asarray(Image.open(out / "comparison.png")).shape == (516, 776, 3)  # 2 x 3 tiles of 256 px, 4 px gutters


def test_demo_oracle_mode_is_labelled_and_recovers_geometry(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--oracle", "--out", str(out), "--size", "256", "--solvers", "fast"]) == 0
    text = capsys.readouterr().out
    assert "ORACLE maps" in text and "fast" in text
    for name in ("image.png", "normals.png", "uv.png", "mask.png", "report.json", "fast/posed.obj",
                 "fast/neutral.obj", "fast/posed.ply", "fast/overlay.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    fast = report["solvers"]["fast"]
    assert report["oracle_maps"] is True and report["mode"] == "oracle"
    assert fast["posed_error_mm"]["mean_mm"] < 1.5 and fast["neutral_error_mm"]["mean_mm"] < 1.5
    img = np.asarray(Image.open(out / "fast/overlay.png"))
    assert img.shape == (256, 256, 3) and img.std() > 5
    posed = (out / "fast/posed.obj").read_text()
    assert posed.count("\nv ") + posed.startswith("v ") == 5023


def test_demo_on_a_users_photo(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("dlib")
    data = pytest.importorskip("skimage.data")
    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(data.astronaut()).save(photo)
    out = tmp_path / "out"
    assert main(["demo", "--image", str(photo), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "confidence" in text and "trained on synthetic heads only" in text
    for name in ("posed.obj", "overlay.png", "texture.png", "report.json", "crop.png"):
        assert (out / name).is_file(), name
    # a face crop given as the whole image
    assert main(["demo", "--image", str(photo), "--box", "full", "--out", str(tmp_path / "full")]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--solvers", "sgd"], "unknown solver 'sgd'"),
        (["--oracle", "--image", "x.jpg"], "--image and --oracle exclude each other"),
        (["--size", "256"], "--size 256 needs --oracle"),
        (["--image", "missing.jpg"], "missing.jpg"),
        (["--engines", "no_such_dir"], "no_such_dir"),
    ],
)
def test_cli_errors_name_the_problem(tmp_path, capsys, argv, message):
    assert main(["demo", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_bad_box_is_an_argument_error(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--image", "x.jpg", "--box", "1,2,3"])
    assert "expected 'full' or X0,Y0,X1,Y1" in capsys.readouterr().err


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        main([])
