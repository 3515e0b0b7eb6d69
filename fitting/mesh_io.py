"""Mesh output: OBJ with the model's UV layout, and PLY/GLB/STL through trimesh.

OBJ files with UVs are written by :func:`p3dmm.fitting.flame_io.write_obj_with_uv`
(``f v/vt`` with separate vertex and texture indices) because trimesh splits vertices
at UV seams on export, which would renumber FLAME's 5023 vertices; everything else goes
through trimesh. All writes are atomic.
"""

from __future__ import annotations

import io
import os
from os import PathLike
from typing import Any

import numpy as np

from .atomic_io import atomic_write_bytes
from .errors import InputError
from .flame_model import FlameUV
from .xp import to_numpy

__all__ = ["save_mesh"]

_TRIMESH_TYPES = {".ply": "ply", ".glb": "glb", ".stl": "stl", ".off": "off"}


def save_mesh(
    path: str | PathLike[str],
    vertices: Any,
    faces: Any,
    uv: FlameUV | None = None,
    vertex_colors: Any = None,
) -> str:
    """Write a triangle mesh; the format follows the suffix.

    Args:
        path: ``.obj`` (with ``vt``/``ft`` when ``uv`` is given, vertex order kept),
            ``.ply``, ``.glb``, ``.stl`` or ``.off``.
        vertices: ``(V, 3)`` float vertices.
        faces: ``(F, 3)`` int faces.
        uv: optional UV layout (used by OBJ).
        vertex_colors: optional ``(V, 3|4) uint8`` colours (PLY/GLB).

    Returns:
        The written path.
    """
    path = os.fspath(path)
    v = to_numpy(vertices).astype(np.float64)
    f = to_numpy(faces).astype(np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise InputError(f"save_mesh: vertices has shape {v.shape}, expected (V, 3)")
    if f.ndim != 2 or f.shape[1] != 3 or (f.size and (f.min() < 0 or f.max() >= len(v))):
        raise InputError(f"save_mesh: faces has shape {f.shape} or indices outside 0..{len(v) - 1}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".obj" and uv is not None:
        from .flame_io import write_obj_with_uv

        return write_obj_with_uv(path, v, uv.vt, f, uv.ft)
    import trimesh

    colors = None if vertex_colors is None else np.asarray(vertex_colors)
    mesh = trimesh.Trimesh(vertices=v, faces=f, vertex_colors=colors, process=False)
    if ext == ".obj":
        text = mesh.export(file_type="obj")
        data = text.encode() if isinstance(text, str) else bytes(text)
    elif ext in _TRIMESH_TYPES:
        buf = io.BytesIO()
        mesh.export(buf, file_type=_TRIMESH_TYPES[ext])
        data = buf.getvalue()
    else:
        raise InputError(f"save_mesh: unsupported suffix {ext!r} in {path!r}; use .obj, .ply, .glb, .stl or .off")
    return atomic_write_bytes(path, data)
