"""Synthetic Pixel3DMM training data: random FLAME heads, cameras and photo-like renders.

* :func:`synthesize` draws ``n`` samples. Sample ``i`` depends only on ``(seed, i)``:
  its generator is ``np.random.default_rng([seed, i])``, which draws the FLAME
  parameters (:func:`sample_flame_params`), then the camera (:func:`sample_camera`),
  then the appearance of the RGB image. Output bytes are therefore the same for any
  number of workers and across interrupted-and-resumed runs.
* :func:`render_dataset` renders the same supervision from user meshes in FLAME
  topology (OBJ / PLY with the model's vertex count, in the model's vertex order), from
  several random views each, optionally textured with an image in the model's UV layout.

Both write the format of :mod:`p3dmm.training.dataset_format`, skip samples that are
already complete (a half-written sample is redone), run samples in a spawn-safe
process pool, report a bad item with ``logging.warning`` and go on.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import re
import time
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from p3dmm.fitting import FlameModel, FlameParams
from p3dmm.fitting.base.camera import FLAME_TO_OPENCV, Camera
from p3dmm.fitting.base.errors import InputError, P3DMMError
from p3dmm.fitting.base.xp import to_numpy
from p3dmm.fitting.model.params import POSE_SHAPE
from p3dmm.fitting.render.maps import render_maps, render_mesh_maps

from .dataset_format import (
    add_to_manifest,
    create_dataset,
    sample_complete,
    uv_layout_id,
    write_sample,
)

__all__ = [
    "BatchResult",
    "SynthConfig",
    "load_flame_mesh",
    "render_dataset",
    "rotation_from_euler",
    "sample_camera",
    "sample_flame_params",
    "synthesize",
]

log = logging.getLogger("p3dmm.synth")

MESH_SUFFIXES = (".obj", ".ply")
TEXTURE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class SynthConfig:
    """Distributions of the synthetic data (one source of truth; stored in the manifest).

    Attributes:
        size: side of the square images in pixels.
        normal_space: ``"camera"`` or ``"head"``.
        n_identity: identity components drawn from N(0, 1) (the rest are 0).
        n_expression: expression components drawn (the rest are 0).
        expr_scale: range of the per-sample expression standard deviation (moderate to
            extreme); components past the 20th get half of it.
        expr_clip: expression coefficients are clipped to +-this.
        jaw_open_rad: range of the jaw opening (rotation about x).
        yaw_deg: range of the global head yaw.
        pitch_sd_deg, pitch_max_deg: global pitch ~ N(0, sd) clipped.
        roll_sd_deg, roll_max_deg: global roll ~ N(0, sd) clipped.
        neck_sd_rad: neck rotation per axis ~ N(0, sd).
        gaze_sd_rad: common eye rotation (yaw, pitch) ~ N(0, sd).
        focal_range: focal length as a multiple of the image side.
        fill_range: face-region bounding-box side as a fraction of the image side.
        center_jitter: face-centre offset from the image centre, fraction of the side.
        principal_jitter: principal-point offset standard deviation, fraction of the side.
        rgb_format: ``"png"`` or ``"jpg"``.
    """

    size: int = 512
    normal_space: str = "camera"
    n_identity: int = 100
    n_expression: int = 50
    expr_scale: tuple[float, float] = (0.4, 1.6)
    expr_clip: float = 3.5
    jaw_open_rad: tuple[float, float] = (0.0, 0.5)
    yaw_deg: tuple[float, float] = (-60.0, 60.0)
    pitch_sd_deg: float = 12.0
    pitch_max_deg: float = 30.0
    roll_sd_deg: float = 7.0
    roll_max_deg: float = 20.0
    neck_sd_rad: float = 0.08
    gaze_sd_rad: float = 0.15
    focal_range: tuple[float, float] = (1.5, 6.0)
    fill_range: tuple[float, float] = (0.45, 0.7)
    center_jitter: float = 0.04
    principal_jitter: float = 0.01
    rgb_format: str = "png"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 8:
            raise InputError(f"SynthConfig.size={self.size!r}, expected an integer >= 8")
        if self.normal_space not in ("camera", "head"):
            raise InputError(f"SynthConfig.normal_space={self.normal_space!r}, expected 'camera' or 'head'")
        if self.rgb_format not in ("png", "jpg"):
            raise InputError(f"SynthConfig.rgb_format={self.rgb_format!r}, expected 'png' or 'jpg'")

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class BatchResult:
    """Outcome of :func:`synthesize` / :func:`render_dataset`.

    Attributes:
        root: the dataset directory.
        written: samples rendered by this run.
        skipped: samples that were already complete.
        failed: ``(item, message)`` for every item that could not be rendered.
        seconds: wall time.
    """

    root: Path
    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------- random draws
def rotation_from_euler(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """``(3, 3)`` rotation ``Ry(yaw) @ Rx(pitch) @ Rz(roll)`` in FLAME's frame (radians).

    Yaw turns the head about its vertical (y) axis, pitch nods about x, roll tilts
    about the viewing (z) axis.
    """
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Ry @ Rx @ Rz


def _axis_angle(R: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(R).as_rotvec()


def sample_flame_params(rng: np.random.Generator, model: FlameModel, cfg: SynthConfig = SynthConfig()) -> FlameParams:
    """Random FLAME parameters: identity, expression, jaw, neck, eyes and head pose.

    Args:
        rng: generator (consumed in a fixed order).
        model: gives ``n_shape`` / ``n_expr``.
        cfg: the distributions.

    Returns:
        Host float32 :class:`FlameParams` with zero translation.
    """
    shape = np.zeros(model.n_shape)
    k = min(cfg.n_identity, model.n_shape)
    shape[:k] = rng.normal(0.0, 1.0, k)
    expr = np.zeros(model.n_expr)
    k = min(cfg.n_expression, model.n_expr)
    s = rng.uniform(*cfg.expr_scale)
    sd = np.where(np.arange(k) < 20, s, 0.5 * s)
    expr[:k] = np.clip(rng.normal(0.0, 1.0, k) * sd, -cfg.expr_clip, cfg.expr_clip)
    pose = np.zeros(POSE_SHAPE)
    yaw = np.radians(rng.uniform(*cfg.yaw_deg))
    pitch = np.radians(np.clip(rng.normal(0, cfg.pitch_sd_deg), -cfg.pitch_max_deg, cfg.pitch_max_deg))
    roll = np.radians(np.clip(rng.normal(0, cfg.roll_sd_deg), -cfg.roll_max_deg, cfg.roll_max_deg))
    pose[0] = _axis_angle(rotation_from_euler(yaw, pitch, roll))
    pose[1] = rng.normal(0, cfg.neck_sd_rad, 3)
    pose[2] = [rng.uniform(*cfg.jaw_open_rad), rng.normal(0, 0.02), rng.normal(0, 0.02)]
    gaze = rng.normal(0, cfg.gaze_sd_rad, 2)
    verge = rng.uniform(0.0, 0.05)
    pose[3] = [gaze[1], gaze[0] - verge, 0.0]  # left eye (subject's +x side) turns inward
    pose[4] = [gaze[1], gaze[0] + verge, 0.0]
    return FlameParams(
        shape=shape.astype(np.float32),
        expr=expr.astype(np.float32),
        pose=pose.astype(np.float32),
        transl=np.zeros(3, dtype=np.float32),
    )


def sample_camera(
    rng: np.random.Generator,
    size: int,
    vertices: np.ndarray,
    face_vertices: np.ndarray | None = None,
    focal_range: tuple[float, float] = (1.5, 6.0),
    fill_range: tuple[float, float] = (0.45, 0.7),
    center_jitter: float = 0.04,
    principal_jitter: float = 0.01,
) -> Camera:
    """A frontal camera framing the face like a face-detector crop.

    The rotation is :data:`FLAME_TO_OPENCV` (the fitter's convention: the head's own
    rotation is in the FLAME pose); the camera sits on the FLAME +z side of the face's
    centre at the distance that makes the face's projected bounding box
    ``fill * size`` pixels wide (its larger side), with a small random off-centring and
    principal-point offset.

    Args:
        rng: generator.
        size: image side in pixels.
        vertices: ``(V, 3)`` posed vertices (world = FLAME frame).
        face_vertices: ids of the vertices that define the face box (default: all).
        focal_range: focal length range as a multiple of ``size``.
        fill_range: range of the face box side over ``size``.
        center_jitter: max off-centring of the face box, fraction of ``size``.
        principal_jitter: principal-point offset sd, fraction of ``size``.

    Returns:
        :class:`Camera` of ``size x size`` pixels, float32.
    """
    v = np.asarray(vertices, dtype=np.float64)
    pts = v if face_vertices is None or len(face_vertices) == 0 else v[np.asarray(face_vertices)]
    focal = size * rng.uniform(*focal_range)
    fill = rng.uniform(*fill_range)
    jitter = rng.uniform(-center_jitter, center_jitter, 2) * size
    pp = np.array([(size - 1) / 2, (size - 1) / 2]) + rng.normal(0, principal_jitter * size, 2)
    R = FLAME_TO_OPENCV
    centre = 0.5 * (pts.min(0) + pts.max(0))
    half = 0.5 * float(np.max(pts.max(0)[:2] - pts.min(0)[:2]))
    dist = focal * max(half, 1e-3) / (0.5 * fill * size) + 0.5 * float(np.ptp(pts[:, 2]))
    # image-plane offsets from the principal point, float64 (the returned camera is float32)
    centred = Camera(focal=np.float64(focal), principal=np.zeros(2), R=R, t=np.zeros(3), width=size, height=size)
    for _ in range(3):  # refine the distance with the exact perspective box
        uv = centred.project_camera((pts - centre) @ R.T + np.array([0.0, 0.0, dist]))
        side = float(np.max(uv.max(0) - uv.min(0)))
        dist *= side / (fill * size)
    uv = centred.project_camera((pts - centre) @ R.T + np.array([0.0, 0.0, dist]))
    box_mid = 0.5 * (uv.max(0) + uv.min(0))
    # shift the camera sideways so the box centre lands at the image centre + jitter
    shift = (box_mid - jitter) * dist / focal
    t = -R @ centre + np.array([-shift[0], -shift[1], dist])
    return Camera(
        focal=np.asarray(focal, dtype=np.float32),
        principal=pp.astype(np.float32),
        R=R.astype(np.float32),
        t=t.astype(np.float32),
        width=int(size),
        height=int(size),
    )


# ---------------------------------------------------------------------- mesh input
def load_flame_mesh(path: str | PathLike[str], n_vertices: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a FLAME-topology mesh and its optional texture.

    The mesh is read with trimesh (``process=False``, ``maintain_order=True``), so the
    file's vertex order is kept. The texture is ``<stem>.png`` / ``.jpg`` / ``.jpeg``
    beside the mesh, else the image of its OBJ material, else None.

    Args:
        path: ``.obj`` or ``.ply`` file.
        n_vertices: the vertex count the model expects.

    Returns:
        (vertices ``(V, 3) float64``, texture ``(Ht, Wt, 3) uint8`` or None).

    Raises:
        InputError: unreadable file, no vertices, or a vertex count other than
            ``n_vertices``; the message names the file.
    """
    import trimesh
    from PIL import Image

    path = Path(path)
    try:
        mesh = trimesh.load(str(path), process=False, force="mesh", maintain_order=True)
        verts = np.asarray(mesh.vertices, dtype=np.float64)  # type: ignore[attr-defined]
    except Exception as e:  # noqa: BLE001 - trimesh raises many kinds for a bad file
        raise InputError(f"{path}: cannot be read as a mesh ({type(e).__name__}: {e}); expected an OBJ or PLY") from e
    if verts.ndim != 2 or verts.shape[0] != n_vertices:
        raise InputError(
            f"{path}: {verts.shape[0] if verts.ndim == 2 else 0} vertices, expected {n_vertices} "
            "(FLAME topology, in the model's vertex order)"
        )
    if not np.isfinite(verts).all():
        raise InputError(f"{path}: non-finite vertex coordinates, expected finite positions in metres")
    texture = None
    for suffix in TEXTURE_SUFFIXES:
        cand = path.with_suffix(suffix)
        if cand.is_file():
            try:
                with Image.open(cand) as im:
                    texture = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except OSError as e:
                raise InputError(f"{cand}: texture cannot be decoded ({e}); expected an RGB image") from e
            break
    if texture is None:
        img = getattr(getattr(getattr(mesh, "visual", None), "material", None), "image", None)
        if img is not None:
            texture = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return verts, texture


def _mesh_files(inputs: Iterable[str | PathLike[str]]) -> list[Path]:
    """Expand directories to their sorted OBJ/PLY files; keep files in the given order."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in MESH_SUFFIXES))
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------- worker side
# Per-process state set by _init_worker (spawn-safe: everything arrives by pickling).
_STATE: dict[str, Any] = {}


def _init_worker(state: dict[str, Any]) -> None:
    _STATE.clear()
    _STATE.update(state)
    if _STATE.get("model") is None:
        _STATE["model"] = FlameModel.synthetic(seed=0)


def _synth_one(index: int) -> list[str]:
    """Render and write synthetic sample ``index``; returns the written ids."""
    model: FlameModel = _STATE["model"]
    cfg: SynthConfig = _STATE["cfg"]
    seed: int = _STATE["seed"]
    rng = np.random.default_rng([seed, index])
    params = sample_flame_params(rng, model, cfg)
    params_dev = params.astype(model.xp, model.dtype)
    verts = to_numpy(model.vertices(params_dev)).astype(np.float64)
    camera = sample_camera(
        rng,
        cfg.size,
        verts,
        face_vertices=model.masks.get("face"),
        focal_range=cfg.focal_range,
        fill_range=cfg.fill_range,
        center_jitter=cfg.center_jitter,
        principal_jitter=cfg.principal_jitter,
    )
    maps = render_maps(model, params_dev, camera, normal_space=cfg.normal_space, rng=rng)
    sid = _synth_id(index)
    write_sample(
        _STATE["root"],
        sid,
        maps,
        region_names=_STATE["regions"],
        params=params,
        extra={"seed": [seed, index], "source": {"generator": "synth"}},
        rgb_format=cfg.rgb_format,
        update_manifest=False,
    )
    return [sid]


def _mesh_one(task: tuple[int, str]) -> list[str]:
    """Render the views of one mesh; returns the written ids."""
    m_index, path = task
    model: FlameModel = _STATE["model"]
    cfg: SynthConfig = _STATE["cfg"]
    seed, views = _STATE["seed"], _STATE["views"]
    verts, texture = load_flame_mesh(path, model.n_vertices)
    centre = 0.5 * (verts.min(0) + verts.max(0))
    written = []
    for k in range(views):
        sid = _mesh_id(m_index, path, k)
        if sample_complete(_STATE["root"], sid):
            continue
        rng = np.random.default_rng([seed, m_index, k])
        yaw = np.radians(rng.uniform(*cfg.yaw_deg))
        pitch = np.radians(np.clip(rng.normal(0, cfg.pitch_sd_deg), -cfg.pitch_max_deg, cfg.pitch_max_deg))
        roll = np.radians(np.clip(rng.normal(0, cfg.roll_sd_deg), -cfg.roll_max_deg, cfg.roll_max_deg))
        Q = rotation_from_euler(yaw, pitch, roll)
        v = (verts - centre) @ Q.T + centre
        camera = sample_camera(
            rng,
            cfg.size,
            v,
            face_vertices=model.masks.get("face"),
            focal_range=cfg.focal_range,
            fill_range=cfg.fill_range,
            center_jitter=cfg.center_jitter,
            principal_jitter=cfg.principal_jitter,
        )
        maps = render_mesh_maps(
            model, v, camera, normal_space=cfg.normal_space, head_rotation=Q, rng=rng, albedo_texture=texture
        )
        write_sample(
            _STATE["root"],
            sid,
            maps,
            region_names=_STATE["regions"],
            params=None,
            extra={
                "seed": [seed, m_index, k],
                "source": {
                    "generator": "render-dataset",
                    "mesh": str(path),
                    "view": k,
                    "view_rotation": Q.tolist(),
                    "rotation_centre": centre.tolist(),
                    "textured": texture is not None,
                },
            },
            rgb_format=cfg.rgb_format,
            update_manifest=False,
        )
        written.append(sid)
    return written


def _run_task(task: tuple[str, Any]) -> tuple[str, list[str], str | None]:
    """Pool entry point: never raises; a failure comes back as a message."""
    kind, arg = task
    label = _synth_id(arg) if kind == "synth" else str(arg[1])
    try:
        ids = _synth_one(arg) if kind == "synth" else _mesh_one(arg)
        return label, ids, None
    except P3DMMError as e:
        return label, [], str(e)
    except Exception as e:  # noqa: BLE001 - a batch reports the bad item and goes on
        return label, [], f"{type(e).__name__}: {e}"


def _synth_id(index: int) -> str:
    return f"{index:06d}"


def _mesh_id(m_index: int, path: str | Path, view: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem)[:48] or "mesh"
    return f"{m_index:05d}-{stem}-v{view:02d}"


def _run_batch(
    tasks: list[tuple[str, Any]],
    state: dict[str, Any],
    workers: int,
    result: BatchResult,
    desc: str,
    total: int,
    on_ids: Callable[[list[str]], Any],
) -> None:
    """Run tasks in-process (workers <= 1) or in a spawn pool, with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=total, initial=result.skipped, desc=desc, unit="sample", disable=None)
    pending: list[str] = []
    last = time.monotonic()

    def handle(label: str, ids: list[str], err: str | None) -> None:
        nonlocal last
        if err is not None:
            log.warning("%s: %s: skipped (%s)", desc, label, err)
            result.failed.append((label, err))
        result.written += len(ids)
        pending.extend(ids)
        bar.update(len(ids) if err is None else (1 if kind_is_synth else state.get("views", 1)))
        if pending and (time.monotonic() - last > 2.0 or len(pending) >= 256):
            on_ids(list(pending))
            pending.clear()
            last = time.monotonic()

    kind_is_synth = bool(tasks) and tasks[0][0] == "synth"
    try:
        if workers <= 1 or len(tasks) <= 1:
            _init_worker(state)
            for t in tasks:
                handle(*_run_task(t))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(processes=min(workers, len(tasks)), initializer=_init_worker, initargs=(state,)) as pool:
                for out in pool.imap_unordered(_run_task, tasks):
                    handle(*out)
    finally:
        if pending:
            on_ids(list(pending))
        bar.close()
        _STATE.clear()


def _default_workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(os.cpu_count() or 1, 8))
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers={workers!r}, expected a positive integer")
    return workers


def _region_names(model: FlameModel) -> list[str]:
    names = ["coverage"] + [n for n in model.masks if n != "coverage"]
    if len(names) > 16:
        raise InputError(f"model {model.name!r} has {len(names) - 1} region masks, the format holds at most 15")
    return names


# ---------------------------------------------------------------------- public API
def _open_dataset(
    what: str, out_dir: str | PathLike[str], model: FlameModel | None, cfg: SynthConfig, generator: dict[str, Any]
) -> tuple[FlameModel, Path, list[str]]:
    """The model to render with, and the dataset directory created (or checked) for it."""
    the_model = model if model is not None else FlameModel.synthetic(seed=0)
    if the_model.uv is None:
        raise InputError(f"{what}: model {the_model.name!r} has no UV layout; load it with uv=head_template.obj")
    root = Path(out_dir)
    regions = _region_names(the_model)
    create_dataset(
        root,
        model_name=the_model.name,
        n_vertices=the_model.n_vertices,
        image_size=cfg.size,
        normal_space=cfg.normal_space,
        uv_layout=uv_layout_id(the_model.uv),
        regions=regions,
        generator=generator,
    )
    return the_model, root, regions


def synthesize(
    out_dir: str | PathLike[str],
    n: int,
    seed: int,
    size: int = 512,
    workers: int | None = None,
    model: FlameModel | None = None,
    normal_space: str = "camera",
    config: SynthConfig | None = None,
) -> BatchResult:
    """Generate ``n`` synthetic samples into ``out_dir`` (resumable, deterministic).

    Args:
        out_dir: dataset directory (created; an existing one must have the same model,
            size, normal space and generator settings).
        n: number of samples; ids are ``000000`` .. ``n-1``.
        seed: base seed; sample ``i`` uses ``default_rng([seed, i])``.
        size: image side (overrides ``config.size``).
        workers: processes (default: CPU count, at most 8); 1 renders in-process.
        model: the FLAME-topology model (default: ``FlameModel.synthetic(seed=0)``).
        normal_space: ``"camera"`` or ``"head"`` (overrides ``config.normal_space``).
        config: the other distributions (default :class:`SynthConfig`).

    Returns:
        :class:`BatchResult` (samples written, skipped as complete, failed).

    Raises:
        InputError: bad arguments, or ``out_dir`` holds a different dataset.
    """
    t0 = time.monotonic()
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise InputError(f"synthesize: n={n!r}, expected a non-negative integer")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"synthesize: seed={seed!r}, expected a non-negative integer")
    cfg = dataclasses.replace(config or SynthConfig(), size=int(size), normal_space=normal_space)
    workers = _default_workers(workers)
    the_model, root, regions = _open_dataset(
        "synthesize", out_dir, model, cfg, {"name": "synth", "seed": int(seed), "config": cfg.to_dict()}
    )
    result = BatchResult(root=root)
    done = [i for i in range(n) if sample_complete(root, _synth_id(i))]
    if done:
        add_to_manifest(root, [_synth_id(i) for i in done])
    result.skipped = len(done)
    done_set = set(done)
    tasks = [("synth", i) for i in range(n) if i not in done_set]
    # a pool pickles the model once per worker (cheaper than rebuilding the synthetic head there)
    state = {"model": the_model, "cfg": cfg, "seed": int(seed)}
    state.update(root=str(root), regions=regions)
    _run_batch(tasks, state, workers, result, "synth", n, lambda ids: add_to_manifest(root, ids))
    result.seconds = time.monotonic() - t0
    return result


def render_dataset(
    meshes: str | PathLike[str] | Sequence[str | PathLike[str]],
    out_dir: str | PathLike[str],
    views: int = 4,
    size: int = 512,
    seed: int = 0,
    model: FlameModel | None = None,
    normal_space: str = "camera",
    workers: int | None = 1,
    config: SynthConfig | None = None,
) -> BatchResult:
    """Render supervision maps of user meshes in FLAME topology from random views.

    Each mesh (``.obj`` / ``.ply``, ``model.n_vertices`` vertices in the model's vertex
    order; the model's faces, UVs and regions are used) is rotated about its bounding-box
    centre by a random yaw / pitch / roll (``config``'s head-pose distribution), framed by
    :func:`sample_camera` and rendered; head-space normals are in the mesh's own frame.
    A texture beside the mesh (``<stem>.png`` / ``.jpg``) gives the albedo, otherwise
    the procedural skin is used. A mesh that cannot be read or has the wrong vertex count
    is reported with ``logging.warning`` and skipped; the batch goes on.

    Args:
        meshes: mesh files and/or directories (their ``.obj`` / ``.ply`` files, sorted).
        out_dir: dataset directory.
        views: views per mesh.
        size: image side.
        seed: base seed; view ``k`` of mesh ``m`` uses ``default_rng([seed, m, k])``.
        model: model with the meshes' topology (default: the synthetic head, which only
            suits meshes in its own topology; pass the real FLAME model for FLAME meshes).
        normal_space: ``"camera"`` or ``"head"``.
        workers: processes (1 = in-process).
        config: pose / camera distributions.

    Returns:
        :class:`BatchResult`.
    """
    t0 = time.monotonic()
    if not isinstance(views, (int, np.integer)) or views < 1:
        raise InputError(f"render_dataset: views={views!r}, expected a positive integer")
    if isinstance(meshes, (str, PathLike)):
        meshes = [meshes]
    files = _mesh_files(meshes)
    cfg = dataclasses.replace(config or SynthConfig(), size=int(size), normal_space=normal_space)
    workers = _default_workers(workers)
    the_model, root, regions = _open_dataset(
        "render_dataset",
        out_dir,
        model,
        cfg,
        {"name": "render-dataset", "seed": int(seed), "views": int(views), "config": cfg.to_dict()},
    )
    result = BatchResult(root=root)
    tasks: list[tuple[str, Any]] = []
    done: list[str] = []
    for m, path in enumerate(files):
        ids = [_mesh_id(m, path, k) for k in range(views)]
        complete = [i for i in ids if sample_complete(root, i)]
        done.extend(complete)
        if len(complete) < views:
            tasks.append(("mesh", (m, str(path))))
    if done:
        add_to_manifest(root, done)
    result.skipped = len(done)
    state = {"model": the_model, "cfg": cfg, "seed": int(seed)}
    state.update(root=str(root), regions=regions, views=int(views))
    _run_batch(
        tasks, state, workers, result, "render-dataset", len(files) * views, lambda ids: add_to_manifest(root, ids)
    )
    result.seconds = time.monotonic() - t0
    return result
