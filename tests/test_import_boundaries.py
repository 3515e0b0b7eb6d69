"""fitting/ and runtime/ must import with torch and timm blocked (DESIGN.md import rules)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import sys
sys.modules["torch"] = None
sys.modules["timm"] = None
import importlib, pkgutil
import p3dmm.{pkg} as pkg
names = [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")]
for n in names:
    importlib.import_module(n)
bad = [m for m in ("torch", "timm") if sys.modules.get(m) is not None]
assert not bad, bad
print(len(names))
"""


@pytest.mark.parametrize("pkg", ["fitting", "runtime"])
def test_package_imports_with_torch_blocked(pkg):
    # a fresh interpreter: this test process may already have torch loaded
    out = subprocess.run([sys.executable, "-c", CODE.format(pkg=pkg)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_fitting_model_works_with_torch_blocked():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
        "import numpy as np\n"
        "from tests.fitting.flame_fixtures import random_flame_model\n"
        "m = random_flame_model()\n"
        "v = m.vertices(m.zero_params())\n"
        "assert np.allclose(v, m.v_template)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
