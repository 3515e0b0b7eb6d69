"""Training-time augmentation that keeps the per-pixel supervision consistent (NumPy only).

Photometric changes (colour jitter, gamma, blur, noise, JPEG) touch only the image.
Background swaps and occluders repaint image pixels but leave every target map as it
was. The horizontal flip is the one geometric change, and it transforms the targets
with the image:

* every map is mirrored column-wise (pixel ``(i, j)`` -> ``(i, W - 1 - j)``);
* normals: the x component is negated. For camera-space normals this is the mirror
  ``x -> -x`` of the (OpenCV) camera frame. For head-space normals it is also a plain
  x negation: the flipped image shows the head mirrored about FLAME's x = 0 plane
  (see :func:`hflip_sample`);
* uv: a flipped pixel shows the mirror image of the surface point it showed before.
  Its UV is therefore the *mirrored* UV of the old value, found through the layout's
  mirror correspondence (:class:`UVMirror`). A plain ``u -> 1 - u`` is right only for
  layouts that happen to be symmetric about u = 0.5.

Occluders: the supervision under an occluder is kept, so the network learns to
hallucinate the face behind hands, hair, glasses or microphones. The fitter wants
complete maps, and the synthetic targets behind an occluder are exact. The occluder
mask is returned too (``occluder``), so a loss can down-weight those pixels if wanted
(``TrainConfig.occluder_weight``).

Randomness comes only from the ``np.random.Generator`` passed in, so a sample's
augmentation is reproducible from the generator's seed. Everything here is
torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from p3dmm.fitting.base.camera import Camera
from p3dmm.fitting.base.errors import InputError
from p3dmm.fitting.base.xp import to_numpy
from p3dmm.fitting.render.raster import rasterize
from p3dmm.fitting.render.sensor import (
    gaussian_blur,
    jpeg_roundtrip,
    luma_chroma_noise,
    to_uint8,
)

__all__ = [
    "AugmentConfig",
    "UVMirror",
    "adjust_colour",
    "augment_sample",
    "hflip_sample",
    "mirror_vertex_map_from_template",
    "paint_occluders",
    "random_background",
    "swap_background",
]


# ------------------------------------------------------------------------ config
@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (one source of truth; stored in checkpoints).

    Pixel sizes (blur sigma) are given for a 512 px image and scale with the image side.

    Attributes:
        flip_prob: Probability of the horizontal flip.
        background_prob: Probability of replacing the pixels outside ``coverage``.
        occluder_prob: Probability of painting occluders (then 1..``max_occluders``).
        max_occluders: Most occluders on one image.
        occluder_size: Range of an occluder's size as a fraction of the image side.
        colour_prob: Probability of the colour jitter (brightness, contrast,
            saturation, hue, gamma; each drawn within its range).
        brightness: Gain drawn from ``[1 - brightness, 1 + brightness]``.
        contrast: Contrast factor drawn from ``[1 - contrast, 1 + contrast]``.
        saturation: Saturation factor drawn from ``[1 - saturation, 1 + saturation]``.
        hue_deg: Rotation of the chroma about the grey axis, degrees, ``[-hue, hue]``.
        gamma: Range of the gamma exponent (drawn log-uniformly).
        blur_prob: Probability of a Gaussian blur.
        blur_sigma: Range of its sigma in pixels at 512 px.
        noise_prob: Probability of additive Gaussian noise.
        noise_sigma: Range of its standard deviation (image in [0, 1]).
        jpeg_prob: Probability of a JPEG round trip through Pillow.
        jpeg_quality: Range of the JPEG quality.
    """

    flip_prob: float = 0.5
    background_prob: float = 0.5
    occluder_prob: float = 0.4
    max_occluders: int = 3
    occluder_size: tuple[float, float] = (0.08, 0.35)
    colour_prob: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.4
    hue_deg: float = 10.0
    gamma: tuple[float, float] = (0.7, 1.5)
    blur_prob: float = 0.25
    blur_sigma: tuple[float, float] = (0.5, 3.0)
    noise_prob: float = 0.3
    noise_sigma: tuple[float, float] = (0.005, 0.04)
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 95)

    def __post_init__(self) -> None:
        for name in ("flip_prob", "background_prob", "occluder_prob", "colour_prob", "blur_prob", "noise_prob",
                     "jpeg_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise InputError(f"AugmentConfig.{name}={p!r}, expected a probability in [0, 1]")
        for name in ("occluder_size", "gamma", "blur_sigma", "noise_sigma", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise InputError(f"AugmentConfig.{name}={(lo, hi)!r}, expected 0 <= low <= high")
        if self.gamma[0] <= 0 or self.jpeg_quality[1] > 100 or self.jpeg_quality[0] < 1:
            raise InputError(
                f"AugmentConfig: gamma {self.gamma} must be positive and jpeg_quality {self.jpeg_quality} in 1..100"
            )
        if self.max_occluders < 1:
            raise InputError(f"AugmentConfig.max_occluders={self.max_occluders}, expected >= 1")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"AugmentConfig.{name}={getattr(self, name)!r}, expected a value in [0, 1)")

    @classmethod
    def disabled(cls) -> AugmentConfig:
        """A configuration that changes nothing (all probabilities 0)."""
        return cls(flip_prob=0.0, background_prob=0.0, occluder_prob=0.0, colour_prob=0.0, blur_prob=0.0,
                   noise_prob=0.0, jpeg_prob=0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (tuples as lists) for checkpoints and logs."""
        import dataclasses

        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentConfig:
        """Inverse of :meth:`to_dict`."""
        values: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**values)


# ------------------------------------------------------------------- UV mirror map
def mirror_vertex_map_from_template(v_template: np.ndarray) -> np.ndarray:
    """Vertex correspondence under the reflection ``x -> -x``, by nearest neighbour.

    For a model without an exact mirror map (real FLAME, whose template is symmetric
    only to about a tenth of a millimetre), vertex ``i`` is matched to the template
    vertex nearest to ``v_template[i] * (-1, 1, 1)``.

    Args:
        v_template: ``(V, 3)`` template vertices (FLAME frame: x = subject's left).

    Returns:
        ``(V,) int64`` ``m``: vertex ``m[i]`` is the mirror image of vertex ``i``. On an
        exactly symmetric template ``m[m] == arange(V)``.

    Raises:
        InputError: ``v_template`` is not ``(V, 3)`` or not finite.
    """
    from scipy.spatial import cKDTree

    v = np.asarray(v_template, dtype=np.float64)
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0 or not np.isfinite(v).all():
        raise InputError(f"mirror_vertex_map_from_template: v_template has shape {v.shape}, expected finite (V, 3)")
    _, idx = cKDTree(v).query(v * np.array([-1.0, 1.0, 1.0]))
    return np.asarray(idx, dtype=np.int64)


def _mirror_face_corners(faces: np.ndarray, mirror: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each face, the face made of the mirrored vertices and the matching corners.

    Args:
        faces: ``(F, 3)`` vertex ids.
        mirror: ``(V,)`` vertex mirror map.

    Returns:
        ``(partner (F,) int64, corner (F, 3) int64)``: ``faces[partner[f], corner[f, k]]
        == mirror[faces[f, k]]``; ``partner[f] = -1`` where no face has those vertices.
    """
    F = len(faces)
    V = int(max(faces.max(), mirror.max())) + 1
    # a face's key is its sorted vertex triple, encoded as one int64
    srt = np.sort(faces, axis=1).astype(np.int64)
    keys = (srt[:, 0] * V + srt[:, 1]) * V + srt[:, 2]
    order = np.argsort(keys, kind="stable")
    mf = mirror[faces]  # (F, 3) mirrored corners
    ms = np.sort(mf, axis=1).astype(np.int64)
    mkeys = (ms[:, 0] * V + ms[:, 1]) * V + ms[:, 2]
    pos = np.clip(np.searchsorted(keys[order], mkeys), 0, F - 1)
    partner = order[pos]
    distinct = (ms[:, 0] != ms[:, 1]) & (ms[:, 1] != ms[:, 2])
    found = (keys[partner] == mkeys) & distinct
    partner = np.where(found, partner, -1)
    # eq[f, k, k'] = faces[partner[f], k'] == mirror[faces[f, k]]
    eq = faces[np.maximum(partner, 0)][:, None, :] == mf[:, :, None]
    corner = np.argmax(eq, axis=2).astype(np.int64)
    return partner.astype(np.int64), corner


@dataclass(frozen=True, eq=False)
class UVMirror:
    """The mirror map of a UV layout, ``uv -> uv'``, sampled as a dense lookup texture.

    A UV point with barycentrics ``b`` in UV triangle ``f`` maps to the point with the
    same barycentrics in the mirrored triangle ``f'``: the face whose vertices are the
    mirror images of ``f``'s (found by vertex set; its winding is reversed), with the
    corners matched through the vertex mirror map. The map is piecewise linear, so a
    texture of ``resolution^2`` texels sampled bilinearly reproduces it inside the
    triangles. Texels outside every UV triangle take the value of the nearest texel
    inside one. Bilinear lookups whose four texels disagree by more than ``jump`` (a
    chart border where the mirrored charts are far apart) use the nearest texel instead.

    Attributes:
        table: ``(R, R, 2) float32``: ``table[iv, iu]`` is the mirrored uv of the texel
            centre ``((iu + 0.5) / R, (iv + 0.5) / R)`` (rows follow v, upwards).
        inside: ``(R, R) bool`` texels whose centre lies in a UV triangle.
        layout_id: :func:`p3dmm.training.dataset_format.uv_layout_id` of the layout.
        unmatched_faces: Faces whose mirrored vertices form no face. Their corners map
            to the per-vertex UV of the mirrored vertices (0 for the synthetic head).
        jump: Threshold of the bilinear/nearest switch, UV units.
    """

    table: np.ndarray
    inside: np.ndarray
    layout_id: str
    unmatched_faces: int
    jump: float = 0.02

    @property
    def resolution(self) -> int:
        """Side R of the lookup texture."""
        return int(self.table.shape[0])

    @classmethod
    def from_model(
        cls, model: Any, resolution: int = 1024, vertex_map: np.ndarray | None = None
    ) -> UVMirror:
        """Build the mirror map of ``model``'s UV layout.

        Args:
            model: A :class:`p3dmm.fitting.FlameModel` with a UV layout.
            resolution: Side of the lookup texture (1024: 1e-3 UV per texel).
            vertex_map: ``(V,)`` vertex mirror map; default
                :func:`mirror_vertex_map_from_template` of ``model.v_template`` (exact
                for the synthetic head, whose template is exactly symmetric).

        Returns:
            A :class:`UVMirror`.

        Raises:
            InputError: The model has no UV layout, or a bad ``vertex_map`` / resolution.
        """
        from .dataset_format import uv_layout_id

        if getattr(model, "uv", None) is None:
            raise InputError(f"UVMirror.from_model: model {getattr(model, 'name', '?')!r} has no UV layout")
        if not isinstance(resolution, (int, np.integer)) or resolution < 2:
            raise InputError(f"UVMirror.from_model: resolution={resolution!r}, expected an integer >= 2")
        R = int(resolution)
        faces = np.asarray(to_numpy(model.faces), dtype=np.int64)
        V = int(model.n_vertices)
        if vertex_map is None:
            mirror = mirror_vertex_map_from_template(to_numpy(model.v_template))
        else:
            mirror = np.asarray(vertex_map, dtype=np.int64)
            if mirror.shape != (V,) or mirror.min() < 0 or mirror.max() >= V:
                raise InputError(f"UVMirror.from_model: vertex_map has shape {mirror.shape}, expected ({V},) ids")
        vt = np.asarray(model.uv.vt, dtype=np.float64)
        ft = np.asarray(model.uv.ft, dtype=np.int64)
        partner, corner = _mirror_face_corners(faces, mirror)
        # target[f, k] = uv of the corner of the mirrored face that matches corner k of f
        matched = partner >= 0
        target = np.empty((len(faces), 3, 2), dtype=np.float64)
        target[matched] = vt[ft[partner[matched][:, None], corner[matched]]]
        vertex_uv = np.asarray(model.uv.vertex_uv, dtype=np.float64)
        target[~matched] = vertex_uv[mirror[faces[~matched]]]
        # Rasterize the UV triangles in texel space: with every vertex at depth z = 1 and
        # focal 1 the projection is the identity, so perspective-correct barycentrics are
        # the affine ones. Texel (iv, iu) has its centre at x = iu, y = iv.
        pts = np.concatenate([vt * R - 0.5, np.ones((len(vt), 1))], axis=1).astype(np.float32)
        cam = Camera(
            focal=np.asarray(1.0, dtype=np.float32),
            principal=np.zeros(2, dtype=np.float32),
            R=np.eye(3, dtype=np.float32),
            t=np.zeros(3, dtype=np.float32),
            width=R,
            height=R,
        )
        frags = rasterize(pts, ft, cam)
        fid = np.asarray(frags.face_id)
        inside = fid >= 0
        bary = np.asarray(frags.bary, dtype=np.float64)
        table = np.zeros((R, R, 2), dtype=np.float64)
        # table[p] = sum_k bary[p, k] * target[fid[p], k]
        table[inside] = np.einsum("pk,pkc->pc", bary[inside], target[fid[inside]])
        if not inside.all():
            from scipy.ndimage import distance_transform_edt

            if not inside.any():
                raise InputError("UVMirror.from_model: the UV layout covers no texel; is vt in [0, 1]?")
            iy, ix = distance_transform_edt(~inside, return_distances=False, return_indices=True)
            table = table[iy, ix]
        return cls(
            table=np.clip(table, 0.0, 1.0).astype(np.float32),
            inside=inside,
            layout_id=uv_layout_id(model.uv),
            unmatched_faces=int((~matched).sum()),
        )

    def __call__(self, uv: np.ndarray) -> np.ndarray:
        """Mirror UV coordinates.

        Args:
            uv: ``(..., 2)`` float UV in [0, 1] (OBJ convention, v up).

        Returns:
            ``(..., 2) float32`` mirrored UV.
        """
        uv = np.asarray(uv, dtype=np.float64)
        if uv.shape[-1:] != (2,):
            raise InputError(f"UVMirror: uv has shape {uv.shape}, expected (..., 2)")
        R = self.resolution
        flat = uv.reshape(-1, 2)
        x = np.clip(flat[:, 0] * R - 0.5, 0.0, R - 1.0)
        y = np.clip(flat[:, 1] * R - 0.5, 0.0, R - 1.0)
        x0 = np.minimum(np.floor(x).astype(np.int64), R - 2)
        y0 = np.minimum(np.floor(y).astype(np.int64), R - 2)
        fx = (x - x0)[:, None]
        fy = (y - y0)[:, None]
        t = self.table
        c00, c01 = t[y0, x0].astype(np.float64), t[y0, x0 + 1].astype(np.float64)
        c10, c11 = t[y0 + 1, x0].astype(np.float64), t[y0 + 1, x0 + 1].astype(np.float64)
        out = (1 - fy) * ((1 - fx) * c00 + fx * c01) + fy * ((1 - fx) * c10 + fx * c11)
        stack = np.stack([c00, c01, c10, c11])  # (4, N, 2)
        spread = (stack.max(0) - stack.min(0)).max(1)
        jump = spread > self.jump
        if jump.any():
            xn = np.rint(x[jump]).astype(np.int64)
            yn = np.rint(y[jump]).astype(np.int64)
            out[jump] = t[yn, xn]
        return out.reshape(uv.shape).astype(np.float32)


# --------------------------------------------------------------------- helpers
def _resize_bilinear(a: np.ndarray, H: int, W: int) -> np.ndarray:
    """Bilinear resize of ``(h, w, C)`` to ``(H, W, C)`` (pixel centres aligned, no antialias)."""
    h, w = a.shape[:2]

    def coords(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1.0)
        i0 = np.minimum(np.floor(x).astype(np.int64), max(n_in - 2, 0))
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, x - i0

    y0, y1, fy = coords(H, h)
    x0, x1, fx = coords(W, w)
    fy = fy[:, None, None]
    fx = fx[None, :, None]
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bot = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy) + bot * fy


def _smooth_noise(rng: np.random.Generator, H: int, W: int, cells: int, channels: int) -> np.ndarray:
    """Random values on a coarse ``cells x cells`` grid, bilinearly upsampled to ``(H, W, C)``."""
    grid = rng.uniform(0.0, 1.0, (cells, cells, channels))
    return _resize_bilinear(grid, H, W)


def _random_texture(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """A random ``(H, W, 3)`` float texture in [0, 1]: solid+shading, smooth noise, or stripes."""
    kind = int(rng.integers(0, 4))
    c0 = rng.uniform(0.0, 1.0, 3)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    yy /= max(H, 1)
    xx /= max(W, 1)
    if kind == 0:  # solid colour with a soft linear shading
        a = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
        tex = c0 * (1.0 + rng.uniform(-0.4, 0.4) * (ramp - 0.5))
    elif kind == 1:  # two-colour linear gradient
        c1 = rng.uniform(0.0, 1.0, 3)
        a = rng.uniform(0, 2 * np.pi)
        ramp = np.clip(np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5) + 0.5, 0, 1)[..., None]
        tex = c0 * (1 - ramp) + c1 * ramp
    elif kind == 2:  # smooth colourful noise plus fine grain
        tex = _smooth_noise(rng, H, W, int(rng.integers(2, 9)), 3)
        tex = tex + 0.08 * _smooth_noise(rng, H, W, int(rng.integers(12, 33)), 3)
    else:  # stripes (fabric, blinds, tiles)
        c1 = rng.uniform(0.0, 1.0, 3)
        a = rng.uniform(0, np.pi)
        freq = rng.uniform(3.0, 25.0)
        s = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (np.cos(a) * xx + np.sin(a) * yy) + rng.uniform(0, 2 * np.pi))
        s = (s > 0.5).astype(np.float64)[..., None] if rng.uniform() < 0.5 else s[..., None]
        tex = c0 * (1 - s) + c1 * s
    return np.clip(tex, 0.0, 1.0)


# ------------------------------------------------------------------ photometric
def adjust_colour(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Random brightness, contrast, saturation, hue rotation and gamma.

    Args:
        image: ``(H, W, 3) float32`` RGB in [0, 1].
        rng: Generator.
        cfg: Ranges.

    Returns:
        ``(H, W, 3) float32`` in [0, 1].
    """
    x = np.asarray(image, dtype=np.float64)
    x = x * rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    grey = x @ np.array([0.299, 0.587, 0.114])  # (H, W) luma
    x = (x - grey.mean()) * rng.uniform(1 - cfg.contrast, 1 + cfg.contrast) + grey.mean()
    grey = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    x = grey + (x - grey) * rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    angle = np.deg2rad(rng.uniform(-cfg.hue_deg, cfg.hue_deg))
    # Rotation by `angle` about the grey axis a = (1, 1, 1) / sqrt(3) (Rodrigues):
    # M = cos I + sin [a]x + (1 - cos) a a^T; greys are fixed, chroma turns ("hue").
    a = np.full(3, 1.0 / np.sqrt(3.0))
    ax = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    M = np.cos(angle) * np.eye(3) + np.sin(angle) * ax + (1 - np.cos(angle)) * np.outer(a, a)
    # y[h, w, i] = sum_j M[i, j] * x[h, w, j]
    x = np.clip(x @ M.T, 0.0, 1.0)
    g = np.exp(rng.uniform(np.log(cfg.gamma[0]), np.log(cfg.gamma[1])))
    return np.power(x, g).astype(np.float32)


# ------------------------------------------------------ background and occluders
def random_background(
    rng: np.random.Generator, H: int, W: int, backgrounds: Sequence[np.ndarray] | None = None
) -> np.ndarray:
    """A random ``(H, W, 3) float32`` background in [0, 1].

    Args:
        rng: Generator.
        H: Rows.
        W: Columns.
        backgrounds: Optional photos (``(h, w, 3) uint8``); when given, half of the
            backgrounds are random crops of them (resized to ``H x W``), the rest generated.

    Returns:
        ``(H, W, 3) float32``.
    """
    if backgrounds and rng.uniform() < 0.5:
        photo = np.asarray(backgrounds[int(rng.integers(0, len(backgrounds)))], dtype=np.float64) / 255.0
        h, w = photo.shape[:2]
        side = int(rng.integers(max(1, min(h, w) // 2), min(h, w) + 1))
        r0 = int(rng.integers(0, h - side + 1))
        c0 = int(rng.integers(0, w - side + 1))
        return _resize_bilinear(photo[r0 : r0 + side, c0 : c0 + side], H, W).astype(np.float32)
    return _random_texture(rng, H, W).astype(np.float32)


def swap_background(
    image: np.ndarray,
    coverage: np.ndarray,
    rng: np.random.Generator,
    backgrounds: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Replace the pixels outside ``coverage`` with a random background.

    Args:
        image: ``(H, W, 3) float32`` in [0, 1].
        coverage: ``(H, W) bool`` pixels that show the head (kept).
        rng: Generator.
        backgrounds: Optional background photos (see :func:`random_background`).

    Returns:
        ``(H, W, 3) float32``.
    """
    H, W = coverage.shape
    bg = random_background(rng, H, W, backgrounds)
    return np.where(coverage[..., None], image, bg).astype(np.float32)


def _occluder_shape(rng: np.random.Generator, H: int, W: int, centre: np.ndarray, size: float) -> np.ndarray:
    """``(H, W) float`` coverage in [0, 1] of one random shape (rectangle, ellipse or blob)."""
    kind = int(rng.integers(0, 3))
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - centre[0], yy - centre[1]
    px, py = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's frame
    a = 0.5 * size
    b = 0.5 * size * rng.uniform(0.25, 1.0)
    if kind == 0:  # rotated rectangle: signed distance to the box, 1 px soft edge
        dist = np.maximum(np.abs(px) - a, np.abs(py) - b)
    else:
        r = np.sqrt((px / a) ** 2 + (py / b) ** 2)
        if kind == 2:  # blob: ellipse whose radius wobbles with the angle
            phi = np.arctan2(py / b, px / a)
            wobble = np.ones_like(phi)
            for k in range(2, 6):
                wobble += rng.uniform(0.0, 0.25 / k * 2) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
            r = r / np.maximum(wobble, 0.3)
        dist = (r - 1.0) * min(a, b)
    return np.clip(0.5 - dist, 0.0, 1.0)


def paint_occluders(
    image: np.ndarray, coverage: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1..``cfg.max_occluders`` textured shapes over the image, mostly on the head.

    The targets are not changed (see the module docstring).

    Args:
        image: ``(H, W, 3) float32`` in [0, 1].
        coverage: ``(H, W) bool`` head pixels (occluder centres are drawn among them).
        rng: Generator.
        cfg: Sizes and counts.

    Returns:
        ``(image (H, W, 3) float32, occluder (H, W) bool)`` where ``occluder`` marks
        pixels at least half covered by an occluder.
    """
    H, W = coverage.shape
    out = np.asarray(image, dtype=np.float64).copy()
    alpha_all = np.zeros((H, W))
    ys, xs = np.nonzero(coverage)
    for _ in range(int(rng.integers(1, cfg.max_occluders + 1))):
        if len(ys):
            k = int(rng.integers(0, len(ys)))
            centre = np.array([xs[k], ys[k]], dtype=np.float64)
        else:
            centre = rng.uniform(0, 1, 2) * np.array([W, H])
        size = rng.uniform(*cfg.occluder_size) * max(H, W)
        alpha = _occluder_shape(rng, H, W, centre, size)[..., None]
        out = out * (1 - alpha) + _random_texture(rng, H, W) * alpha
        alpha_all = np.maximum(alpha_all, alpha[..., 0])
    return np.clip(out, 0.0, 1.0).astype(np.float32), alpha_all >= 0.5


# --------------------------------------------------------------------------- flip
def _swap_left_right(name: str) -> str:
    return name.replace("left", "\0").replace("right", "left").replace("\0", "right")


def hflip_sample(sample: Mapping[str, Any], uv_mirror: UVMirror | None = None) -> dict[str, Any]:
    """Mirror a sample horizontally, with its targets.

    Keys used (all optional except ``image``): ``image (H, W, 3)``, ``normals (H, W, 3)``,
    ``uv (H, W, 2)``, ``mask``, ``coverage``, ``occluder`` ``(H, W) bool``, ``regions``
    (name -> ``(H, W) bool``; ``left_*`` and ``right_*`` names are swapped). Other keys
    are copied unchanged.

    Args:
        sample: The sample.
        uv_mirror: The layout's mirror map; required when the sample has ``uv``.

    Returns:
        A new dict with flipped arrays.

    Raises:
        InputError: ``uv`` present but no ``uv_mirror``.
    """
    out = dict(sample)
    for key in ("image", "rgb", "mask", "coverage", "occluder"):
        if key in sample and sample[key] is not None:
            out[key] = np.ascontiguousarray(np.asarray(sample[key])[:, ::-1])
    if sample.get("normals") is not None:
        n = np.ascontiguousarray(np.asarray(sample["normals"])[:, ::-1]).copy()
        # Camera space: the flipped image is the scene reflected by x -> -x in the camera
        # frame, and a reflection maps normals like points, so n_x changes sign.
        # Head space: that reflection A = Rc^T diag(-1, 1, 1) Rc turns the posed head
        # S = Rg C + t into A S = (A Rg M)(M C) + A t with M = diag(-1, 1, 1): the head
        # mirrored about FLAME's x = 0 plane (M C) under the rotation A Rg M. The
        # head-space normals of that head, (A Rg M)^T A n = M Rg^T n = M n_head, are the
        # old ones with n_x negated, whatever the camera.
        n[..., 0] = -n[..., 0]
        out["normals"] = np.where(n == 0, 0.0, n).astype(np.float32)  # no -0.0 on the background
    if sample.get("uv") is not None:
        if uv_mirror is None:
            raise InputError("hflip_sample: the sample has uv targets; pass the layout's UVMirror to flip them")
        uv = np.ascontiguousarray(np.asarray(sample["uv"])[:, ::-1])
        valid = out.get("coverage")
        if valid is None:
            valid = np.any(uv != 0, axis=-1)
        mirrored = np.zeros(uv.shape, dtype=np.float32)
        mirrored[valid] = uv_mirror(uv[valid])
        out["uv"] = mirrored
    if sample.get("regions") is not None:
        out["regions"] = {
            _swap_left_right(k): np.ascontiguousarray(np.asarray(v)[:, ::-1]) for k, v in sample["regions"].items()
        }
    return out


# ------------------------------------------------------------------------ pipeline
def augment_sample(
    sample: Mapping[str, Any],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    uv_mirror: UVMirror | None = None,
    backgrounds: Sequence[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Apply the random augmentations of ``cfg`` to one sample.

    Order: flip, background swap, occluders, colour jitter, blur, noise, JPEG. Each
    step first draws whether it runs, so the sequence of draws is fixed by the
    configuration and the generator.

    Args:
        sample: A :class:`p3dmm.training.dataset_format.DatasetReader` item or a dict with
            ``image (H, W, 3) float32 in [0, 1]`` (or ``rgb (H, W, 3) uint8``),
            ``coverage (H, W) bool`` and optionally ``normals``, ``uv``, ``mask``, ``regions``.
        rng: Generator (e.g. ``np.random.default_rng([seed, epoch, index])``).
        cfg: The augmentation configuration.
        uv_mirror: Mirror map of the UV layout (needed to flip ``uv``).
        backgrounds: Optional background photos ``(h, w, 3) uint8``.

    Returns:
        Dict with ``image (H, W, 3) float32`` in [0, 1], the (possibly flipped) targets,
        ``occluder (H, W) bool`` and ``flipped`` (bool). ``rgb`` is dropped.
    """
    out = {k: v for k, v in sample.items() if k != "rgb"}
    if "image" in sample:
        image = np.asarray(sample["image"], dtype=np.float32)
    elif "rgb" in sample:
        image = np.asarray(sample["rgb"], dtype=np.float32) / 255.0
    else:
        raise InputError("augment_sample: the sample has neither 'image' nor 'rgb'")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"augment_sample: image has shape {image.shape}, expected (H, W, 3)")
    H, W = image.shape[:2]
    coverage = np.asarray(sample["coverage"], dtype=bool)
    if coverage.shape != (H, W):
        raise InputError(f"augment_sample: coverage has shape {coverage.shape}, expected ({H}, {W})")
    out["image"] = image
    out["occluder"] = np.zeros((H, W), dtype=bool)
    out["flipped"] = False
    scale = max(H, W) / 512.0
    if rng.uniform() < cfg.flip_prob:
        out = hflip_sample(out, uv_mirror)
        out["flipped"] = True
        coverage = out["coverage"]
    if rng.uniform() < cfg.background_prob:
        out["image"] = swap_background(out["image"], coverage, rng, backgrounds)
    if rng.uniform() < cfg.occluder_prob:
        out["image"], out["occluder"] = paint_occluders(out["image"], coverage, rng, cfg)
    if rng.uniform() < cfg.colour_prob:
        out["image"] = adjust_colour(out["image"], rng, cfg)
    if rng.uniform() < cfg.blur_prob:
        out["image"] = gaussian_blur(np.asarray(out["image"], dtype=np.float32), rng.uniform(*cfg.blur_sigma) * scale)
    if rng.uniform() < cfg.noise_prob:
        out["image"] = luma_chroma_noise(out["image"], rng, rng.uniform(*cfg.noise_sigma))
    if rng.uniform() < cfg.jpeg_prob:
        quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
        out["image"] = jpeg_roundtrip(to_uint8(out["image"]), quality).astype(np.float32) / 255.0
    out["image"] = np.clip(out["image"], 0.0, 1.0).astype(np.float32)
    return out
