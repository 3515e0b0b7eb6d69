"""Render Pixel3DMM supervision maps (normals, UV, masks) and a photo-like RGB image.

:func:`render_maps` poses a FLAME-topology model, rasterizes it (:func:`rasterize`) and
interpolates per-pixel attributes with the perspective-correct barycentrics:

* ``normals``: area-weighted vertex normals interpolated and renormalised, in camera
  space (``R_cam @ n_world``, OpenCV axes: a surface facing the camera has n_z < 0) or
  head space (``R_global^T @ n_world`` with ``R_global = rodrigues(pose[0])``: FLAME's
  frame with the head's global rotation undone, the official Pixel3DMM convention).
* ``uv``: the model's per-face texture coordinates (``vt[ft]``) interpolated, so seams
  are sharp; OBJ convention (v up), in [0, 1].
* ``mask`` (the ``face`` region), ``coverage`` (any head pixel) and one boolean map per
  region of ``model.masks``; a mesh face belongs to a region when its three vertices do.
* ``rgb``: a face "photograph": procedural albedo (skin tone, blotches, pores, lips,
  brows drawn in UV space, eye white / iris / pupil on the eyeballs, hair on the scalp),
  2nd-order spherical-harmonics lighting with a key light whose shadow comes from a
  second rasterization seen from the light (a shadow map), concavity ambient occlusion,
  a little specular, a random background and sensor effects (blur, noise, JPEG).
  Everything random is drawn into an :class:`Appearance` first, so an appearance (or
  the seed of the generator it was sampled from) reproduces the image exactly.

  The photo's stages live in their own modules: :mod:`.albedo`, :mod:`.lighting`,
  :mod:`.background`, :mod:`.sensor`, composed by :mod:`.photo` over the
  :class:`~p3dmm.fitting.render.surface.Surface` of the covered pixels.

Rendering runs on the host: model and parameter arrays on CuPy are copied to NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.camera import Camera
from ..base.errors import InputError
from ..base.geometry import vertex_normals
from ..base.rotation import rodrigues
from ..base.xp import get_array_module, to_numpy
from ..model.flame_model import FlameModel
from ..model.params import FlameParams
from .appearance import Appearance
from .model_data import render_data
from .photo import render_photo
from .raster import rasterize
from .surface import Surface

__all__ = ["NORMAL_SPACES", "RenderedMaps", "render_maps", "render_mesh_maps"]

#: Normal spaces :func:`render_maps` can produce.
NORMAL_SPACES = ("camera", "head")


@dataclass
class RenderedMaps:
    """Per-pixel supervision of one rendered view (host NumPy arrays).

    Attributes:
        normals: ``(H, W, 3) float32`` unit normals on ``coverage``, 0 elsewhere.
        uv: ``(H, W, 2) float32`` FLAME UV in [0, 1] (v up) on ``coverage``, 0 elsewhere.
        mask: ``(H, W) bool`` pixels of the ``face`` region (``coverage`` when the
            model has no ``face`` mask).
        coverage: ``(H, W) bool`` pixels showing the head.
        regions: region name -> ``(H, W) bool``, one per ``model.masks`` entry.
        depth: ``(H, W) float32`` camera-frame z in metres, 0 on the background.
        face_id: ``(H, W) int32`` visible face, -1 on the background.
        bary: ``(H, W, 3) float32`` perspective-correct barycentrics.
        rgb: ``(H, W, 3) uint8`` photo-like image, or None when not rendered.
        normal_space: ``"camera"`` or ``"head"``.
        camera: the camera the maps were rendered with (intrinsics scaled to H x W).
        appearance: the appearance of ``rgb``, or None.
    """

    normals: np.ndarray
    uv: np.ndarray
    mask: np.ndarray
    coverage: np.ndarray
    regions: dict[str, np.ndarray]
    depth: np.ndarray
    face_id: np.ndarray
    bary: np.ndarray
    rgb: np.ndarray | None
    normal_space: str
    camera: Camera
    appearance: Appearance | None = None




def render_maps(
    model: FlameModel,
    params: FlameParams,
    camera: Camera,
    size: int | None = None,
    normal_space: str = "camera",
    rgb: bool = True,
    rng: np.random.Generator | None = None,
    appearance: Appearance | None = None,
) -> RenderedMaps:
    """Render normals, UV, masks and an RGB photo of a posed FLAME head.

    Args:
        model: a FLAME-topology model with a UV layout (``model.uv``); region masks
            (``model.masks``) and landmarks improve the RGB image and give ``mask``.
        params: FLAME parameters (NumPy or CuPy).
        camera: pinhole camera (OpenCV), world = FLAME frame.
        size: output side length; the camera's intrinsics are scaled from its own
            ``width x height`` (which must be square then). None: the camera's size.
        normal_space: ``"camera"`` or ``"head"`` (see the module docstring).
        rgb: render the RGB image too.
        rng: generator the :class:`Appearance` is sampled from when ``appearance`` is
            None (default: ``np.random.default_rng(0)``).
        appearance: a fixed appearance (overrides ``rng``).

    Returns:
        :class:`RenderedMaps` of ``size x size`` (or the camera's) pixels.

    Raises:
        InputError: wrong normal space, model without UVs, bad size.
    """
    verts = model.vertices(params)
    xp = get_array_module(verts)
    R_global = to_numpy(rodrigues(xp.asarray(params.pose[:1], dtype=xp.float64)))[0]
    return render_mesh_maps(
        model,
        to_numpy(verts),
        camera,
        size=size,
        normal_space=normal_space,
        head_rotation=R_global,
        rgb=rgb,
        rng=rng,
        appearance=appearance,
    )


def render_mesh_maps(
    model: FlameModel,
    vertices: np.ndarray,
    camera: Camera,
    size: int | None = None,
    normal_space: str = "camera",
    head_rotation: np.ndarray | None = None,
    rgb: bool = True,
    rng: np.random.Generator | None = None,
    appearance: Appearance | None = None,
    albedo_texture: np.ndarray | None = None,
) -> RenderedMaps:
    """Render the maps of given posed vertices in the model's topology.

    Args:
        model: supplies faces, UV layout, region masks, rest shape and landmarks.
        vertices: ``(V, 3)`` posed vertices in the world (FLAME) frame, metres.
        camera: pinhole camera (OpenCV).
        size: output side (see :func:`render_maps`).
        normal_space: ``"camera"`` or ``"head"``.
        head_rotation: ``(3, 3)`` the head's global rotation ``R_global``; head-space
            normals are ``R_global^T n_world``. None: identity.
        rgb: render the RGB image.
        rng: generator for the appearance (default ``np.random.default_rng(0)``).
        appearance: a fixed appearance.
        albedo_texture: ``(Ht, Wt, 3) uint8`` sRGB texture in the model's UV layout
            (row 0 = v 1); replaces the procedural albedo.

    Returns:
        :class:`RenderedMaps`.

    Raises:
        InputError: wrong normal space, shapes, or a model without UVs.
    """
    if normal_space not in NORMAL_SPACES:
        raise InputError(f"render_maps: normal_space={normal_space!r}, expected one of {NORMAL_SPACES}")
    verts = np.asarray(to_numpy(vertices), dtype=np.float64)
    if verts.shape != (model.n_vertices, 3):
        raise InputError(f"render_maps: vertices have shape {verts.shape}, expected ({model.n_vertices}, 3)")
    if size is None:
        H, W = int(camera.height), int(camera.width)
    else:
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
            raise InputError(f"render_maps: size={size!r}, expected a positive integer")
        H = W = int(size)
    cam = camera.scaled(W, H)
    data = render_data(model)
    faces = data.faces

    Rc = np.asarray(to_numpy(cam.R), dtype=np.float64)
    verts_cam = cam.to_camera(verts)
    frags = rasterize(verts_cam.astype(np.float32), faces, cam)
    fid = frags.face_id
    coverage = fid >= 0
    pix = np.nonzero(coverage.ravel())[0]
    pf = fid.ravel()[pix].astype(np.int64)
    pb = frags.bary.reshape(-1, 3)[pix].astype(np.float64)
    tri = faces[pf]

    n_cam_v = to_numpy(vertex_normals(verts_cam, faces))
    n_cam = np.einsum("pk,pkc->pc", pb, n_cam_v[tri])
    n_cam /= np.maximum(np.linalg.norm(n_cam, axis=1, keepdims=True), 1e-12)
    if normal_space == "camera":
        n_out = n_cam
    else:
        Rg = np.eye(3) if head_rotation is None else np.asarray(to_numpy(head_rotation), dtype=np.float64)
        if Rg.shape != (3, 3):
            raise InputError(f"render_maps: head_rotation has shape {Rg.shape}, expected (3, 3)")
        # n_head = Rg^T Rc^T n_cam: n_head[p, i] = sum_j (Rc Rg)[j, i] n_cam[p, j]
        n_out = n_cam @ (Rc @ Rg)
    normals = np.zeros((H * W, 3), dtype=np.float32)
    normals[pix] = n_out
    uvp = np.clip((pb[:, :, None] * data.vt[data.ft[pf]]).sum(1), 0.0, 1.0)
    uv = np.zeros((H * W, 2), dtype=np.float32)
    uv[pix] = uvp

    regions = {}
    for name, fm in data.region_faces.items():
        m = np.zeros(H * W, dtype=bool)
        m[pix] = fm[pf]
        regions[name] = m.reshape(H, W)
    mask = regions["face"].copy() if "face" in regions else coverage.copy()

    image = None
    if rgb:
        if appearance is None:
            appearance = Appearance.sample(rng if rng is not None else np.random.default_rng(0))
        surface = Surface(
            camera=cam,
            verts_cam=verts_cam,
            vertex_normals=n_cam_v,
            pixels=pix,
            face_ids=pf,
            corners=tri,
            bary=pb,
            normals=n_cam,
            uv=uvp,
        )
        image = render_photo(data, surface, appearance, albedo_texture)
    return RenderedMaps(
        normals=normals.reshape(H, W, 3),
        uv=uv.reshape(H, W, 2),
        mask=mask,
        coverage=coverage,
        regions=regions,
        depth=frags.depth,
        face_id=fid,
        bary=frags.bary,
        rgb=image,
        normal_space=normal_space,
        camera=cam,
        appearance=appearance if rgb else None,
    )
