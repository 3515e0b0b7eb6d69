"""The ``p3dmm`` command line (torch-free).

The product's own commands (``demo``) are defined here; other packages register theirs
through the ``p3dmm.commands`` entry-point group (each entry point names a function
``add_parsers(subparsers)``): the training package registers ``synth``,
``render-dataset`` and ``train`` (torch loads only when ``train`` runs). So this module
imports nothing of :mod:`p3dmm.training`, and the training entry point can use the same
runner (:func:`p3dmm.fitting.base.cli.run`) without importing this module.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points
from typing import Sequence

from p3dmm.fitting.base.cli import run

log = logging.getLogger("p3dmm")

#: Entry-point group of the sub-command plug-ins.
COMMANDS_GROUP = "p3dmm.commands"


def _box(text: str) -> str | tuple[float, ...]:
    if text == "full":
        return text
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'full' or X0,Y0,X1,Y1 in pixels")
    return box


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    solvers = args.solvers or ("fast,paper" if args.oracle else "fast")
    return run_demo(out_dir=args.out, seed=args.seed, size=args.size, solvers=[s for s in solvers.split(",") if s],
                    oracle=args.oracle, image=args.image, box=args.box, engines=args.engines)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The ``p3dmm`` parser: ``demo`` and every registered :data:`COMMANDS_GROUP` plug-in."""
    p = argparse.ArgumentParser(prog="p3dmm", description="Pixel3DMM reconstruction: predict, fit, export, train.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="photo -> embedded predictors -> fitted mesh, on a held-out synthetic face (or --image)",
        description="Render a held-out synthetic face photo, run the embedded predictors and the fitter on it, and "
        "print the map and mesh errors against the ground truth; --oracle fits the ground-truth maps instead, "
        "--image runs a photo of yours.",
    )
    d.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    d.add_argument("--seed", type=int, default=0, help="seed of the rendered face's parameters and appearance")
    d.add_argument("--oracle", action="store_true", help="fit the ground-truth (oracle) maps; no network runs")
    d.add_argument("--image", metavar="PATH", default=None, help="reconstruct this photo instead (largest face)")
    d.add_argument("--box", type=_box, default=None, metavar="full|X0,Y0,X1,Y1",
                   help="with --image: the face box instead of detection ('full': the image is the crop)")
    d.add_argument("--engines", metavar="DIR", default=None, help="an export-engines directory instead of the embedded one")
    d.add_argument("--size", type=int, default=512, help="with --oracle: image size of the rendered maps (default 512)")
    d.add_argument("--solvers", default=None,
                   help="comma-separated solvers: fast, paper (default: fast; with --oracle fast,paper)")
    d.set_defaults(func=_cmd_demo)

    from .eval_cli import add_parser as add_eval
    from .reconstruct_cli import add_parser as add_reconstruct

    add_reconstruct(sub)
    add_eval(sub)

    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
