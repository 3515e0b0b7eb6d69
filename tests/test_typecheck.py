"""mypy over all four packages, as CI's type check. The TensorRT code in ``export/`` is
checked against the project-owned stub ``export/stubs/tensorrt.pyi`` (pyproject's
``[tool.mypy] mypy_path``): TensorRT itself cannot be installed here, and the PyPI
tensorrt-stubs do not pass mypy as shipped."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary", "fitting", "runtime", "export", "training"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_checks_tensorrt_calls_against_the_project_stub(tmp_path: Path) -> None:
    """export/stubs/tensorrt.pyi is what mypy reads for ``import tensorrt``: a wrong call fails."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    bad = tmp_path / "trt_use.py"
    bad.write_text(
        "import tensorrt\n"
        "def f(b: tensorrt.Builder, n: tensorrt.INetworkDefinition) -> None:\n"
        "    b.build_serialized_network(n)\n"  # the config argument is missing
        "    b.create_network(flags='x')\n"  # flags is an int
    )
    cmd = [sys.executable, "-m", "mypy", "--no-error-summary", "--config-file", str(ROOT / "pyproject.toml"), str(bad)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Missing positional argument "config"' in proc.stdout and '"create_network"' in proc.stdout, proc.stdout
