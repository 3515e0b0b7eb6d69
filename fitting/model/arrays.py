"""The arrays of a FLAME-topology head model: :class:`FlameArrays`, its UV layout and landmarks.

Following smplx's split, this layer only holds and validates arrays; the math lives in
:mod:`p3dmm.fitting.model.lbs` as pure functions over these arrays, and the model object
users hold (:class:`~p3dmm.fitting.model.flame_model.FlameModel`) adds the loaders and
the forward pass on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from ..base.errors import InputError
from ..base.xp import asarray_on, get_array_module, resolve_device
from .params import N_JOINTS, N_POSE_BASIS, FlameParams

__all__ = ["FlameArrays", "FlameUV", "LandmarkEmbedding"]

_Arrays = TypeVar("_Arrays", bound="FlameArrays")


@dataclass(frozen=True, eq=False)
class FlameUV:
    """UV layout of a FLAME-topology mesh.

    Attributes:
        vt: ``(T, 2) float32`` texture coordinates in [0, 1] (OBJ convention, v up).
        ft: ``(F, 3) int64`` per-face indices into ``vt`` (same face order as the mesh).
        vertex_uv: ``(V, 2) float32`` one UV per vertex; a seam vertex takes the first
            ``vt`` it is used with (lowest face index, then corner order).
        seam_vertices: ``(S,) int64`` vertices used with more than one ``vt``.
    """

    vt: np.ndarray
    ft: np.ndarray
    vertex_uv: np.ndarray
    seam_vertices: np.ndarray

    @staticmethod
    def from_faces(vt: np.ndarray, ft: np.ndarray, faces: np.ndarray, n_vertices: int) -> "FlameUV":
        """Build the per-vertex UV and seam list from an OBJ-style (vt, ft) pair.

        Args:
            vt: ``(T, 2)`` texture coordinates.
            ft: ``(F, 3)`` per-face texture indices.
            faces: ``(F, 3)`` per-face vertex indices.
            n_vertices: V.
        """
        vt = np.asarray(vt, dtype=np.float32)
        ft = np.asarray(ft, dtype=np.int64)
        faces = np.asarray(faces, dtype=np.int64)
        if ft.shape != faces.shape:
            raise InputError(f"UV faces ft have shape {ft.shape}, expected the mesh's face shape {faces.shape}")
        if ft.size and (ft.min() < 0 or ft.max() >= len(vt)):
            raise InputError(f"UV faces ft index outside vt (0..{len(vt) - 1})")
        fv = faces.reshape(-1)
        fu = ft.reshape(-1)
        # first occurrence of each vertex in face-major, corner-minor order
        order = np.argsort(fv, kind="stable")
        sv, su = fv[order], fu[order]
        first = np.ones(len(sv), dtype=bool)
        first[1:] = sv[1:] != sv[:-1]
        vertex_uv = np.zeros((n_vertices, 2), dtype=np.float32)
        vertex_uv[sv[first]] = vt[su[first]]
        # a vertex is a seam vertex if it is used with more than one distinct vt
        pairs = np.unique(np.stack([fv, fu], 1), axis=0)
        counts = np.bincount(pairs[:, 0], minlength=n_vertices)
        seam = np.nonzero(counts > 1)[0].astype(np.int64)
        return FlameUV(vt=vt, ft=ft, vertex_uv=vertex_uv, seam_vertices=seam)

    def layout_id(self) -> str:
        """Stable id of this layout: ``"uv-"`` + 16 hex digits of sha256(vt as little-endian
        float32, ft as little-endian int64). Training data, checkpoints and engine
        manifests record it, so the runtime can tell which model's UV a predictor outputs."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(np.asarray(self.vt, dtype="<f4")).tobytes())
        h.update(np.ascontiguousarray(np.asarray(self.ft, dtype="<i8")).tobytes())
        return "uv-" + h.hexdigest()[:16]

    def coverage(self, resolution: int = 512, margin: int = 2, faces: np.ndarray | None = None) -> np.ndarray:
        """``(resolution, resolution) bool``: the texels of the UV atlas that some UV triangle
        covers, dilated by ``margin`` texels; row 0 is v = 1 (image order, v up).

        A UV map in this layout reads UVs on the atlas only (up to the predictor's error);
        :func:`~p3dmm.fitting.fitter.conventions.uv_in_atlas` counts those that do.
        ``faces``: only these faces' UV triangles (e.g. a region's), else all.
        Memoised per layout and arguments.
        """
        subset = None if faces is None else np.unique(np.asarray(faces, dtype=np.int64))
        key = (resolution, margin, None if subset is None else hashlib.sha1(subset.tobytes()).hexdigest())
        cache = _COVERAGE.setdefault(self, {})
        if key not in cache:
            # Pillow's polygon fill: a scan-line fill of ~10k triangles, once per layout
            from PIL import Image, ImageDraw
            from scipy import ndimage

            img = Image.new("1", (resolution, resolution), 0)
            draw = ImageDraw.Draw(img)
            ft = self.ft if subset is None else self.ft[subset]
            tris = self.vt[ft].astype(np.float64) * [resolution, -resolution] + [0.0, resolution]
            for tri in tris:
                draw.polygon([(float(x), float(y)) for x, y in tri], fill=1)
            cov = np.asarray(img, dtype=bool)
            cache[key] = ndimage.binary_dilation(cov, iterations=margin) if margin > 0 else cov
        return cache[key]


#: FlameUV -> {(resolution, margin, face subset digest): coverage}
_COVERAGE: "weakref.WeakKeyDictionary[FlameUV, dict[tuple[int, int, str | None], np.ndarray]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class LandmarkEmbedding:
    """Landmarks as barycentric points on mesh faces.

    Attributes:
        static_faces: ``(51,) int64`` face index of each static landmark (``(0,)`` when
            only a dynamic or MediaPipe embedding was loaded).
        static_bary: ``(51, 3) float32`` barycentric coordinates.
        dynamic_faces: ``(79, 17) int64`` contour faces per yaw bin, or None.
        dynamic_bary: ``(79, 17, 3) float32`` or None.
        full_faces: ``(68,) int64`` (DECA ``full_lmk_faces_idx``) or None.
        full_bary: ``(68, 3) float32`` or None.
        mediapipe_faces: ``(105,) int64`` or None.
        mediapipe_bary: ``(105, 3) float32`` or None.
        mediapipe_indices: ``(105,) int64`` MediaPipe landmark ids, or None.
    """

    static_faces: np.ndarray
    static_bary: np.ndarray
    dynamic_faces: np.ndarray | None = None
    dynamic_bary: np.ndarray | None = None
    full_faces: np.ndarray | None = None
    full_bary: np.ndarray | None = None
    mediapipe_faces: np.ndarray | None = None
    mediapipe_bary: np.ndarray | None = None
    mediapipe_indices: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class FlameArrays:
    """Arrays of a FLAME-topology head model (FLAME 2020/2023 or the synthetic stand-in).

    Attributes:
        v_template: ``(V, 3)`` template vertices, metres.
        faces: ``(F, 3) int64`` triangle vertex indices (counter-clockwise seen from outside).
        shapedirs: ``(V, 3, n_shape + n_expr)`` identity then expression blend shapes.
        posedirs: ``(V, 3, 36)`` pose-corrective blend shapes (as stored in FLAME's pkl).
        J_regressor: ``(5, V)`` dense joint regressor.
        parents: ``(5,) int64`` kinematic tree, root parent -1.
        lbs_weights: ``(V, 5)`` skinning weights, rows sum to 1.
        n_shape: identity components in ``shapedirs``.
        n_expr: expression components in ``shapedirs``.
        uv: UV layout, or None when the model has none (fitting then refuses).
        landmarks: landmark embedding, or None.
        masks: region name -> ``(K,) int64`` vertex ids (FLAME_masks.pkl names).
        name: where the model came from (file path or ``synthetic(seed=...)``).

    All float arrays share one dtype (float32 unless loaded otherwise) and one array
    module; use :meth:`to` to move the arrays to CuPy. Copies made by :meth:`to`,
    :meth:`astype` and :meth:`truncated` keep the class of ``self``.
    """

    v_template: Any
    faces: Any
    shapedirs: Any
    posedirs: Any
    J_regressor: Any
    parents: np.ndarray
    lbs_weights: Any
    n_shape: int
    n_expr: int
    uv: FlameUV | None = None
    landmarks: LandmarkEmbedding | None = None
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        V = self.v_template.shape[0]
        checks = {
            "v_template": (self.v_template.shape, (V, 3)),
            "shapedirs": (self.shapedirs.shape, (V, 3, self.n_shape + self.n_expr)),
            "posedirs": (self.posedirs.shape, (V, 3, N_POSE_BASIS)),
            "J_regressor": (self.J_regressor.shape, (N_JOINTS, V)),
            "lbs_weights": (self.lbs_weights.shape, (V, N_JOINTS)),
            "parents": (tuple(self.parents.shape), (N_JOINTS,)),
        }
        for name, (got, want) in checks.items():
            if tuple(got) != want:
                raise InputError(f"FlameModel({self.name!r}): {name} has shape {tuple(got)}, expected {want}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise InputError(f"FlameModel({self.name!r}): faces has shape {tuple(self.faces.shape)}, expected (F, 3)")

    # ------------------------------------------------------------------ sizes
    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def dtype(self) -> Any:
        return self.v_template.dtype

    @property
    def xp(self) -> ModuleType:
        return get_array_module(self.v_template)

    def zero_params(self) -> FlameParams:
        return FlameParams.zeros(self.n_shape, self.n_expr, xp=self.xp, dtype=self.dtype)

    # ------------------------------------------------------------------ copies
    def to(self: _Arrays, device: str | ModuleType) -> _Arrays:
        """Copy with the arrays on ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy), or on an array module."""
        xp = resolve_device(device)
        names = ("v_template", "faces", "shapedirs", "posedirs", "J_regressor", "lbs_weights")
        return dataclasses.replace(self, **{n: asarray_on(xp, getattr(self, n)) for n in names})

    def astype(self: _Arrays, dtype: Any) -> _Arrays:
        """Copy with float arrays cast to ``dtype`` (e.g. float64 for gradient checks)."""
        names = ("v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights")
        return dataclasses.replace(self, **{n: getattr(self, n).astype(dtype) for n in names})

    def truncated(self: _Arrays, n_shape: int, n_expr: int) -> _Arrays:
        """Copy keeping the first ``n_shape`` identity and ``n_expr`` expression components."""
        if not (0 <= n_shape <= self.n_shape and 0 <= n_expr <= self.n_expr):
            raise InputError(
                f"truncated: n_shape={n_shape}, n_expr={n_expr} must be within 0..{self.n_shape}, 0..{self.n_expr}"
            )
        sd = self.shapedirs
        cols = sd[:, :, list(range(n_shape)) + list(range(self.n_shape, self.n_shape + n_expr))]
        return dataclasses.replace(self, shapedirs=cols, n_shape=n_shape, n_expr=n_expr)

    def fields(self) -> dict[str, Any]:
        """The dataclass fields as a dict (to build another class over the same arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(FlameArrays)}
