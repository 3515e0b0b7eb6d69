"""Mesh files: OBJ with texture coordinates (read and write), and PLY/GLB/STL through trimesh.

OBJ files with UVs are read and written here by hand (:func:`read_obj_with_uv`,
:func:`write_obj_with_uv`: ``f v/vt`` with separate vertex and texture indices) because
trimesh splits vertices at UV seams, which would renumber FLAME's 5023 vertices;
everything else goes through trimesh. All writes are atomic.
"""

from __future__ import annotations

import io
import os
from os import PathLike
from typing import Any, Protocol

import numpy as np

from .atomic_io import atomic_write, atomic_write_bytes
from .errors import InputError, ModelFileError
from .xp import to_numpy

__all__ = ["TextureLayout", "read_obj_with_uv", "save_mesh", "write_obj_with_uv"]

_TRIMESH_TYPES = {".ply": "ply", ".glb": "glb", ".stl": "stl", ".off": "off"}


class TextureLayout(Protocol):
    """What :func:`save_mesh` needs of a UV layout (e.g. :class:`~p3dmm.fitting.FlameUV`)."""

    @property
    def vt(self) -> np.ndarray:
        """``(T, 2)`` texture coordinates."""

    @property
    def ft(self) -> np.ndarray:
        """``(F, 3)`` per-face texture indices."""


def save_mesh(
    path: str | PathLike[str],
    vertices: Any,
    faces: Any,
    uv: TextureLayout | None = None,
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



def read_obj_with_uv(path: str | PathLike[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Parse a triangle OBJ with texture coordinates, keeping its vertex order.

    The file is parsed by hand rather than with trimesh: trimesh splits every vertex
    that sits on a UV seam into one copy per texture coordinate (and may merge or drop
    vertices), which renumbers the mesh and would break the correspondence between the
    OBJ's ``v`` lines and FLAME's vertex order. Here ``v`` and ``vt`` are kept as two
    separate lists, exactly as the file has them.

    Args:
        path: OBJ file with ``v``, ``vt`` and ``f a/ta b/tb c/tc`` (``a/ta/na`` is fine).

    Returns:
        ``v (N, 3) float64``, ``vt (T, 2) float64``, ``f (F, 3) int64`` and
        ``ft (F, 3) int64``, indices zero-based.

    Raises:
        ModelFileError: missing file, a malformed line, a non-triangle face, a face
            without texture indices, or an index out of range (message names the line).
    """
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except FileNotFoundError as e:
        raise ModelFileError(f"{source}: UV template OBJ file not found") from e
    except OSError as e:
        raise ModelFileError(f"{source}: cannot read UV template OBJ ({e.strerror or e})") from e
    v: list[list[float]] = []
    vt: list[list[float]] = []
    f: list[list[int]] = []
    ft: list[list[int]] = []
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        tag = parts[0]
        try:
            if tag == "v":
                v.append([float(x) for x in parts[1:4]])
                if len(v[-1]) != 3:
                    raise ValueError("a vertex needs x y z")
            elif tag == "vt":
                vt.append([float(x) for x in parts[1:3]])
                if len(vt[-1]) != 2:
                    raise ValueError("a texture coordinate needs u v")
            elif tag == "f":
                corners = parts[1:]
                if len(corners) != 3:
                    raise ValueError(f"face has {len(corners)} corners, expected a triangle 'f a/ta b/tb c/tc'")
                fv, fu = [], []
                for corner in corners:
                    fields = corner.split("/")
                    if len(fields) < 2 or not fields[1]:
                        raise ValueError(f"corner {corner!r} has no texture index, expected 'a/ta'")
                    a, ta = int(fields[0]), int(fields[1])
                    # OBJ indices are 1-based; negative ones count back from the current end
                    fv.append(a - 1 if a > 0 else len(v) + a)
                    fu.append(ta - 1 if ta > 0 else len(vt) + ta)
                f.append(fv)
                ft.append(fu)
        except ValueError as e:
            raise ModelFileError(f"{source}: line {lineno} ({line.strip()[:60]!r}) is malformed: {e}") from e
    v_arr = np.asarray(v, dtype=np.float64).reshape(-1, 3)
    vt_arr = np.asarray(vt, dtype=np.float64).reshape(-1, 2)
    f_arr = np.asarray(f, dtype=np.int64).reshape(-1, 3)
    ft_arr = np.asarray(ft, dtype=np.int64).reshape(-1, 3)
    for name, idx, n in (("f", f_arr, len(v_arr)), ("ft", ft_arr, len(vt_arr))):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ModelFileError(f"{source}: face indices '{name}' fall outside 1..{n}")
    return v_arr, vt_arr, f_arr, ft_arr


def write_obj_with_uv(
    path: str | PathLike[str], v: np.ndarray, vt: np.ndarray, f: np.ndarray, ft: np.ndarray
) -> str:
    """Write a triangle OBJ with texture coordinates (``f a/ta b/tb c/tc``), atomically.

    Args:
        path: output ``.obj``.
        v: ``(N, 3)`` vertices.
        vt: ``(T, 2)`` texture coordinates.
        f: ``(F, 3)`` zero-based vertex indices.
        ft: ``(F, 3)`` zero-based texture indices.

    Returns:
        The path written.
    """
    path = os.fspath(path)
    v = np.asarray(to_numpy(v), dtype=np.float64).reshape(-1, 3)
    vt = np.asarray(to_numpy(vt), dtype=np.float64).reshape(-1, 2)
    f = np.asarray(to_numpy(f), dtype=np.int64).reshape(-1, 3)
    ft = np.asarray(to_numpy(ft), dtype=np.int64).reshape(-1, 3)
    if f.shape != ft.shape:
        raise InputError(f"write_obj_with_uv: f has shape {f.shape} but ft has {ft.shape}; expected equal (F, 3)")
    buf = io.StringIO()
    # %.9g round-trips float32 values exactly
    np.savetxt(buf, v, fmt="v %.9g %.9g %.9g")
    np.savetxt(buf, vt, fmt="vt %.9g %.9g")
    corners = np.stack([f + 1, ft + 1], axis=2).reshape(-1, 6)  # a ta b tb c tc, 1-based
    np.savetxt(buf, corners, fmt="f %d/%d %d/%d %d/%d")
    text = buf.getvalue().encode("utf-8")
    atomic_write(path, lambda fh: fh.write(text))
    return path
