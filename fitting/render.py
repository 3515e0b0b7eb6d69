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

Rendering runs on the host: model and parameter arrays on CuPy are copied to NumPy.
"""

from __future__ import annotations

import dataclasses
import io
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .camera import Camera
from .errors import InputError
from .geometry import vertex_normals  # re-exported: renderer and fitter share it
from .xp import get_array_module, to_numpy

if TYPE_CHECKING:  # pragma: no cover
    from .flame_model import FlameModel, FlameParams
    from .raster import Fragments

__all__ = [
    "Appearance",
    "NORMAL_SPACES",
    "RenderedMaps",
    "face_region_masks",
    "render_maps",
    "render_mesh_maps",
    "scaled_camera",
    "sh_basis",
    "vertex_normals",
]

#: Normal spaces :func:`render_maps` can produce.
NORMAL_SPACES = ("camera", "head")

# Real spherical harmonics of bands 0..2, order (0,0), (1,-1), (1,0), (1,1), (2,-2),
# (2,-1), (2,0), (2,1), (2,2); and the clamped-cosine convolution factors A_l:
_SH_BAND = np.array([0, 1, 1, 1, 2, 2, 2, 2, 2])
# A directional light of unit irradiance from d gives irradiance
# E(n) = sum_k A_l(k) Y_k(d) Y_k(n) ~ max(0, n . d) (band-limited clamped cosine).
_SH_COSINE = np.array([np.pi, 2 * np.pi / 3, np.pi / 4])[_SH_BAND]


def sh_basis(n: np.ndarray) -> np.ndarray:
    """Real spherical harmonics of bands 0..2 at unit directions.

    Args:
        n: ``(N, 3)`` unit vectors.

    Returns:
        ``(N, 9)`` basis values in the order Y00, Y1-1, Y10, Y11, Y2-2, Y2-1, Y20, Y21, Y22.
    """
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    return np.stack(
        [
            np.full_like(x, 0.282095),
            0.488603 * y,
            0.488603 * z,
            0.488603 * x,
            1.092548 * x * y,
            1.092548 * y * z,
            0.315392 * (3.0 * z * z - 1.0),
            1.092548 * x * z,
            0.546274 * (x * x - y * y),
        ],
        axis=1,
    )


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, 12.92 * c, 1.055 * np.power(c, 1.0 / 2.4) - 0.055)


# ------------------------------------------------------------------------- appearance
# sRGB skin albedos from light to dark; a sample interpolates along this ramp.
_SKIN_RAMP_SRGB = np.array(
    [
        [0.96, 0.80, 0.71],
        [0.90, 0.70, 0.58],
        [0.80, 0.58, 0.45],
        [0.66, 0.45, 0.33],
        [0.50, 0.33, 0.23],
        [0.34, 0.22, 0.15],
        [0.24, 0.15, 0.10],
    ]
)
_HAIR_SRGB = np.array(
    [
        [0.06, 0.05, 0.04],
        [0.20, 0.13, 0.08],
        [0.40, 0.27, 0.15],
        [0.72, 0.58, 0.38],
        [0.55, 0.25, 0.12],
        [0.6, 0.6, 0.6],
    ]
)
_IRIS_SRGB = np.array(
    [[0.30, 0.18, 0.08], [0.15, 0.09, 0.05], [0.35, 0.45, 0.60], [0.35, 0.45, 0.30], [0.45, 0.38, 0.22]]
)


def _tuple(a: Any) -> tuple:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return float(a)  # type: ignore[return-value]
    return tuple(_tuple(x) for x in a) if a.ndim > 1 else tuple(float(x) for x in a)


@dataclass(frozen=True)
class Appearance:
    """Everything random about one rendered photo, drawn by :meth:`sample`.

    Colours are linear-light RGB albedos in [0, 1]; directions are unit vectors in the
    OpenCV camera frame pointing *towards* the light.

    Attributes:
        seed: seed of the noise fields (pores, blotches, background, sensor noise).
        skin: ``(3,)`` skin albedo.
        skin_variation: amplitude of low-frequency blotches (0..~0.2).
        redness: strength of reddish patches (cheeks, nose) (0..1).
        pores: amplitude of fine UV-space pore texture.
        lips: ``(3,)`` lip albedo.
        brows: ``(3,)`` eyebrow albedo.
        brow_width_m: eyebrow half-thickness in metres.
        brow_strength: opacity of the brows (0..1).
        lash_strength: darkening of the eyelid rim (lashes / eyeliner) (0..1).
        hair: ``(3,)`` hair albedo on the scalp, or None for a bald head.
        sclera: ``(3,)`` eye-white albedo.
        iris: ``(3,)`` iris albedo.
        iris_angle: iris radius as an angle on the eyeball (radians).
        pupil_angle: pupil radius as an angle (radians).
        sh_ambient: ``(9, 3)`` SH coefficients of the unshadowed light (ambient + fill);
            ``radiance(n) = albedo * (sh_basis(n) @ sh_ambient + visibility * key(n))``.
        key_dir: ``(3,)`` direction towards the key light (camera frame).
        key_rgb: ``(3,)`` key-light intensity.
        shadow_strength: 0 = no cast shadows, 1 = full shadows.
        ao_strength: strength of the concavity ambient occlusion.
        specular: specular weight of skin.
        shininess: Blinn-Phong exponent of skin.
        exposure: linear radiance of an 18% grey surface under the head's mean lighting.
        background: kind of background, "gradient", "noise", "blobs" or "mixed".
        background_colors: ``(4, 3)`` sRGB colours the background is built from.
        blur_sigma: Gaussian blur of the final image in pixels at 512 px.
        noise_sigma: sensor noise standard deviation (sRGB units).
        white_balance: ``(3,)`` per-channel gains.
        jpeg_quality: JPEG quality of the round trip, or 0 for none.
    """

    seed: int
    skin: tuple[float, float, float]
    skin_variation: float
    redness: float
    pores: float
    lips: tuple[float, float, float]
    brows: tuple[float, float, float]
    brow_width_m: float
    brow_strength: float
    lash_strength: float
    hair: tuple[float, float, float] | None
    sclera: tuple[float, float, float]
    iris: tuple[float, float, float]
    iris_angle: float
    pupil_angle: float
    sh_ambient: tuple[tuple[float, float, float], ...]
    key_dir: tuple[float, float, float]
    key_rgb: tuple[float, float, float]
    shadow_strength: float
    ao_strength: float
    specular: float
    shininess: float
    exposure: float
    background: str
    background_colors: tuple[tuple[float, float, float], ...]
    blur_sigma: float
    noise_sigma: float
    white_balance: tuple[float, float, float]
    jpeg_quality: int

    @staticmethod
    def sample(rng: np.random.Generator) -> "Appearance":
        """Draw a random identity's appearance, lighting, background and sensor.

        Args:
            rng: the generator all randomness comes from.
        """
        # skin: a point on the light-to-dark ramp, with a small hue/saturation jitter
        t = rng.uniform(0, len(_SKIN_RAMP_SRGB) - 1)
        i = min(int(t), len(_SKIN_RAMP_SRGB) - 2)
        skin_srgb = _SKIN_RAMP_SRGB[i] * (i + 1 - t) + _SKIN_RAMP_SRGB[i + 1] * (t - i)
        skin_srgb = np.clip(skin_srgb * (1 + rng.normal(0, 0.03, 3)), 0.02, 1.0)
        skin = _srgb_to_linear(skin_srgb)
        lips = skin * np.array([1.0, 0.55, 0.6]) * rng.uniform(0.6, 0.95) + np.array([0.03, 0.0, 0.005]) * rng.uniform(
            0, 1
        )
        hair_srgb = _HAIR_SRGB[rng.integers(len(_HAIR_SRGB))] * rng.uniform(0.8, 1.15, 3)
        hair = _srgb_to_linear(np.clip(hair_srgb, 0, 1))
        # brows: darker than the skin, tinted towards the hair colour
        brows = 0.5 * skin * rng.uniform(0.12, 0.45) + 0.5 * np.minimum(hair, skin * rng.uniform(0.2, 0.6))
        iris = _srgb_to_linear(np.clip(_IRIS_SRGB[rng.integers(len(_IRIS_SRGB))] * rng.uniform(0.7, 1.3), 0, 1))

        # lighting: a frontal-top key light plus ambient and a weaker fill from a side
        key_dir = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-1.0, -0.05), -rng.uniform(0.5, 1.2)])
        key_dir /= np.linalg.norm(key_dir)
        tint = rng.uniform(0.85, 1.15, 3)
        tint /= tint.mean()
        key_rgb = rng.uniform(0.7, 1.4) * tint
        fill_dir = np.array(
            [rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.0), rng.uniform(-0.5, 0.5), -rng.uniform(0.0, 1.0)]
        )
        fill_dir /= np.linalg.norm(fill_dir)
        ambient = rng.uniform(0.12, 0.45) * rng.uniform(0.85, 1.15, 3)
        sh = np.zeros((9, 3))
        sh[0] = ambient / 0.282095
        fill = rng.uniform(0.0, 0.35) * rng.uniform(0.85, 1.15, 3)
        sh += (_SH_COSINE * sh_basis(fill_dir[None])[0])[:, None] * fill[None]
        sh[1:] += rng.normal(0, 0.04, (8, 3))

        kind = ["gradient", "noise", "blobs", "mixed"][int(rng.integers(4))]
        bg = rng.uniform(0.0, 1.0, (4, 3)) ** rng.uniform(0.7, 1.6)
        return Appearance(
            seed=int(rng.integers(0, 2**31 - 1)),
            skin=_tuple(skin),
            skin_variation=float(rng.uniform(0.03, 0.15)),
            redness=float(rng.uniform(0.0, 0.8)),
            pores=float(rng.uniform(0.02, 0.08)),
            lips=_tuple(np.clip(lips, 0, 1)),
            brows=_tuple(np.clip(brows, 0, 1)),
            brow_width_m=float(rng.uniform(0.0025, 0.0055)),
            brow_strength=float(rng.uniform(0.5, 0.95)),
            lash_strength=float(rng.uniform(0.3, 0.9)),
            hair=_tuple(hair) if rng.random() < 0.75 else None,
            sclera=_tuple(np.array([0.80, 0.74, 0.70]) * rng.uniform(0.75, 1.0)),
            iris=_tuple(iris),
            iris_angle=float(rng.uniform(0.45, 0.58)),
            pupil_angle=float(rng.uniform(0.14, 0.26)),
            sh_ambient=_tuple(sh),
            key_dir=_tuple(key_dir),
            key_rgb=_tuple(key_rgb),
            shadow_strength=float(rng.uniform(0.5, 1.0)),
            ao_strength=float(rng.uniform(0.5, 1.0)),
            specular=float(rng.uniform(0.01, 0.07)),
            shininess=float(rng.uniform(15.0, 60.0)),
            exposure=float(rng.uniform(0.1, 0.22)),
            background=kind,
            background_colors=_tuple(bg),
            blur_sigma=float(rng.uniform(0.0, 1.0)),
            noise_sigma=float(rng.uniform(0.002, 0.02)),
            white_balance=_tuple(rng.uniform(0.92, 1.08, 3)),
            jpeg_quality=int(rng.integers(55, 98)) if rng.random() < 0.85 else 0,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "Appearance":
        """Inverse of :meth:`to_dict`.

        Raises:
            InputError: a field is missing or unknown.
        """
        names = [f.name for f in dataclasses.fields(Appearance)]
        missing = [n for n in names if n not in d]
        extra = [k for k in d if k not in names]
        if missing or extra:
            raise InputError(f"Appearance dict: missing fields {missing}, unknown fields {extra}")
        values: dict[str, Any] = {n: (_tuple(d[n]) if isinstance(d[n], (list, tuple)) else d[n]) for n in names}
        return Appearance(**values)


# ----------------------------------------------------------------------- result type
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


# ------------------------------------------------------------------ per-model caches
@dataclass
class _ModelData:
    """Host arrays derived once per model for rendering."""

    faces: np.ndarray
    vt: np.ndarray
    ft: np.ndarray
    region_faces: dict[str, np.ndarray]
    edges: np.ndarray
    rest: np.ndarray
    lips_w: np.ndarray
    scalp_w: np.ndarray
    rim_w: np.ndarray
    redness_w: np.ndarray
    eyeball_faces: np.ndarray
    eyes: list[tuple[np.ndarray, np.ndarray]]  # (centre (3,), vertex mask (V,)) per eyeball
    brows_uv: list[np.ndarray]  # polylines (5, 2) in UV
    uv_per_metre: float
    extras: dict[str, Any] = field(default_factory=dict)


_MODEL_CACHE: "weakref.WeakKeyDictionary[Any, _ModelData]" = weakref.WeakKeyDictionary()


def _neighbour_mean(w: np.ndarray, edges: np.ndarray, n: int) -> np.ndarray:
    """Mean of a per-vertex scalar over each vertex's mesh neighbours (0 for isolated)."""
    s = np.bincount(edges[:, 0], weights=w[edges[:, 1]], minlength=n) + np.bincount(
        edges[:, 1], weights=w[edges[:, 0]], minlength=n
    )
    deg = np.bincount(edges.ravel(), minlength=n)
    return np.where(deg > 0, s / np.maximum(deg, 1), w)


def _smooth(w: np.ndarray, edges: np.ndarray, iterations: int) -> np.ndarray:
    for _ in range(iterations):
        w = 0.5 * w + 0.5 * _neighbour_mean(w, edges, len(w))
    return w


def face_region_masks(faces: np.ndarray, masks: Mapping[str, Any], n_vertices: int) -> dict[str, np.ndarray]:
    """Per-face region membership: a face is in a region when its 3 vertices are.

    Args:
        faces: ``(F, 3)`` int vertex indices.
        masks: region name -> ``(K,)`` vertex ids.
        n_vertices: V.

    Returns:
        region name -> ``(F,) bool``.
    """
    out = {}
    for name, ids in masks.items():
        vm = np.zeros(n_vertices, dtype=bool)
        vm[np.asarray(to_numpy(ids), dtype=np.int64)] = True
        out[name] = vm[faces].all(axis=1)
    return out


def _model_data(model: "FlameModel") -> _ModelData:
    cached = _MODEL_CACHE.get(model)
    if cached is not None:
        return cached
    if model.uv is None:
        raise InputError(
            f"render_maps: model {model.name!r} has no UV layout (FlameModel.uv is None); load it with uv=..."
        )
    faces = np.asarray(to_numpy(model.faces), dtype=np.int64)
    V = model.n_vertices
    vt = np.asarray(model.uv.vt, dtype=np.float64)
    ft = np.asarray(model.uv.ft, dtype=np.int64)
    if ft.shape != faces.shape:
        raise InputError(f"render_maps: model.uv.ft has shape {ft.shape}, expected the faces' shape {faces.shape}")
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    e.sort(axis=1)
    edges = np.unique(e, axis=0)
    rest = np.asarray(to_numpy(model.v_template), dtype=np.float64)
    masks = {k: np.asarray(to_numpy(v), dtype=np.int64) for k, v in model.masks.items()}

    def vmask(*names: str) -> np.ndarray:
        m = np.zeros(V, dtype=bool)
        for n in names:
            if n in masks:
                m[masks[n]] = True
        return m

    lips_w = _smooth(vmask("lips").astype(np.float64), edges, 2)
    scalp_w = _smooth(vmask("scalp").astype(np.float64), edges, 3)
    eyeball = vmask("left_eyeball", "right_eyeball")
    eyes = []
    for name in ("left_eyeball", "right_eyeball"):
        if name in masks and len(masks[name]):
            ids = masks[name]
            eyes.append((rest[ids].mean(0), vmask(name)))
    # eyelid rim: skin vertices within a few mm of an eyeball's surface, in front of it
    rim = np.zeros(V)
    for centre, m in eyes:
        r = np.linalg.norm(rest[m] - centre, axis=1).mean()
        d = np.linalg.norm(rest - centre, axis=1) - r
        front = rest[:, 2] > centre[2] - 0.25 * r
        rim = np.maximum(rim, np.where(~eyeball & front, np.exp(-((np.maximum(d, 0) / 0.0025) ** 2)), 0.0))
    # reddish patches: face vertices, strongest low on the cheeks and on the nose
    face_m = vmask("face")
    if face_m.any():
        c = rest[face_m].mean(0)
        red = face_m * np.exp(-(((rest[:, 1] - c[1] + 0.01) / 0.03) ** 2))
        red = np.maximum(red, vmask("nose") * 0.8)
    else:
        red = np.zeros(V)
    redness_w = _smooth(red, edges, 3)

    # brows: the 2 x 5 brow points of the 51 static landmarks, in UV
    brows_uv: list[np.ndarray] = []
    uv_per_metre = 1.0
    lm = model.landmarks
    if lm is not None and len(lm.static_faces) >= 10:
        lf = np.asarray(lm.static_faces[:10], dtype=np.int64)
        lb = np.asarray(lm.static_bary[:10], dtype=np.float64)
        luv = (lb[:, :, None] * vt[ft[lf]]).sum(1)
        lxyz = (lb[:, :, None] * rest[faces[lf]]).sum(1)
        brows_uv = [luv[:5], luv[5:10]]
        duv = (
            np.linalg.norm(np.diff(luv[:5], axis=0), axis=1).sum()
            + np.linalg.norm(np.diff(luv[5:], axis=0), axis=1).sum()
        )
        dxyz = (
            np.linalg.norm(np.diff(lxyz[:5], axis=0), axis=1).sum()
            + np.linalg.norm(np.diff(lxyz[5:], axis=0), axis=1).sum()
        )
        if dxyz > 0 and duv > 0:
            uv_per_metre = float(duv / dxyz)
        else:
            brows_uv = []
    data = _ModelData(
        faces=faces,
        vt=vt,
        ft=ft,
        region_faces=face_region_masks(faces, masks, V),
        edges=edges,
        rest=rest,
        lips_w=lips_w,
        scalp_w=scalp_w,
        rim_w=rim,
        redness_w=redness_w,
        eyeball_faces=np.asarray(eyeball[faces].all(axis=1)),
        eyes=eyes,
        brows_uv=brows_uv,
        uv_per_metre=uv_per_metre,
    )
    _MODEL_CACHE[model] = data
    return data


# ------------------------------------------------------------------------- cameras
def scaled_camera(camera: Camera, height: int, width: int) -> Camera:
    """The same view for an image of ``height x width`` (pixel-centre convention).

    Raises:
        InputError: the aspect ratio changes.
    """
    if (camera.height, camera.width) == (height, width):
        return camera
    sx, sy = width / camera.width, height / camera.height
    if abs(sx - sy) > 1e-6:
        raise InputError(
            f"render: size {height}x{width} changes the camera's aspect ratio ({camera.height}x{camera.width})"
        )
    c = np.asarray(to_numpy(camera.principal), dtype=np.float64)
    return Camera(
        focal=np.asarray(float(to_numpy(camera.focal)) * sx, dtype=np.float32),
        principal=((c + 0.5) * sx - 0.5).astype(np.float32),
        R=np.asarray(to_numpy(camera.R), dtype=np.float32),
        t=np.asarray(to_numpy(camera.t), dtype=np.float32),
        width=int(width),
        height=int(height),
    )


def _look_at_rotation(forward: np.ndarray) -> np.ndarray:
    """Rows x, y, z of a camera whose z axis is ``forward`` (unit)."""
    up = np.array([0.0, 1.0, 0.0]) if abs(forward[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(up, forward)
    x /= np.linalg.norm(x)
    y = np.cross(forward, x)
    return np.stack([x, y, forward])


# --------------------------------------------------------------------------- renders
def _interp(attr: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """``out[p] = sum_k bary[p, k] * attr[tri[p, k]]`` for ``attr (V, C)``, ``tri (P, 3)``."""
    return np.einsum("pk,pkc->pc", bary, attr[tri])


def render_maps(
    model: "FlameModel",
    params: "FlameParams",
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
    from .lbs import rodrigues

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
    model: "FlameModel",
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
    from .raster import rasterize

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
    cam = scaled_camera(camera, H, W)
    data = _model_data(model)
    faces = data.faces

    Rc = np.asarray(to_numpy(cam.R), dtype=np.float64)
    tc = np.asarray(to_numpy(cam.t), dtype=np.float64)
    # x_cam[v, i] = sum_j Rc[i, j] * X[v, j] + t[i]
    verts_cam = verts @ Rc.T + tc
    frags = rasterize(verts_cam.astype(np.float32), faces, cam, H, W)
    fid = frags.face_id
    coverage = fid >= 0
    pix = np.nonzero(coverage.ravel())[0]
    pf = fid.ravel()[pix].astype(np.int64)
    pb = frags.bary.reshape(-1, 3)[pix].astype(np.float64)
    tri = faces[pf]

    n_cam_v = to_numpy(vertex_normals(verts_cam, faces))
    n_cam = _interp(n_cam_v, tri, pb)
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
        image = _shade(data, verts_cam, n_cam_v, cam, frags, pix, pf, pb, n_cam, uvp, H, W, appearance, albedo_texture)
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


# --------------------------------------------------------------------------- shading
def _hash01(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray, seed: int) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) at integer lattice points."""
    h = (
        ix.astype(np.int64).view(np.uint64) * np.uint64(0x9E3779B185EBCA87)
        ^ iy.astype(np.int64).view(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        ^ iz.astype(np.int64).view(np.uint64) * np.uint64(0x165667B19E3779F9)
        ^ np.full(ix.shape, seed & 0xFFFFFFFF, dtype=np.uint64) * np.uint64(0x27D4EB2F165667C5)
    )
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _value_noise(points: np.ndarray, cell: float, seed: int) -> np.ndarray:
    """Smooth 3D value noise in [-1, 1] at ``points (N, 3)`` with lattice spacing ``cell``."""
    p = points / cell
    i0 = np.floor(p)
    f = p - i0
    f = f * f * (3.0 - 2.0 * f)
    i0 = i0.astype(np.int64)
    out = np.zeros(len(points))
    for dx in (0, 1):
        wx = f[:, 0] if dx else 1.0 - f[:, 0]
        for dy in (0, 1):
            wy = f[:, 1] if dy else 1.0 - f[:, 1]
            for dz in (0, 1):
                wz = f[:, 2] if dz else 1.0 - f[:, 2]
                out += wx * wy * wz * _hash01(i0[:, 0] + dx, i0[:, 1] + dy, i0[:, 2] + dz, seed)
    return 2.0 * out - 1.0


def _fbm(points: np.ndarray, cell: float, seed: int, octaves: int = 3) -> np.ndarray:
    out = np.zeros(len(points))
    amp, tot = 1.0, 0.0
    for o in range(octaves):
        out += amp * _value_noise(points, cell / 2**o, seed + 101 * o)
        tot += amp
        amp *= 0.5
    return out / tot


def _sample_texture(tex: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of ``tex (Ht, Wt, C)`` at ``uv (N, 2)`` (v up, row 0 = v 1)."""
    Ht, Wt = tex.shape[:2]
    x = np.clip(uv[:, 0], 0, 1) * (Wt - 1)
    y = (1.0 - np.clip(uv[:, 1], 0, 1)) * (Ht - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), Wt - 2 if Wt > 1 else 0)
    y0 = np.minimum(np.floor(y).astype(np.int64), Ht - 2 if Ht > 1 else 0)
    x1, y1 = np.minimum(x0 + 1, Wt - 1), np.minimum(y0 + 1, Ht - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    t = tex.reshape(Ht, Wt, -1)
    return t[y0, x0] * (1 - fx) * (1 - fy) + t[y0, x1] * fx * (1 - fy) + t[y1, x0] * (1 - fx) * fy + t[y1, x1] * fx * fy


def _polyline_distance(p: np.ndarray, line: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance of ``p (N, 2)`` to a polyline ``(K, 2)`` and the arc parameter in [0, 1]."""
    best = np.full(len(p), np.inf)
    s_best = np.zeros(len(p))
    seg_len = np.linalg.norm(np.diff(line, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_len)])
    total = max(cum[-1], 1e-12)
    for k in range(len(line) - 1):
        a, b = line[k], line[k + 1]
        ab = b - a
        t = np.clip(((p - a) @ ab) / max(ab @ ab, 1e-20), 0.0, 1.0)
        d = np.linalg.norm(p - (a + t[:, None] * ab), axis=1)
        better = d < best
        best = np.where(better, d, best)
        s_best = np.where(better, (cum[k] + t * seg_len[k]) / total, s_best)
    return best, s_best


def _shadow_visibility(verts_cam: np.ndarray, faces: np.ndarray, key_dir: np.ndarray, res: int) -> np.ndarray:
    """Per-vertex visibility (0/1) from a directional key light, by a shadow map.

    The light is a camera 1.5 m away from the head's centre in direction ``key_dir``,
    looking at it; a vertex is lit when it is no farther than the shadow map's depth at
    its pixel (plus a small bias).
    """
    from .raster import rasterize

    centre = 0.5 * (verts_cam.min(0) + verts_cam.max(0))
    extent = float(np.linalg.norm(verts_cam.max(0) - verts_cam.min(0)))
    dist = 1.5 + extent
    eye = centre + key_dir * dist
    Rl = _look_at_rotation(-key_dir)
    vl = (verts_cam - eye) @ Rl.T
    focal = res * dist / (1.15 * max(extent, 1e-3))
    cam = Camera(
        focal=np.asarray(focal, dtype=np.float32),
        principal=np.array([(res - 1) / 2, (res - 1) / 2], dtype=np.float32),
        R=np.eye(3, dtype=np.float32),
        t=np.zeros(3, dtype=np.float32),
        width=res,
        height=res,
    )
    fr = rasterize(vl.astype(np.float32), faces, cam, res, res)
    u = focal * vl[:, 0] / vl[:, 2] + (res - 1) / 2
    v = focal * vl[:, 1] / vl[:, 2] + (res - 1) / 2
    col = np.clip(np.rint(u).astype(np.int64), 0, res - 1)
    row = np.clip(np.rint(v).astype(np.int64), 0, res - 1)
    # the farthest depth of a 3x3 neighbourhood tolerates the vertex's own silhouette
    d = fr.depth.astype(np.float64)
    d = np.where(d > 0, d, np.inf)
    pad = np.pad(d, 1, mode="edge")
    dmax = np.max(
        np.stack([pad[1 + a : 1 + a + res, 1 + b : 1 + b + res] for a in (-1, 0, 1) for b in (-1, 0, 1)]), axis=0
    )
    bias = 0.004 * max(extent / 0.25, 0.2)
    return (vl[:, 2] <= dmax[row, col] + bias).astype(np.float64)


def _concavity_occlusion(verts: np.ndarray, normals: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Per-vertex ambient occlusion in [0, 1] from mesh concavity (0 = fully occluded)."""
    n = len(verts)
    lap = np.stack([_neighbour_mean(verts[:, c], edges, n) for c in range(3)], axis=1) - verts
    el = np.linalg.norm(verts[edges[:, 0]] - verts[edges[:, 1]], axis=1)
    mean_edge = max(float(el.mean()) if len(el) else 1.0, 1e-9)
    conc = (lap * normals).sum(1) / mean_edge  # > 0 where the neighbours lie above the tangent plane
    conc = _smooth(conc, edges, 2)
    return np.clip(1.0 - 1.5 * np.maximum(conc, 0.0), 0.25, 1.0)


def _background(app: Appearance, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """``(H, W, 3)`` sRGB background in [0, 1]."""
    from scipy import ndimage

    cols = np.asarray(app.background_colors, dtype=np.float64)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    yy /= max(H - 1, 1)
    xx /= max(W - 1, 1)

    def gradient() -> np.ndarray:
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)
        t = (t - t.min()) / max(np.ptp(t), 1e-9)
        return cols[0] * (1 - t[..., None]) + cols[1] * t[..., None]

    def noise() -> np.ndarray:
        k = int(rng.integers(3, 9))
        grid = rng.uniform(0, 1, (k, k, 3)) * 0.6 + cols[2] * 0.4
        up = ndimage.zoom(grid, (H / k, W / k, 1), order=3, mode="nearest")[:H, :W]
        fine = ndimage.gaussian_filter(rng.normal(0, 1, (H, W)), 1.0 + 2.0 * rng.random())
        return np.clip(up + 0.03 * fine[..., None], 0, 1)

    def blobs() -> np.ndarray:
        img = np.broadcast_to(cols[3], (H, W, 3)).copy()
        for _ in range(int(rng.integers(3, 9))):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.35)
            w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(0.4, 1.0)
            img = img * (1 - w) + rng.uniform(0, 1, 3) * w
        return img

    if app.background == "gradient":
        bg = gradient()
    elif app.background == "noise":
        bg = noise()
    elif app.background == "blobs":
        bg = blobs()
    else:
        bg = 0.5 * gradient() + 0.5 * blobs()
        bg = np.clip(bg + 0.3 * (noise() - 0.5), 0, 1)
    return bg


def _shade(
    data: _ModelData,
    verts_cam: np.ndarray,
    n_cam_v: np.ndarray,
    cam: Camera,
    frags: "Fragments",
    pix: np.ndarray,
    pf: np.ndarray,
    pb: np.ndarray,
    n_cam: np.ndarray,
    uvp: np.ndarray,
    H: int,
    W: int,
    app: Appearance,
    albedo_texture: np.ndarray | None,
) -> np.ndarray:
    """Photo-like ``(H, W, 3) uint8`` image of the rasterized head."""
    from PIL import Image
    from scipy import ndimage

    rng = np.random.default_rng(app.seed)
    faces = data.faces
    tri = faces[pf]
    scale = W / 512.0
    P = len(pix)

    # ---- albedo (linear RGB) per covered pixel
    rest_p = _interp(data.rest, tri, pb)
    if albedo_texture is not None:
        tex = np.asarray(albedo_texture)
        if tex.ndim != 3 or tex.shape[2] < 3:
            raise InputError(f"render_maps: albedo_texture has shape {tex.shape}, expected (Ht, Wt, 3)")
        tex = tex[..., :3]
        tex = tex.astype(np.float64) / (255.0 if tex.dtype == np.uint8 else 1.0)
        albedo = _srgb_to_linear(_sample_texture(tex, uvp))
        spec_w = np.full(P, app.specular)
    else:
        skin = np.asarray(app.skin)
        blotch = _fbm(rest_p, 0.02, app.seed, 3)
        albedo = skin[None] * (1.0 + app.skin_variation * blotch[:, None] * np.array([1.0, 0.9, 0.85]))
        red_v = data.redness_w * (0.5 + 0.5 * _value_noise(data.rest, 0.015, app.seed + 7))
        red = app.redness * np.clip(_interp(red_v[:, None], tri, pb)[:, 0], 0, 1)
        albedo = albedo * (1.0 + red[:, None] * np.array([0.12, -0.12, -0.1]))
        # pores: fine noise texture in UV space
        tex_n = max(64, int(512 * max(scale, 0.25)))
        pores = ndimage.gaussian_filter(rng.normal(0, 1, (tex_n, tex_n)), 0.8)
        pores /= max(float(pores.std()), 1e-9)
        albedo *= (1.0 + app.pores * np.clip(_sample_texture(pores[..., None], uvp)[:, 0], -3, 3))[:, None]
        # lips
        lips_w = np.clip(_interp(data.lips_w[:, None], tri, pb)[:, 0], 0, 1) ** 1.5
        albedo = albedo * (1 - lips_w[:, None]) + np.asarray(app.lips)[None] * lips_w[:, None]
        # brows in UV space, hair-like streaks
        for line in data.brows_uv:
            d, s = _polyline_distance(uvp, line)
            width = app.brow_width_m * data.uv_per_metre * (1.2 - 0.6 * s)  # thicker towards the nose end
            streak = 0.75 + 0.25 * _value_noise(
                np.stack([uvp[:, 0] * 900, uvp[:, 1] * 180, np.zeros(P)], 1), 1.0, app.seed + 11
            )
            w = np.clip(1.5 - d / np.maximum(width, 1e-9), 0, 1) * app.brow_strength * streak
            albedo = albedo * (1 - w[:, None]) + np.asarray(app.brows)[None] * w[:, None]
        # eyelid rim (lashes / liner)
        rim = np.clip(_interp(data.rim_w[:, None], tri, pb)[:, 0], 0, 1) * app.lash_strength
        albedo *= (1.0 - 0.85 * rim)[:, None]
        # hair on the scalp
        if app.hair is not None:
            hw = np.clip(_interp(data.scalp_w[:, None], tri, pb)[:, 0] * 1.6 - 0.3, 0, 1)
            strands = 0.7 + 0.3 * _fbm(rest_p * np.array([1.0, 4.0, 1.0]), 0.01, app.seed + 13, 2)
            albedo = albedo * (1 - hw[:, None]) + np.asarray(app.hair)[None] * strands[:, None] * hw[:, None]
        spec_w = np.full(P, app.specular)
        spec_w += 0.1 * lips_w
        # eyeballs: sclera, iris with radial streaks, pupil, dark limbal ring
        on_eye = data.eyeball_faces[pf]
        if on_eye.any() and data.eyes:
            pe = rest_p[on_eye]
            # angle from the forward (+z) axis of the nearest eyeball's centre
            dist = np.stack([np.linalg.norm(pe - c, axis=1) for c, _ in data.eyes], 1)
            centres = np.stack([c for c, _ in data.eyes])[np.argmin(dist, axis=1)]
            d = pe - centres
            ang = np.arccos(np.clip(d[:, 2] / np.maximum(np.linalg.norm(d, axis=1), 1e-12), -1, 1))
            phi = np.arctan2(d[:, 1], d[:, 0])
            sclera = np.asarray(app.sclera)[None] * (1 - 0.15 * np.clip((ang - 0.8) / 0.8, 0, 1))[:, None]
            streak = 0.75 + 0.25 * np.sin(phi * 37.0 + 3.0 * np.sin(phi * 11.0))
            iris = np.asarray(app.iris)[None] * streak[:, None] * (0.6 + 0.4 * (ang / app.iris_angle))[:, None]
            limbus = np.clip((ang - 0.85 * app.iris_angle) / (0.15 * app.iris_angle), 0, 1)
            iris = iris * (1 - 0.5 * limbus[:, None])
            col = np.where((ang < app.iris_angle)[:, None], iris, sclera)
            col = np.where((ang < app.pupil_angle)[:, None], 0.01, col)
            albedo[on_eye] = col
            spec_w[on_eye] = 0.8

    # ---- lighting in camera space
    sh = np.asarray(app.sh_ambient)
    key_dir = np.asarray(app.key_dir)
    key_rgb = np.asarray(app.key_rgb)
    shading = sh_basis(n_cam) @ sh
    key_lobe = (_SH_COSINE * sh_basis(key_dir[None])[0]) @ sh_basis(n_cam).T  # ~ max(0, n . d)
    key_lobe = np.maximum(key_lobe, 0.0)
    vis_v = _shadow_visibility(verts_cam, faces, key_dir, max(64, min(512, W // 2)))
    vis = _interp(vis_v[:, None], tri, pb)[:, 0]
    vis = 1.0 - app.shadow_strength * (1.0 - vis)
    ao_v = _concavity_occlusion(verts_cam, n_cam_v, data.edges)
    ao = 1.0 - app.ao_strength * (1.0 - _interp(ao_v[:, None], tri, pb)[:, 0])
    shading = shading * ao[:, None] + (vis * key_lobe)[:, None] * key_rgb[None]
    radiance = albedo * np.maximum(shading, 0.0)
    # specular (Blinn-Phong) from the key light
    p_cam = _interp(verts_cam, tri, pb)
    view = -p_cam / np.maximum(np.linalg.norm(p_cam, axis=1, keepdims=True), 1e-12)
    h = view + key_dir[None]
    h /= np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    shin = np.where(spec_w > 0.5, 300.0, app.shininess)
    spec = spec_w * np.maximum((n_cam * h).sum(1), 0.0) ** shin * vis * (key_lobe > 0)
    radiance += spec[:, None] * key_rgb[None]
    # back faces seen through an open mouth: a dark cavity
    backface = (n_cam * p_cam).sum(1) > 0
    radiance[backface] = np.array([0.05, 0.012, 0.01]) * (0.5 + 0.5 * ao[backface, None])

    # exposure: an 18% grey surface under the head's mean lighting gets radiance
    # app.exposure (so dark skin stays dark)
    m = 0.18 * float(np.maximum(shading, 0.0).mean()) if P else 1.0
    radiance *= app.exposure / max(m, 1e-6)

    # ---- compose with the background, sensor effects
    img = _srgb_to_linear(_background(app, H, W, rng)).reshape(-1, 3)
    img[pix] = radiance
    img = img.reshape(H, W, 3) * np.asarray(app.white_balance)[None, None]
    if app.blur_sigma > 0.05:
        sigma = app.blur_sigma * max(scale, 0.25)
        img = ndimage.gaussian_filter(img, (sigma, sigma, 0))
    img = _linear_to_srgb(img)
    img = img + rng.normal(0, app.noise_sigma, img.shape) * (0.5 + np.sqrt(np.clip(img, 0, 1)))
    out = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    if app.jpeg_quality > 0:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(app.jpeg_quality))
        buf.seek(0)
        out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8).copy()
    return out
