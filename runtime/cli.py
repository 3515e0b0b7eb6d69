"""The ``p3dmm`` command line (torch-free; training commands import torch lazily)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from p3dmm.fitting.errors import P3DMMError

log = logging.getLogger("p3dmm")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out_dir=args.out, seed=args.seed, size=args.size, solvers=args.solvers.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="p3dmm", description="Pixel3DMM reconstruction: predict, fit, export, train.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the pipeline on the embedded synthetic head and write results")
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--seed", type=int, default=0, help="seed of the rendered face's parameters and appearance")
    d.add_argument("--size", type=int, default=512, help="image size of the rendered maps (default 512)")
    d.add_argument("--solvers", default="fast,paper", help="comma-separated solvers to run: fast, paper")
    d.set_defaults(func=_cmd_demo)

    from p3dmm.training.synth_cli import add_parsers as add_synth_parsers  # torch-free

    add_synth_parsers(sub)

    from p3dmm.training.train_cli import add_parsers as add_train_parsers  # torch loads when `train` runs

    add_train_parsers(sub)
    return p


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None, command: str | None = None) -> int:
    """Parse ``argv``, set up logging (``-v``: debug) and run ``args.func``.

    A :class:`P3DMMError` is printed as ``p3dmm <command>: error: ...`` and gives exit code 2
    (``command`` defaults to the parsed sub-command).
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args))
    except P3DMMError as e:
        print(f"p3dmm {command or args.command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
