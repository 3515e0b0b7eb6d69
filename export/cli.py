"""The ``export-engines`` command (also ``p3dmm export``).

``add_parsers`` is the ``p3dmm.commands`` entry point; it imports nothing heavy, so
building the ``p3dmm`` parser stays torch-free (torch loads when the command runs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from p3dmm.fitting.base.cli import run

__all__ = ["add_parsers", "build_parser", "main"]

_HELP = "checkpoints -> validated ONNX (fp32, fp16) -> TensorRT engines -> manifest -> Triton repository"


def _batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (three integers), got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise argparse.ArgumentTypeError(f"need 1 <= MIN <= OPT <= MAX, got {text!r}")
    return lo, opt, hi


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="p3dmm train checkpoints (last.pt) or official Pixel3DMM checkpoints (normals and/or uv)")
    p.add_argument("--out", required=True, type=Path, help="engine directory to write")
    p.add_argument("--fp16", action="store_true", help="also write <task>.fp16.onnx (mixed precision), validated")
    p.add_argument("--fp16-only", action="store_true",
                   help="keep only the fp16 files (fp32 is exported and validated, then dropped): half the size")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT plans (needs TensorRT and a GPU)")
    p.add_argument("--batch", type=_batch, default=(1, 1, 4), metavar="MIN,OPT,MAX",
                   help="batch range of the TensorRT profile and Triton's max_batch_size (default 1,1,4)")
    p.add_argument("--flip-tta", action="store_true", help="bake horizontal-flip averaging into the graph")
    p.add_argument("--triton-repo", type=Path, default=None, help="also write a Triton model repository here")
    p.add_argument("--validate-images", type=Path, default=None,
                   help="directory of 512 px face crops to validate on (default: synthetic renders)")
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")
    p.add_argument("--workspace-gb", type=float, default=4.0, help="TensorRT workspace limit in GiB (default 4)")
    p.add_argument("--builder-level", type=int, default=3, help="TensorRT builder optimisation level 0-5 (default 3)")
    p.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file (default OUT/timing.cache)")
    p.add_argument("--trusted", action="store_true",
                   help="allow a full unpickle of official Lightning checkpoints (only for files you trust)")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    import logging

    from .engines import ExportOptions, ValidationFailed, export_engines
    from .tensorrt_build import BuildOptions

    options = ExportOptions(
        out=args.out, fp16=args.fp16, fp16_only=args.fp16_only, tensorrt=args.tensorrt, batch=args.batch, flip_tta=args.flip_tta,
        triton_repo=args.triton_repo, validate_images=args.validate_images, opset=args.opset, trusted=args.trusted,
        build=BuildOptions(workspace_bytes=int(args.workspace_gb * (1 << 30)), optimization_level=args.builder_level,
                           timing_cache=args.timing_cache),
    )  # fmt: skip
    try:
        manifest = export_engines(args.checkpoints, options)
    except ValidationFailed as e:
        print(f"export-engines: {e}", file=sys.stderr)
        return 1
    logging.getLogger("p3dmm.export").info("export-engines: wrote %d model file(s) to %s", len(manifest.models), args.out)
    return 0


def add_parsers(sub: Any) -> None:
    """Register ``p3dmm export`` (the ``p3dmm.commands`` entry point)."""
    _configure(sub.add_parser("export", help=_HELP, description=_HELP))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export-engines", description=_HELP)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    _configure(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv, command="export-engines")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
