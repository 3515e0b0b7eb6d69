"""``p3dmm synth`` and ``p3dmm render-dataset``: sub-commands of the ``p3dmm`` CLI.

:func:`add_parsers` adds both to the CLI's sub-parser group. They render on NumPy
and never import torch.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable

from p3dmm.fitting.base.errors import InputError

__all__ = ["add_parsers"]

log = logging.getLogger("p3dmm")


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}")
        return v

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _yaw_degrees(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of degrees") from None
    if not 0.0 <= v <= 90.0:
        raise argparse.ArgumentTypeError(f"{text}: expected degrees in [0, 90]")
    return v


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("FLAME model (default: the built-in synthetic head)")
    g.add_argument("--flame", metavar="PKL", help="FLAME model file (generic_model.pkl, flame2023.pkl, ...)")
    g.add_argument("--flame-uv", metavar="OBJ", help="head_template.obj with the UV layout (needed with --flame)")
    g.add_argument("--flame-masks", metavar="PKL", help="FLAME_masks.pkl (region masks; gives mask.png)")
    g.add_argument("--flame-landmarks", metavar="FILE", help="landmark embedding (places the eyebrows)")


def _load_model(args: argparse.Namespace) -> Any:
    if args.flame is None:
        for opt in ("flame_uv", "flame_masks", "flame_landmarks"):
            if getattr(args, opt) is not None:
                raise InputError(f"--{opt.replace('_', '-')} needs --flame")
        return None
    from p3dmm.fitting import FlameModel

    if args.flame_uv is None:
        raise InputError(f"--flame {args.flame}: also pass --flame-uv head_template.obj (the renderer needs UVs)")
    return FlameModel.load(args.flame, uv=args.flame_uv, masks=args.flame_masks, landmarks=args.flame_landmarks)


def _report(name: str, result: Any) -> int:
    log.info(
        "%s: %d written, %d already complete, %d failed in %.1f s -> %s",
        name,
        result.written,
        result.skipped,
        len(result.failed),
        result.seconds,
        result.root,
    )
    for item, msg in result.failed:
        log.warning("%s: failed: %s: %s", name, item, msg)
    return 1 if result.failed else 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from .synth import SynthConfig, synthesize

    result = synthesize(
        args.out,
        n=args.n,
        seed=args.seed,
        size=args.size,
        workers=args.workers,
        model=_load_model(args),
        normal_space=args.normal_space,
        config=SynthConfig(yaw_deg=(-args.yaw_max, args.yaw_max)),
    )
    return _report("synth", result)


def _cmd_render_dataset(args: argparse.Namespace) -> int:
    from .synth import render_dataset

    result = render_dataset(
        args.meshes,
        args.out,
        views=args.views,
        size=args.size,
        seed=args.seed,
        model=_load_model(args),
        normal_space=args.normal_space,
        workers=args.workers,
    )
    return _report("render-dataset", result)


def add_parsers(subparsers: Any) -> None:
    """Add ``synth`` and ``render-dataset`` to an ``argparse`` sub-parser group.

    Each sets ``func`` (``args -> exit code``: 0 ok, 1 when some items failed).

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.
    """
    s = subparsers.add_parser(
        "synth",
        help="render synthetic training data (normals, UV, masks, photo-like RGB) from random FLAME heads",
        description="Render N random FLAME heads into a p3dmm-maps dataset. Resumable: complete samples "
        "are kept, and the output depends only on --seed (not on --workers).",
    )
    s.add_argument("--out", required=True, metavar="DIR", help="dataset directory")
    s.add_argument("--n", required=True, type=_non_negative_int, metavar="N", help="number of samples")
    s.add_argument("--seed", required=True, type=_non_negative_int, metavar="S", help="base seed")
    s.add_argument("--size", type=_positive_int, default=512, help="image side in pixels (default: 512)")
    s.add_argument("--workers", type=_positive_int, default=None, help="processes (default: CPU count, max 8)")
    s.add_argument(
        "--normal-space", choices=("camera", "head"), default="camera", help="space of the normals (default: camera)"
    )
    s.add_argument(
        "--yaw-max", type=_yaw_degrees, default=60.0, metavar="DEG",
        help="head yaw drawn uniformly in [-DEG, DEG] (default: 60; at most 90)",
    )
    _add_model_options(s)
    s.set_defaults(func=_cmd_synth)

    r = subparsers.add_parser(
        "render-dataset",
        help="render training data from your FLAME-topology meshes (OBJ/PLY, optional textures)",
        description="Render K random views of each mesh (FLAME vertex count and order; a <stem>.png/.jpg "
        "beside a mesh is used as its texture). A mesh that cannot be used is reported and skipped.",
    )
    r.add_argument("meshes", nargs="+", metavar="MESHES", help="mesh files or directories of .obj/.ply files")
    r.add_argument("--out", required=True, metavar="DIR", help="dataset directory")
    r.add_argument("--views", type=_positive_int, default=4, help="views per mesh (default: 4)")
    r.add_argument("--size", type=_positive_int, default=512, help="image side in pixels (default: 512)")
    r.add_argument("--seed", type=_non_negative_int, default=0, help="base seed (default: 0)")
    r.add_argument("--workers", type=_positive_int, default=1, help="processes (default: 1)")
    r.add_argument(
        "--normal-space", choices=("camera", "head"), default="camera", help="space of the normals (default: camera)"
    )
    _add_model_options(r)
    r.set_defaults(func=_cmd_render_dataset)
