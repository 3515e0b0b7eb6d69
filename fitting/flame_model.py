"""FLAME model container and parameter set.

Following smplx's split, :class:`FlameModel` only loads and holds arrays; the math
lives in :mod:`p3dmm.fitting.lbs` as pure functions over an array module, and the
fitter holds optimisation state.

Conventions (identical to the reference FLAME layer, smplx ``FLAME``):
    * joints 0 global, 1 neck, 2 jaw, 3 left eye, 4 right eye; parents [-1, 0, 1, 1, 1]
    * pose: 5 axis-angle vectors in that joint order, ``(5, 3)`` (15 values)
    * translation is added after skinning
    * geometry in metres, FLAME frame: y up, z towards the face's front
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from os import PathLike
from types import ModuleType
from typing import Any, Mapping

import numpy as np

from .errors import InputError
from .xp import asarray_on, get_array_module, to_numpy

__all__ = ["FlameModel", "FlameParams", "FlameUV", "LandmarkEmbedding", "N_JOINTS", "FLAME_PARENTS"]

N_JOINTS = 5
FLAME_PARENTS = np.array([-1, 0, 1, 1, 1], dtype=np.int64)
JOINT_NAMES = ("global", "neck", "jaw", "left_eye", "right_eye")


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


@dataclass
class FlameParams:
    """FLAME parameters of one head.

    Attributes:
        shape: ``(n_shape,)`` identity coefficients (units of standard deviations).
        expr: ``(n_expr,)`` expression coefficients.
        pose: ``(5, 3)`` axis-angle rotations: global, neck, jaw, left eye, right eye.
        transl: ``(3,)`` translation in metres, added after skinning.
    """

    shape: Any
    expr: Any
    pose: Any
    transl: Any

    @staticmethod
    def zeros(n_shape: int = 300, n_expr: int = 100, xp: ModuleType = np, dtype: Any = np.float32) -> "FlameParams":
        """All-zero parameters (the template head)."""
        return FlameParams(
            shape=xp.zeros(n_shape, dtype=dtype),
            expr=xp.zeros(n_expr, dtype=dtype),
            pose=xp.zeros((N_JOINTS, 3), dtype=dtype),
            transl=xp.zeros(3, dtype=dtype),
        )

    @property
    def n_values(self) -> int:
        return int(self.shape.shape[0] + self.expr.shape[0] + 3 * N_JOINTS + 3)

    def to_vector(self) -> Any:
        """Concatenate to ``(n_shape + n_expr + 15 + 3,)`` in the order shape, expr, pose, transl."""
        xp = get_array_module(self.shape)
        return xp.concatenate([self.shape.ravel(), self.expr.ravel(), self.pose.ravel(), self.transl.ravel()])

    @staticmethod
    def from_vector(x: Any, n_shape: int, n_expr: int) -> "FlameParams":
        """Inverse of :meth:`to_vector`."""
        n = n_shape + n_expr + 3 * N_JOINTS + 3
        if x.shape != (n,):
            raise InputError(f"FlameParams.from_vector: got shape {tuple(x.shape)}, expected ({n},)")
        a, b, c = n_shape, n_shape + n_expr, n_shape + n_expr + 3 * N_JOINTS
        return FlameParams(shape=x[:a], expr=x[a:b], pose=x[b:c].reshape(N_JOINTS, 3), transl=x[c:])

    def astype(self, xp: ModuleType, dtype: Any = np.float32) -> "FlameParams":
        """Copy onto array module ``xp`` with ``dtype``."""
        return FlameParams(*(asarray_on(xp, getattr(self, f.name), dtype) for f in dataclasses.fields(self)))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready dict of host lists."""
        return {f.name: to_numpy(getattr(self, f.name)).tolist() for f in dataclasses.fields(self)}

    @staticmethod
    def from_dict(d: Mapping[str, Any], dtype: Any = np.float32) -> "FlameParams":
        try:
            return FlameParams(
                shape=np.asarray(d["shape"], dtype=dtype),
                expr=np.asarray(d["expr"], dtype=dtype),
                pose=np.asarray(d["pose"], dtype=dtype).reshape(N_JOINTS, 3),
                transl=np.asarray(d["transl"], dtype=dtype),
            )
        except KeyError as e:
            raise InputError(f"FlameParams dict lacks key {e}; expected shape, expr, pose, transl") from e


@dataclass(frozen=True, eq=False)
class FlameModel:
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
    module; use :meth:`to` to move the model to CuPy.
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
            "posedirs": (self.posedirs.shape, (V, 3, 9 * (N_JOINTS - 1))),
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

    # ------------------------------------------------------------ constructors
    @staticmethod
    def load(
        path: str | PathLike[str],
        uv: str | PathLike[str] | np.ndarray | None = None,
        landmarks: str | PathLike[str] | list[str | PathLike[str]] | None = None,
        mediapipe_landmarks: str | PathLike[str] | None = None,
        masks: str | PathLike[str] | None = None,
        n_shape: int = 300,
        n_expr: int = 100,
        dtype: Any = np.float32,
    ) -> "FlameModel":
        """Load real FLAME files (FLAME 2020 / 2023 / 2023 Open pickles, or .npz).

        Args:
            path: ``generic_model.pkl``, ``flame2023.pkl``, ``flame2023_no_jaw.pkl`` or
                ``flame2023_Open.pkl`` (chumpy pickles are read without chumpy).
            uv: ``head_template.obj`` (vt/f with texture indices), or a ``(V, 2)`` array.
            landmarks: ``landmark_embedding.npy`` (DECA/MICA layout, torch tensors
                inside are read without torch), FLAME's ``flame_static_embedding.pkl``
                and/or ``flame_dynamic_embedding.npy``, or a list of these (merged).
            mediapipe_landmarks: ``mediapipe_landmark_embedding.npz``.
            masks: ``FLAME_masks.pkl``.
            n_shape: identity components kept (<= what the file has).
            n_expr: expression components kept.
            dtype: float dtype of the arrays.

        Raises:
            ModelFileError: a file is missing, truncated, of the wrong kind, or lacks a
                key / has a key of the wrong shape; the message names file and key.
        """
        from . import flame_io

        return flame_io.load_flame_model(
            path,
            uv=uv,
            landmarks=landmarks,
            mediapipe_landmarks=mediapipe_landmarks,
            masks=masks,
            n_shape=n_shape,
            n_expr=n_expr,
            dtype=dtype,
        )

    @staticmethod
    def synthetic(seed: int = 0, dtype: Any = np.float32) -> "FlameModel":
        """A generated stand-in head with FLAME's exact dimensions (see ``synthetic_head``)."""
        from .synthetic_head import build_synthetic_flame

        return build_synthetic_flame(seed=seed, dtype=dtype)

    # ------------------------------------------------------------------- math
    def vertices(self, params: FlameParams) -> Any:
        """Posed vertices ``(V, 3)`` in the model's dtype and array module."""
        from .lbs import flame_forward

        return flame_forward(self, params)[0]

    def neutral_vertices(self, params: FlameParams) -> Any:
        """Vertices with the params' identity, zero expression, zero pose and no translation."""
        xp = self.xp
        p = FlameParams(
            shape=params.shape,
            expr=xp.zeros_like(params.expr),
            pose=xp.zeros_like(params.pose),
            transl=xp.zeros_like(params.transl),
        )
        return self.vertices(p)

    def zero_params(self) -> FlameParams:
        return FlameParams.zeros(self.n_shape, self.n_expr, xp=self.xp, dtype=self.dtype)

    # --------------------------------------------------------------- devices
    def to(self, device: str) -> "FlameModel":
        """Copy of the model with its arrays on ``"cpu"`` (NumPy) or ``"cuda"`` (CuPy)."""
        from .xp import device_of

        xp = device_of(device)
        names = ("v_template", "faces", "shapedirs", "posedirs", "J_regressor", "lbs_weights")
        return dataclasses.replace(self, **{n: asarray_on(xp, getattr(self, n)) for n in names})

    def astype(self, dtype: Any) -> "FlameModel":
        """Copy with float arrays cast to ``dtype`` (e.g. float64 for gradient checks)."""
        names = ("v_template", "shapedirs", "posedirs", "J_regressor", "lbs_weights")
        return dataclasses.replace(self, **{n: getattr(self, n).astype(dtype) for n in names})

    def truncated(self, n_shape: int, n_expr: int) -> "FlameModel":
        """Copy keeping the first ``n_shape`` identity and ``n_expr`` expression components."""
        if not (0 <= n_shape <= self.n_shape and 0 <= n_expr <= self.n_expr):
            raise InputError(
                f"truncated: n_shape={n_shape}, n_expr={n_expr} must be within 0..{self.n_shape}, 0..{self.n_expr}"
            )
        sd = self.shapedirs
        cols = sd[:, :, list(range(n_shape)) + list(range(self.n_shape, self.n_shape + n_expr))]
        return dataclasses.replace(self, shapedirs=cols, n_shape=n_shape, n_expr=n_expr)

    def write(self, directory: str | PathLike[str], chumpy_style: bool = False) -> dict[str, str]:
        """Write FLAME-format files (model pkl, head_template.obj, landmark embeddings, masks).

        Returns a dict kind -> path of what was written. See ``flame_io.write_flame_files``.
        """
        from . import flame_io

        return flame_io.write_flame_files(self, directory, chumpy_style=chumpy_style)
