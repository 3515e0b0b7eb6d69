"""Atomic file output: every file p3dmm writes appears complete or not at all."""

from __future__ import annotations

import os
import tempfile
from os import PathLike
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_bytes"]


def atomic_write(path: str | PathLike[str], write: Callable[[BinaryIO], object]) -> str:
    """Write ``path`` through a temporary file in the same directory and ``os.replace``.

    Args:
        path: destination file; its directory must exist.
        write: called with the open binary temporary file.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | PathLike[str], data: bytes) -> str:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda fh: fh.write(data))
