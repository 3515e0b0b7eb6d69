"""``p3dmm reconstruct IMAGES_OR_DIRS... [--engines DIR] --out DIR``: a batch job over photos.

Without ``--engines`` the embedded default predictors run (``Reconstructor.default()``).

One output folder per image (``OUT/<stem>/``; with ``--all-faces`` one sub-folder per face,
``face0`` the largest), written by :meth:`Reconstruction.save`, and ``done.json`` last: a
rerun skips images whose folder has it (resumable). A bad file, a photo without a face or
a fit that fails is reported and skipped; the run goes on, prints a summary and exits 1
when any input failed (2 for a usage error such as a bad engine directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.errors import InputError, P3DMMError

__all__ = ["IMAGE_SUFFIXES", "add_parser", "collect_images", "run_reconstruct"]

log = logging.getLogger("p3dmm")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
DONE = "done.json"


def collect_images(inputs: list[str]) -> list[Path]:
    """Files given directly, and the image files under given directories (recursive, sorted).

    Raises:
        InputError: an input that does not exist.
    """
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    return files


def _names(files: list[Path]) -> list[str]:
    """Output folder names: the stem, made unique with ``_2``, ``_3``, ..."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        n = seen.get(f.stem, 0) + 1
        seen[f.stem] = n
        out.append(f.stem if n == 1 else f"{f.stem}_{n}")
    return out


def run_reconstruct(args: argparse.Namespace) -> int:
    from p3dmm.fitting import FitConfig
    from tqdm import tqdm

    from .reconstruct import Reconstruction, Reconstructor

    files = collect_images(args.inputs)
    if not files:
        raise InputError(f"no images found in {args.inputs} (suffixes {', '.join(IMAGE_SUFFIXES)})")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create it ({e})") from e
    kwargs: dict[str, Any] = {"backend": args.backend, "device": args.device, "config": FitConfig(solver=args.solver),
                              "detector": args.detector}  # fmt: skip
    rec = Reconstructor.from_engines(args.engines, **kwargs) if args.engines else Reconstructor.default(**kwargs)
    box: Any = "full" if args.box == "full" else None
    jobs = [(f, out / n) for f, n in zip(files, _names(files))]
    todo = [(f, d) for f, d in jobs if not (d / DONE).is_file()]
    skipped = len(jobs) - len(todo)
    failures: list[tuple[Path, str]] = []
    lock = threading.Lock()
    done = 0

    def one(f: Path, d: Path) -> int:
        result = rec.reconstruct(f, box=box, focal=args.focal, all_faces=args.all_faces)
        faces: list[Reconstruction] = result if isinstance(result, list) else [result]
        if args.all_faces:
            for k, r in enumerate(faces):
                r.save(d / f"face{k}")
        else:
            faces[0].save(d)
        summary = {"image": str(f), "faces": len(faces), "confidence": [r.confidence for r in faces]}
        atomic_write_bytes(d / DONE, json.dumps(summary).encode())
        return len(faces)

    bar = tqdm(total=len(todo), desc="reconstruct", unit="image", file=sys.stderr, disable=args.quiet)
    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        futures = {pool.submit(one, f, d): f for f, d in todo}
        for fut in as_completed(futures):
            f = futures[fut]
            try:
                fut.result()
                with lock:
                    done += 1
            except P3DMMError as e:
                with lock:
                    failures.append((f, f"{type(e).__name__}: {e}"))
                tqdm.write(f"p3dmm reconstruct: skipped {f}: {e}", file=sys.stderr)
            bar.update(1)
    bar.close()
    print(f"p3dmm reconstruct: {done} reconstructed, {len(failures)} failed, {skipped} already done "
          f"(of {len(jobs)}) -> {out}")  # fmt: skip
    for f, why in sorted(failures):
        print(f"  failed: {f}: {why}")
    return 1 if failures else 0


def add_parser(sub: Any) -> None:
    """Register ``p3dmm reconstruct``."""
    r = sub.add_parser("reconstruct", help="reconstruct FLAME meshes from photos with an engine directory")
    r.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or directories of images")
    r.add_argument("--engines", default=None,
                   help="an export-engines directory (default: the embedded predictors, trained on synthetic heads)")
    r.add_argument("--out", required=True, help="output directory (one folder per image)")
    r.add_argument("--backend", default="auto", help="auto, tensorrt, ort-tensorrt, ort-cuda or ort-cpu")
    r.add_argument("--device", default="auto", help="fitting device: auto, cpu or cuda")
    r.add_argument("--solver", default="fast", choices=["fast", "paper"])
    r.add_argument("--focal", type=float, default=None, help="known focal length in pixels of the photos")
    r.add_argument("--all-faces", action="store_true", help="every detected face (default: the largest)")
    r.add_argument("--box", choices=["detect", "full"], default="detect", help="full: the photos are face crops")
    r.add_argument("--detector", default="auto", help="face detector: auto, dlib, haar or lbp")
    r.add_argument("--workers", type=int, default=1, help="threads sharing one Reconstructor")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=run_reconstruct)

