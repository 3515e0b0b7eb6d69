"""The command-line runner shared by ``p3dmm`` and the training entry point.

It lives in the lowest layer so that the torch-free product CLI (:mod:`p3dmm.runtime.cli`)
and the training commands (:mod:`p3dmm.training`) can both use it without importing
each other: training registers its sub-commands through the ``p3dmm.commands`` entry
points instead (see :func:`p3dmm.runtime.cli.build_parser`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from .errors import P3DMMError

__all__ = ["run"]


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
