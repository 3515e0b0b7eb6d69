"""The layers import one way (README "Architecture"), with no circles and no private names.

``p3dmm.fitting``: base <- model <- render <- fitter (``metrics`` on base only). The four
packages: fitting <- training, fitting <- runtime, (training, runtime) <- export. Every
import counts: top-level, inside functions and under ``if TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fitting", "runtime", "export", "training")

#: What each layer may import (besides itself).
ALLOWED = {
    "fitting.base": set(),
    "fitting.model": {"fitting.base"},
    "fitting.render": {"fitting.base", "fitting.model"},
    "fitting.fitter": {"fitting.base", "fitting.model", "fitting.render"},
    "fitting.metrics": {"fitting.base"},
    "fitting": {"fitting.base", "fitting.model", "fitting.render", "fitting.fitter", "fitting.metrics"},
    "runtime": {"fitting"},
    "training": {"fitting"},
    "export": {"fitting", "runtime", "training"},
}


def _layer(module: str) -> str:
    """``p3dmm.fitting.render.maps`` -> ``fitting.render``; ``p3dmm.training.x`` -> ``training``."""
    parts = module.split(".")[1:]
    if parts[0] == "fitting" and len(parts) > 1 and parts[1] in ("base", "model", "render", "fitter", "metrics"):
        return f"fitting.{parts[1]}"
    return parts[0]


def _allowed(src: str, dst: str) -> bool:
    if src == dst:
        return True
    allowed = ALLOWED[src]
    # a package may use everything below the layers it is allowed (fitting -> fitting.*)
    return dst in allowed or any(dst.startswith(a + ".") for a in allowed) or (
        dst.startswith("fitting.") and "fitting" in allowed
    )


def _imports() -> list[tuple[str, str, str]]:
    """(file:line, importing module, imported p3dmm module) for every import in the packages."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mod = ".".join(["p3dmm", *parts])
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                        base = base[: len(base) - (node.level - 1)]
                        src = ".".join(base + ([node.module] if node.module else []))
                    else:
                        src = node.module or ""
                    targets = [src] + [f"{src}.{a.name}" for a in node.names]
                for t in targets:
                    if t.startswith("p3dmm."):
                        out.append((f"{path.relative_to(ROOT)}:{node.lineno}", mod, t))
    return out


def test_layers_import_one_way() -> None:
    bad = []
    for where, src, dst in _imports():
        if dst.count(".") < 1:
            continue
        a, b = _layer(src), _layer(dst)
        if not _allowed(a, b):
            bad.append(f"{where}: {src} ({a}) imports {dst} ({b})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(set(bad)))


def test_no_private_names_across_modules() -> None:
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("p3dmm")):
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__"):
                            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {a.name}")
    assert not bad, bad


def test_shared_import_cycle_tool_reports_nothing() -> None:
    """``../shared/tools/import_cycles.py`` (the project's checker) finds no circle and no private import."""
    tool = ROOT.parent / "shared" / "tools" / "import_cycles.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not present beside this checkout")
    out = subprocess.run([sys.executable, str(tool), str(ROOT)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_p3dmm_cli_builds_with_torch_blocked() -> None:
    """The product CLI finds the training commands through entry points without importing torch."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['timm'] = None\n"
        "from p3dmm.runtime.cli import build_parser\n"
        "p = build_parser()\n"
        "names = set(p._subparsers._group_actions[0].choices)\n"
        "assert {'demo', 'synth', 'render-dataset', 'train'} <= names, names\n"
        "assert 'p3dmm.training.train' not in sys.modules\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
