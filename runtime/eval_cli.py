"""``p3dmm eval PRED GT [--protocol pixel3dmm|now|facescape] [--landmarks DIR] [--json OUT]``.

PRED and GT are two mesh files, or two directories whose OBJ/PLY files are matched by
stem. GT may be a point cloud (a PLY without faces). The now protocol reads landmarks
from ``DIR/<stem>_pred.(npy|txt)`` and ``DIR/<stem>_gt.(npy|txt)``, seven ``x y z`` rows
each (NoW's order: four eye corners, nose tip, two mouth corners). The command prints
one row per pair and the mean. A bad or unmatched pair is reported and skipped, and the
exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import InputError, P3DMMError

__all__ = ["add_parser", "load_geometry", "run_eval"]

MESH_SUFFIXES = (".obj", ".ply")
PROTOCOLS = ("pixel3dmm", "now", "facescape")


def load_geometry(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(vertices (N, 3) float64, faces (F, 3) or None)`` of an OBJ/PLY mesh or point cloud.

    Raises:
        InputError: missing, unreadable or empty file.
    """
    import trimesh

    if not path.is_file():
        raise InputError(f"{path}: not found")
    try:
        geom = trimesh.load(str(path), process=False, force=None)
    except Exception as e:  # trimesh raises many kinds for a bad file
        raise InputError(f"{path}: cannot read it as a mesh or point cloud ({type(e).__name__}: {e})") from e
    merged: Any = geom
    if isinstance(geom, trimesh.Scene):
        merged = geom.to_geometry() if hasattr(geom, "to_geometry") else geom.dump(concatenate=True)
    v = np.asarray(getattr(merged, "vertices", np.zeros((0, 3))), np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise InputError(f"{path}: no vertices")
    faces = getattr(merged, "faces", None)
    f = np.asarray(faces, np.int64) if faces is not None and len(faces) else None
    return v, f


def _landmarks(directory: Path, stem: str, which: str) -> np.ndarray:
    for suffix in (".npy", ".txt"):
        p = directory / f"{stem}_{which}{suffix}"
        if p.is_file():
            try:
                a = np.load(p) if suffix == ".npy" else np.loadtxt(p)
            except (OSError, ValueError) as e:
                raise InputError(f"{p}: cannot read landmarks ({e})") from e
            a = np.asarray(a, np.float64).reshape(-1, 3) if np.size(a) == 21 else np.asarray(a)
            if a.shape != (7, 3):
                raise InputError(f"{p}: landmarks have shape {a.shape}, expected (7, 3)")
            return a
    raise InputError(f"{directory}: no landmarks {stem}_{which}.npy or .txt")


def _pairs(pred: Path, gt: Path) -> tuple[list[tuple[str, Path, Path]], list[tuple[str, str]]]:
    if pred.is_file() and gt.is_file():
        return [(pred.stem, pred, gt)], []
    if pred.is_dir() and gt.is_dir():
        p = {f.stem: f for f in sorted(pred.iterdir()) if f.suffix.lower() in MESH_SUFFIXES}
        g = {f.stem: f for f in sorted(gt.iterdir()) if f.suffix.lower() in MESH_SUFFIXES}
        missing = [(s, f"no ground truth in {gt}") for s in sorted(set(p) - set(g))]
        missing += [(s, f"no prediction in {pred}") for s in sorted(set(g) - set(p))]
        return [(s, p[s], g[s]) for s in sorted(set(p) & set(g))], missing
    raise InputError(f"PRED {pred} and GT {gt} must both be files or both be directories (that exist)")


def run_eval(args: argparse.Namespace) -> int:
    from p3dmm.fitting.metrics import evaluate

    if args.protocol == "now" and args.landmarks is None:
        raise InputError("--protocol now needs --landmarks DIR")
    pairs, failed = _pairs(Path(args.pred), Path(args.gt))
    if not pairs and not failed:
        raise InputError(f"no OBJ/PLY files in {args.pred} and {args.gt}")
    rows: list[dict[str, Any]] = []
    for stem, p, g in pairs:
        try:
            pv, pf = load_geometry(p)
            gv, gf = load_geometry(g)
            if pf is None:
                raise InputError(f"{p}: the prediction must be a mesh (it has no faces)")
            lm: dict[str, Any] = {}
            if args.protocol == "now":
                lm = {"pred_landmarks": _landmarks(Path(args.landmarks), stem, "pred"),
                      "gt_landmarks": _landmarks(Path(args.landmarks), stem, "gt")}  # fmt: skip
            rows.append({"pair": stem, **evaluate(pv, pf, gv, gf, protocol=args.protocol, **lm)})
        except P3DMMError as e:
            failed.append((stem, str(e)))
    keys = [k for k in (rows[0] if rows else {}) if k != "pair"]
    if rows:
        print("| pair | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        for r in rows:
            print(f"| {r['pair']} | " + " | ".join(f"{r[k]:.4g}" for k in keys) + " |")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        print(f"| **mean of {len(rows)}** | " + " | ".join(f"{mean[k]:.4g}" for k in keys) + " |")
    else:
        mean = {}
    for stem, why in failed:
        print(f"skipped {stem}: {why}")
    if args.json:
        out = {"protocol": args.protocol, "pairs": rows, "mean": mean, "skipped": [{"pair": s, "why": w} for s, w in failed]}
        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    """Register ``p3dmm eval``."""
    e = sub.add_parser("eval", help="compare reconstructed meshes with ground truth (Chamfer, R2.5, NoW, FaceScape)")
    e.add_argument("pred", help="predicted mesh, or a directory of them")
    e.add_argument("gt", help="ground-truth mesh / point cloud, or a directory (matched by file stem)")
    e.add_argument("--protocol", choices=PROTOCOLS, default="pixel3dmm")
    e.add_argument("--landmarks", default=None, help="directory of <stem>_pred / <stem>_gt 7-landmark files (now)")
    e.add_argument("--json", default=None, help="also write the numbers here")
    e.set_defaults(func=run_eval)
