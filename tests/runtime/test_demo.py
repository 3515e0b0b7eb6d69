"""The demo command end to end (small size, fast solver only) and CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from p3dmm.runtime.cli import main


def test_demo_writes_results_and_recovers_geometry(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--size", "256", "--solvers", "fast"]) == 0
    text = capsys.readouterr().out
    assert "ORACLE maps" in text and "fast" in text
    for name in ("image.png", "normals.png", "uv.png", "mask.png", "report.json", "fast/posed.obj",
                 "fast/neutral.obj", "fast/posed.ply", "fast/overlay.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    fast = report["solvers"]["fast"]
    assert report["oracle_maps"] is True
    assert fast["posed_error_mm"]["mean_mm"] < 1.5 and fast["neutral_error_mm"]["mean_mm"] < 1.5
    img = np.asarray(Image.open(out / "fast/overlay.png"))
    assert img.shape == (256, 256, 3) and img.std() > 5
    posed = (out / "fast/posed.obj").read_text()
    assert posed.count("\nv ") + posed.startswith("v ") == 5023


def test_cli_reports_bad_solver(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--solvers", "sgd"]) == 2
    assert "unknown solver 'sgd'" in capsys.readouterr().err


def test_cli_requires_a_command():
    with pytest.raises(SystemExit):
        main([])
