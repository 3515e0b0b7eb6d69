"""mypy over the torch-free packages (fitting, runtime, export), as CI's type check.

``training/`` is not included yet: torch's ``nn.Module.__getattr__`` typing makes its
buffers ``Tensor | Module`` for mypy, which needs class-level annotations first.
"""

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
    cmd = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary", "fitting", "runtime", "export"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
