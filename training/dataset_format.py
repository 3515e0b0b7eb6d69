"""On-disk format of rendered Pixel3DMM training data (normals, UV, masks, RGB).

A dataset is a directory::

    DATASET/
      manifest.json           what the dataset is, and which samples are complete
      <id>/rgb.png            8-bit RGB image (or rgb.jpg)
      <id>/normals.png        16-bit RGB PNG: normal n in [-1, 1] stored as round((n + 1) / 2 * 65535)
      <id>/uv.png             16-bit RGB PNG: R = u, G = v stored as round(uv * 65535), B = 0
      <id>/mask.png           8-bit grayscale PNG: 255 on the face region, 0 elsewhere
      <id>/regions.png        16-bit grayscale PNG: bit k set where region ``regions[k]`` is
      <id>/sample.json        parameters, camera and appearance of the sample (written last)

``manifest.json``::

    {"format": "p3dmm-maps", "format_version": 1,
     "model": "<FlameModel.name>", "n_vertices": 5023,
     "image_size": 512, "normal_space": "camera" | "head",
     "uv_layout": "<uv layout id, see uv_layout_id()>",
     "regions": ["coverage", "face", ...],        # bit order of regions.png
     "count": N, "ids": ["000000", ...],          # the complete samples, sorted
     "generator": {"name": "synth" | "render-dataset" | ..., "seed": S, ...}}

``<id>/sample.json``::

    {"id": "000000", "format_version": 1,
     "files": {"rgb": "rgb.png", "normals": "normals.png", "uv": "uv.png",
               "mask": "mask.png", "regions": "regions.png"},
     "image_size": [H, W], "normal_space": "camera", "regions": [...],
     "params": FlameParams.to_dict() or null (meshes have none),
     "camera": Camera.to_dict(),
     "appearance": Appearance.to_dict() or null, "seed": [S, index] or null,
     "source": {...} (e.g. the mesh file and view of render-dataset)}

Conventions:

* Pixels follow :mod:`p3dmm.fitting.base.camera` (row i, column j, OpenCV). Normals are in
  the space named by ``normal_space`` (camera: OpenCV axes, a visible surface has
  n_z < 0; head: FLAME axes with the global head rotation undone). UV uses the OBJ
  convention of the model's layout (v up), in [0, 1].
* Background pixels (``coverage`` false) store normal 0 (32768) and uv 0.
* The normal encoder picks, among the 8 neighbouring 16-bit codes, the one whose
  decoded and renormalised direction is nearest, so a decoded normal is within 1.6e-5
  (per component) of the rendered one; uv is within 0.5 / 65535 = 7.7e-6.
* ``coverage`` is bit 0 of regions.png; ``mask.png`` is the ``face`` region.
* Pillow cannot hold 16-bit RGB images, so the 16-bit PNGs are written and read with
  pypng (standard PNGs: any PNG library reads them); the reader accepts 16-bit
  grayscale / RGB PNGs of any filter type.
* Every file is written to a temporary name and renamed (``os.replace``); a sample is
  complete when its ``sample.json`` exists and names files that exist. The manifest is
  rewritten atomically under a lock; it is the list of complete samples.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from contextlib import contextmanager
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from p3dmm.fitting import FlameParams
from p3dmm.fitting.base.atomic_io import atomic_write_bytes
from p3dmm.fitting.base.camera import Camera
from p3dmm.fitting.base.errors import InputError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "DatasetReader",
    "add_to_manifest",
    "create_dataset",
    "decode_normals",
    "decode_png16",
    "decode_uv",
    "encode_normals",
    "encode_png16",
    "encode_uv",
    "read_manifest",
    "read_png16",
    "sample_complete",
    "uv_layout_id",
    "write_png16",
    "write_sample",
]

FORMAT_NAME = "p3dmm-maps"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SAMPLE_JSON = "sample.json"
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_U16 = 65535.0


# ------------------------------------------------------------------------ atomic IO
def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: missing; expected the {what}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e}); expected the {what}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e}); expected the {what}") from e
    if not isinstance(obj, dict):
        raise InputError(f"{path}: holds a JSON {type(obj).__name__}, expected an object (the {what})")
    return obj


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root/.manifest.lock`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(root / ".manifest.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------- 16-bit PNG
# Pillow cannot hold 16-bit RGB images; pypng (pure Python, zlib-backed) reads and
# writes them and every filter type (measured: 512x512x3 uint16 written in 0.07 s, read
# in 0.05 s).
def encode_png16(arr: np.ndarray) -> bytes:
    """Encode a 16-bit grayscale ``(H, W)`` or RGB ``(H, W, 3)`` uint16 image as PNG bytes."""
    import png

    a = np.asarray(arr)
    if a.dtype != np.uint16 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] != 3) or 0 in a.shape:
        raise InputError(f"encode_png16: got {a.dtype} {a.shape}, expected uint16 (H, W) or (H, W, 3)")
    H, W = a.shape[:2]
    buf = io.BytesIO()
    png.Writer(W, H, bitdepth=16, greyscale=a.ndim == 2, compression=6).write(buf, a.reshape(H, -1))
    return buf.getvalue()


def write_png16(path: str | PathLike[str], arr: np.ndarray) -> None:
    """Atomically write a 16-bit grayscale or RGB PNG (see :func:`encode_png16`)."""
    atomic_write_bytes(Path(path), encode_png16(arr))


def decode_png16(data: bytes, path: str | PathLike[str] = "<bytes>") -> np.ndarray:
    """Decode a 16-bit grayscale or RGB PNG to ``(H, W)`` / ``(H, W, 3)`` uint16.

    Raises:
        InputError: not a PNG, corrupted (CRC, zlib, truncation), or not a 16-bit
            grayscale / RGB PNG; the message names ``path``.
    """
    import png

    path = Path(path)
    try:
        W, H, rows, info = png.Reader(bytes=data).read()
        px = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows])
    except (png.ChunkError, zlib.error, EOFError, ValueError) as e:
        raise InputError(f"{path}: corrupted or truncated PNG ({e})") from e
    except png.FormatError as e:
        raise InputError(f"{path}: not a valid PNG ({e}); expected a 16-bit PNG") from e
    planes = info.get("planes")
    if info.get("bitdepth") != 16 or info.get("alpha") or planes not in (1, 3) or info.get("palette"):
        raise InputError(
            f"{path}: PNG with bit depth {info.get('bitdepth')}, {planes} planes, alpha {info.get('alpha')}; "
            "expected a 16-bit grayscale or RGB PNG"
        )
    if px.shape != (H, W * planes):
        raise InputError(f"{path}: truncated image data ({px.shape[0]} of {H} rows)")
    return px.reshape(H, W) if planes == 1 else px.reshape(H, W, 3)


def read_png16(path: str | PathLike[str]) -> np.ndarray:
    """Read a 16-bit grayscale / RGB PNG file (see :func:`decode_png16`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: missing; expected a 16-bit PNG") from None
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e})") from e
    return decode_png16(data, path)


# ------------------------------------------------------------------ value encodings
def encode_normals(normals: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` normals in [-1, 1] -> uint16 codes ``round((n + 1) / 2 * 65535)``.

    Per pixel the code is the one among the 8 floor/ceil combinations whose decoded,
    renormalised direction is nearest (max-abs) to ``n``; zero vectors (background)
    stay at the plain rounding.
    """
    n = np.asarray(normals, dtype=np.float64)
    if n.ndim != 3 or n.shape[2] != 3:
        raise InputError(f"encode_normals: normals have shape {n.shape}, expected (H, W, 3)")
    x = (np.clip(n, -1.0, 1.0) + 1.0) * 0.5 * _U16
    best = np.clip(np.rint(x), 0, _U16)
    unit = np.linalg.norm(n, axis=2) > 0.5
    if unit.any():
        xs, ns = x[unit], n[unit]
        lo = np.floor(xs)
        best_u = np.zeros_like(xs)
        best_err = np.full(len(xs), np.inf)
        for c in range(8):
            q = np.clip(lo + np.array([c & 1, (c >> 1) & 1, (c >> 2) & 1]), 0, _U16)
            d = q / _U16 * 2.0 - 1.0
            d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
            err = np.abs(d - ns).max(axis=1)
            better = err < best_err
            best_u = np.where(better[:, None], q, best_u)
            best_err = np.minimum(err, best_err)
        best[unit] = best_u
    return best.astype(np.uint16)


def decode_normals(codes: np.ndarray, coverage: np.ndarray | None = None) -> np.ndarray:
    """uint16 codes ``(H, W, 3)`` -> float32 unit normals (0 outside ``coverage``)."""
    n = codes.astype(np.float64) / _U16 * 2.0 - 1.0
    norm = np.linalg.norm(n, axis=2, keepdims=True)
    valid = norm[..., 0] > 0.5 if coverage is None else coverage
    out = np.where(valid[..., None], n / np.maximum(norm, 1e-12), 0.0)
    return out.astype(np.float32)


def encode_uv(uv: np.ndarray) -> np.ndarray:
    """``(H, W, 2)`` uv in [0, 1] -> ``(H, W, 3)`` uint16 (R = u, G = v, B = 0)."""
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim != 3 or uv.shape[2] != 2:
        raise InputError(f"encode_uv: uv has shape {uv.shape}, expected (H, W, 2)")
    q = np.zeros(uv.shape[:2] + (3,), dtype=np.uint16)
    q[..., :2] = np.rint(np.clip(uv, 0.0, 1.0) * _U16).astype(np.uint16)
    return q


def decode_uv(codes: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint16 -> ``(H, W, 2)`` float32 uv in [0, 1]."""
    return (codes[..., :2].astype(np.float64) / _U16).astype(np.float32)


def uv_layout_id(uv: Any) -> str:
    """Stable id of a UV layout: ``"uv-"`` + 16 hex digits of sha256(vt float32, ft int64).

    Args:
        uv: a :class:`p3dmm.fitting.FlameUV` (or None -> ``"none"``).
    """
    if uv is None:
        return "none"
    return uv.layout_id()


# ------------------------------------------------------------------------ manifest
def _check_id(sample_id: str) -> str:
    if not isinstance(sample_id, str) or not _ID_RE.match(sample_id):
        raise InputError(
            f"sample id {sample_id!r}: expected 1-128 characters of letters, digits, '_', '.', '-' "
            "(not starting with '.', '_' or '-')"
        )
    return sample_id


def read_manifest(root: str | PathLike[str]) -> dict[str, Any]:
    """Read and validate ``root/manifest.json``.

    Raises:
        InputError: missing, not JSON, another format, a newer version, or fields of the
            wrong type; the message names the file.
    """
    path = Path(root) / MANIFEST
    m = _read_json(path, f"{FORMAT_NAME} dataset manifest")
    if m.get("format") != FORMAT_NAME:
        raise InputError(f"{path}: format is {m.get('format')!r}, expected {FORMAT_NAME!r}")
    v = m.get("format_version")
    if not isinstance(v, int) or v < 1 or v > FORMAT_VERSION:
        raise InputError(f"{path}: format_version {v!r}, expected an integer 1..{FORMAT_VERSION}")
    for key, typ in (("ids", list), ("regions", list), ("image_size", int), ("normal_space", str)):
        if not isinstance(m.get(key), typ):
            raise InputError(f"{path}: field {key!r} is {m.get(key)!r}, expected a {typ.__name__}")
    if m["normal_space"] not in ("camera", "head"):
        raise InputError(f"{path}: normal_space {m['normal_space']!r}, expected 'camera' or 'head'")
    return m


def create_dataset(
    root: str | PathLike[str],
    *,
    model_name: str,
    n_vertices: int,
    image_size: int,
    normal_space: str,
    uv_layout: str,
    regions: Sequence[str],
    generator: Mapping[str, Any],
) -> dict[str, Any]:
    """Create ``root`` with an empty manifest, or check an existing one matches.

    Args:
        root: dataset directory (created if needed).
        model_name: the FLAME model the data was rendered with.
        n_vertices: its vertex count.
        image_size: side of the square images.
        normal_space: ``"camera"`` or ``"head"``.
        uv_layout: :func:`uv_layout_id` of the model's UV layout.
        regions: bit order of ``regions.png``; ``"coverage"`` first. At most 16.
        generator: how the data was made (name, seed, config); must match on resume.

    Returns:
        The manifest dict.

    Raises:
        InputError: ``root`` holds a dataset with different settings, or bad arguments.
    """
    root = Path(root)
    if normal_space not in ("camera", "head"):
        raise InputError(f"create_dataset: normal_space={normal_space!r}, expected 'camera' or 'head'")
    regions = list(regions)
    if len(regions) > 16 or not regions or regions[0] != "coverage":
        raise InputError(f"create_dataset: regions {regions}, expected 1..16 names starting with 'coverage'")
    want = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model": str(model_name),
        "n_vertices": int(n_vertices),
        "image_size": int(image_size),
        "normal_space": normal_space,
        "uv_layout": str(uv_layout),
        "regions": regions,
        "generator": json.loads(json.dumps(dict(generator))),
    }
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        if (root / MANIFEST).exists():
            have = read_manifest(root)
            diff = [k for k, v in want.items() if have.get(k) != v]
            if diff:
                raise InputError(
                    f"{root / MANIFEST}: existing dataset differs in {diff} "
                    f"(have {[have.get(k) for k in diff]}, requested {[want[k] for k in diff]}); "
                    "use another --out directory"
                )
            return have
        m = dict(want, count=0, ids=[])
        _atomic_write_json(root / MANIFEST, m)
        return m


def add_to_manifest(root: str | PathLike[str], ids: Sequence[str]) -> dict[str, Any]:
    """Add complete sample ids to the manifest (atomic rewrite under a lock).

    Returns:
        The updated manifest.
    """
    root = Path(root)
    with _locked(root):
        m = read_manifest(root)
        all_ids = sorted(set(m["ids"]) | {_check_id(i) for i in ids})
        m["ids"], m["count"] = all_ids, len(all_ids)
        _atomic_write_json(root / MANIFEST, m)
    return m


# -------------------------------------------------------------------------- samples
_FILES = {"normals": "normals.png", "uv": "uv.png", "mask": "mask.png", "regions": "regions.png"}


def sample_complete(root: str | PathLike[str], sample_id: str) -> bool:
    """True when ``<id>/sample.json`` parses and every file it names exists and is non-empty."""
    d = Path(root) / sample_id
    try:
        meta = json.loads((d / SAMPLE_JSON).read_text(encoding="utf-8"))
        files = meta["files"]
        return all((d / name).is_file() and (d / name).stat().st_size > 0 for name in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _png8_bytes(arr: np.ndarray, fmt: str = "PNG", quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "JPEG":
        img.save(buf, format="JPEG", quality=quality)
    else:
        img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def write_sample(
    root: str | PathLike[str],
    sample_id: str,
    maps: Any,
    *,
    region_names: Sequence[str],
    params: FlameParams | None = None,
    extra: Mapping[str, Any] | None = None,
    rgb_format: str = "png",
    update_manifest: bool = True,
) -> Path:
    """Write one sample; ``sample.json`` last, so a sample on disk is complete or redone.

    Args:
        root: dataset directory (see :func:`create_dataset`).
        sample_id: directory name of the sample.
        maps: a :class:`p3dmm.fitting.RenderedMaps` (``rgb`` required).
        region_names: bit order of ``regions.png``, ``"coverage"`` first (the
            manifest's ``regions``); names the maps lack are written as empty.
        params: FLAME parameters, or None (meshes without parameters).
        extra: more JSON fields for ``sample.json`` (``seed``, ``source``, ...).
        rgb_format: ``"png"`` or ``"jpg"``.
        update_manifest: add the id to the manifest. Parallel writers pass False and
            let one process call :func:`add_to_manifest`.

    Returns:
        The sample directory.

    Raises:
        InputError: bad id, maps of the wrong shape or without rgb, bad format.
    """
    _check_id(sample_id)
    if rgb_format not in ("png", "jpg"):
        raise InputError(f"write_sample: rgb_format={rgb_format!r}, expected 'png' or 'jpg'")
    H, W = maps.coverage.shape
    if maps.rgb is None or maps.rgb.shape != (H, W, 3) or maps.rgb.dtype != np.uint8:
        got = None if maps.rgb is None else (maps.rgb.dtype, maps.rgb.shape)
        raise InputError(f"write_sample {sample_id}: maps.rgb is {got}, expected uint8 ({H}, {W}, 3)")
    names = list(region_names)
    if len(names) > 16 or not names or names[0] != "coverage":
        raise InputError(f"write_sample: region_names {names}, expected 1..16 names starting with 'coverage'")
    d = Path(root) / sample_id
    d.mkdir(parents=True, exist_ok=True)
    try:
        (d / SAMPLE_JSON).unlink()  # an incomplete sample until the new sample.json lands
    except FileNotFoundError:
        pass
    files = dict(_FILES, rgb=f"rgb.{rgb_format}")
    if rgb_format == "png":
        atomic_write_bytes(d / files["rgb"], _png8_bytes(maps.rgb))
    else:
        atomic_write_bytes(d / files["rgb"], _png8_bytes(maps.rgb, "JPEG", 95))
    for stale in ("rgb.png", "rgb.jpg"):
        if stale != files["rgb"] and (d / stale).exists():
            (d / stale).unlink()
    write_png16(d / files["normals"], encode_normals(np.where(maps.coverage[..., None], maps.normals, 0.0)))
    write_png16(d / files["uv"], encode_uv(np.where(maps.coverage[..., None], maps.uv, 0.0)))
    atomic_write_bytes(d / files["mask"], _png8_bytes(maps.mask.astype(np.uint8) * 255))
    bits = np.zeros((H, W), dtype=np.uint16)
    for k, name in enumerate(names):
        m = maps.coverage if name == "coverage" else maps.regions.get(name)
        if m is not None:
            bits |= m.astype(np.uint16) << np.uint16(k)
    write_png16(d / files["regions"], bits)
    meta = {
        "id": sample_id,
        "format_version": FORMAT_VERSION,
        "files": files,
        "image_size": [int(H), int(W)],
        "normal_space": maps.normal_space,
        "regions": names,
        "params": params.to_dict() if params is not None else None,
        "camera": maps.camera.to_dict(),
        "appearance": maps.appearance.to_dict() if getattr(maps, "appearance", None) is not None else None,
    }
    meta.update(dict(extra or {}))
    _atomic_write_json(d / SAMPLE_JSON, meta)
    if update_manifest:
        add_to_manifest(root, [sample_id])
    return d


# --------------------------------------------------------------------------- reader
class DatasetReader:
    """Random access to a dataset written by :func:`write_sample`.

    ``reader[i]`` (or ``reader["<id>"]``) returns a dict:

    * ``id``: str; ``rgb``: ``(H, W, 3) uint8``;
    * ``normals``: ``(H, W, 3) float32`` unit on ``coverage``, 0 elsewhere;
    * ``uv``: ``(H, W, 2) float32`` in [0, 1]; ``mask``, ``coverage``: ``(H, W) bool``;
    * ``regions``: name -> ``(H, W) bool``; ``normal_space``: str;
    * ``params``: :class:`FlameParams` or None; ``camera``: :class:`Camera`;
    * ``meta``: the parsed ``sample.json``.

    Args:
        root: the dataset directory.

    Raises:
        InputError: (on construction) no valid manifest; (on access) a missing,
            corrupted or mis-shaped file, named in the message.
    """

    def __init__(self, root: str | PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: not a directory, expected a {FORMAT_NAME} dataset")
        self.manifest = read_manifest(self.root)
        self.ids: list[str] = [_check_id(i) for i in self.manifest["ids"]]

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        if isinstance(key, (int, np.integer)):
            if not -len(self) <= key < len(self):
                raise IndexError(f"sample index {key} out of range for {len(self)} samples in {self.root}")
            sid = self.ids[int(key)]
        else:
            sid = _check_id(key)
        return self._read(sid)

    def _read(self, sid: str) -> dict[str, Any]:
        from PIL import Image, UnidentifiedImageError

        d = self.root / sid
        meta = _read_json(d / SAMPLE_JSON, f"sample description of {sid!r}")
        try:
            files = meta["files"]
            H, W = (int(v) for v in meta["image_size"])
            names = list(meta["regions"])
            normal_space = meta["normal_space"]
            camera = Camera.from_dict(meta["camera"])
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(
                f"{d / SAMPLE_JSON}: bad or missing field ({e}); expected files, image_size, regions, "
                "normal_space, camera"
            ) from e
        size = self.manifest["image_size"]
        if (H, W) != (size, size):
            raise InputError(f"{d / SAMPLE_JSON}: image_size {[H, W]}, expected [{size}, {size}] from the manifest")
        params = FlameParams.from_dict(meta["params"]) if meta.get("params") is not None else None

        def img8(name: str, mode: str) -> np.ndarray:
            path = d / files[name]
            try:
                with Image.open(path) as im:
                    im.load()
                    if im.mode != mode:
                        raise InputError(f"{path}: image mode {im.mode}, expected 8-bit {mode}")
                    a = np.asarray(im)
            except FileNotFoundError:
                raise InputError(f"{path}: missing; expected an 8-bit {mode} image") from None
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise InputError(f"{path}: cannot be decoded ({e}); expected an 8-bit {mode} image") from e
            if a.shape[:2] != (H, W):
                raise InputError(f"{path}: size {a.shape[1]}x{a.shape[0]}, expected {W}x{H}")
            return a

        def img16(name: str, channels: int) -> np.ndarray:
            path = d / files[name]
            a = read_png16(path)
            want = (H, W, 3) if channels == 3 else (H, W)
            if a.shape != want:
                kind = "RGB" if channels == 3 else "grayscale"
                raise InputError(f"{path}: 16-bit image of shape {a.shape}, expected 16-bit {kind} {want}")
            return a

        rgb = img8("rgb", "RGB")
        mask = img8("mask", "L") > 127
        bits = img16("regions", 1)
        regions = {n: (bits >> np.uint16(k)) & 1 == 1 for k, n in enumerate(names)}
        coverage = regions.pop("coverage", None)
        if coverage is None:
            raise InputError(f"{d / SAMPLE_JSON}: regions {names} lack 'coverage', expected it first")
        normals = decode_normals(img16("normals", 3), coverage)
        uv = decode_uv(img16("uv", 3))
        uv[~coverage] = 0.0
        return {
            "id": sid,
            "rgb": rgb,
            "normals": normals,
            "uv": uv,
            "mask": mask,
            "coverage": coverage,
            "regions": regions,
            "normal_space": normal_space,
            "params": params,
            "camera": camera,
            "meta": meta,
        }
