"""Triangle rasterization: per-pixel face id, perspective-correct barycentrics, depth.

One public function, :func:`rasterize`, with two implementations of the same
algorithm: numba on the CPU (NumPy input) and CUDA (``rasterize.cu`` beside this
module) on the GPU (CuPy input). They compute the same thing with the same arithmetic, so face ids
agree exactly and barycentrics/depth agree to the last bit in practice.

Algorithm (both backends):

1. Project every vertex: ``u = f * x / z + cx``, ``v = f * y / z + cy`` in float64,
   and snap ``(u, v)`` to a fixed-point grid with :data:`SUBPIXEL_BITS` fractional
   bits (1/256 px).
2. Per face: bounding box of the snapped vertices clipped to the image, exact int64
   edge functions at pixel centres with the **top-left fill rule**; for a covered
   pixel the perspective-correct depth is computed in float64 from the unsnapped
   positions, rounded to float32, and packed with the face id into a 64-bit key
   ``(float32 depth bits << 32) | face_id``. The z-buffer keeps the minimum key
   (``atomicMin`` on the GPU, a sequential compare on the CPU): nearest depth wins,
   equal depths go to the lowest face id, whatever the thread schedule.
3. Per pixel: unpack the winning key and compute the barycentrics of that face.

Conventions:
    * Pixel (row i, column j) is sampled at its centre ``(x, y) = (j, i)`` (OpenCV,
      see :mod:`p3dmm.fitting.base.camera`).
    * Fill rule: coverage is decided on the snapped positions with exact integer
      arithmetic; a pixel centre exactly on an edge belongs to the face for which that
      edge is a *top* edge (horizontal, interior below) or a *left* edge (interior to
      its right). Two faces sharing an edge therefore never both cover, and never both
      miss, a pixel centre on that edge: a closed or watertight mesh has no cracks and
      no double coverage.
    * Winding: FLAME faces are counter-clockwise seen from outside in FLAME's y-up
      frame. The OpenCV camera has y down, so a face whose outside is towards the
      camera projects with negative signed area
      ``(u1 - u0) * (v2 - v0) - (v1 - v0) * (u2 - u0) < 0`` (it still appears
      counter-clockwise on the displayed image). Equivalently its normal
      ``(p1 - p0) x (p2 - p0)`` points towards the camera. ``cull_backfaces=True``
      drops faces with positive area; zero-area faces are always dropped.
    * Near plane: a face with any vertex at ``z <= near`` (or a non-finite coordinate)
      is skipped entirely; there is no clipping. Faces with a vertex projecting to
      ``|u|`` or ``|v|`` above :data:`GUARD_BAND_PX` (2**21) pixels are skipped too (this
      keeps the int64 edge functions exact); for a 512 px image with a 30 cm field at
      1 m that is more than 89.9 degrees off-axis.
    * Empty pixels: ``face_id = -1``, ``bary = 0``, ``depth = 0``. A covered pixel always
      has ``depth > 0`` (pixels whose depth is not a finite positive float32 are not
      written), so ``depth > 0`` is also a coverage mask, and
      interpolating attributes with ``bary`` gives 0 on the background.
    * Barycentrics are computed from the unsnapped positions, so at pixels within
      1/512 px of an edge a weight can be very slightly negative.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import cuda
from ..base.camera import Camera
from ..base.errors import BackendUnavailableError, InputError
from ..base.xp import asarray_on, cupy_or_raise, get_array_module

__all__ = ["Fragments", "rasterize", "SUBPIXEL_BITS", "GUARD_BAND_PX", "DEFAULT_NEAR"]

#: Fractional bits of the fixed-point vertex positions used for coverage (1/256 px).
SUBPIXEL_BITS = 8
#: Faces with a vertex whose projected ``|u|`` or ``|v|`` exceeds this many pixels are skipped.
GUARD_BAND_PX = float(2**21)
#: Default near plane, metres.
DEFAULT_NEAR = 1e-6
#: Z-buffer value of an empty pixel (larger than every packed key).
EMPTY_KEY = np.uint64(0xFFFFFFFFFFFFFFFF)

# --fmad=false: no FMA contraction, so the GPU rounds exactly like the CPU kernels
_CUDA_OPTIONS = ("--std=c++17", "--fmad=false")
_CUDA_DEFINES = {"SUBPIXEL_BITS": SUBPIXEL_BITS, "GUARD_BAND_PX": GUARD_BAND_PX}
_BLOCK = 256


@dataclass(frozen=True, eq=False)
class Fragments:
    """Per-pixel rasterization result (NumPy or CuPy arrays, like the input vertices).

    Attributes:
        face_id: ``(H, W) int32`` index of the visible face, -1 where empty.
        bary: ``(H, W, 3) float32`` perspective-correct barycentric weights of the
            face's three vertices (in ``faces[face_id]`` order): interpolating the
            camera-frame vertices with them gives the 3D surface point seen through the
            pixel centre. 0 where empty.
        depth: ``(H, W) float32`` camera-frame z of that point, 0 where empty.
    """

    face_id: Any
    bary: Any
    depth: Any

    @property
    def mask(self) -> Any:
        """``(H, W) bool`` covered pixels."""
        return self.face_id >= 0


# --------------------------------------------------------------------------- validation


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _check_inputs(verts_cam: Any, faces: Any, camera: Any, near: Any) -> tuple[int, int, float]:
    """Check :func:`rasterize`'s arguments; return ``(height, width, near)`` as Python numbers."""
    fn = "rasterize"
    if not hasattr(verts_cam, "shape") or not hasattr(verts_cam, "dtype"):
        raise InputError(f"{fn}: verts_cam must be a NumPy or CuPy array, got {type(verts_cam).__name__}")
    if verts_cam.ndim != 2 or verts_cam.shape[1] != 3:
        raise InputError(f"{fn}: verts_cam has shape {tuple(verts_cam.shape)}, expected (V, 3)")
    if verts_cam.dtype not in (np.float32, np.float64):
        raise InputError(f"{fn}: verts_cam has dtype {verts_cam.dtype}, expected float32 (or float64)")
    if not hasattr(faces, "shape") or not hasattr(faces, "dtype"):
        raise InputError(f"{fn}: faces must be a NumPy or CuPy array, got {type(faces).__name__}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"{fn}: faces has shape {tuple(faces.shape)}, expected (F, 3)")
    if faces.dtype.kind not in ("i", "u"):
        raise InputError(f"{fn}: faces has dtype {faces.dtype}, expected an integer dtype (int32 or int64)")
    if faces.shape[0] >= 2**31 - 1 or verts_cam.shape[0] >= 2**31 - 1:
        raise InputError(f"{fn}: got {faces.shape[0]} faces and {verts_cam.shape[0]} vertices, expected < 2**31 - 1")
    if not isinstance(camera, Camera):
        raise InputError(f"{fn}: camera is a {type(camera).__name__}, expected p3dmm.fitting.Camera")
    if tuple(np.shape(camera.focal)) not in ((), (1,)):
        raise InputError(f"{fn}: camera.focal has shape {tuple(np.shape(camera.focal))}, expected a scalar")
    if get_array_module(camera.focal) is np:  # a device scalar is not read: that would synchronise
        f = float(np.asarray(camera.focal).reshape(()))
        if not (np.isfinite(f) and f > 0):
            raise InputError(f"{fn}: camera.focal is {f}, expected a finite positive focal length in pixels")
    height, width = camera.height, camera.width
    if not (_is_int(height) and _is_int(width)) or int(height) <= 0 or int(width) <= 0:
        raise InputError(f"{fn}: camera size {width!r}x{height!r}, expected positive integers")
    if int(height) * int(width) >= 2**31:
        raise InputError(f"{fn}: image {height}x{width} has >= 2**31 pixels")
    if not isinstance(near, (int, float, np.integer, np.floating)) or not (np.isfinite(near) and near > 0):
        raise InputError(f"{fn}: near is {near!r}, expected a finite positive distance in metres")
    return int(height), int(width), float(near)


# ------------------------------------------------------------------------ public function


def rasterize(
    verts_cam: Any,
    faces: Any,
    camera: Camera,
    height: int | None = None,
    width: int | None = None,
    cull_backfaces: bool = False,
    near: float = DEFAULT_NEAR,
) -> Fragments:
    """Rasterize a triangle mesh already in the OpenCV camera frame.

    Runs on the CPU (numba) for NumPy ``verts_cam`` and on the GPU (CUDA) for CuPy
    ``verts_cam``; both give identical face ids. See the module docstring for the fill
    rule, winding, near-plane and empty-pixel conventions.

    Args:
        verts_cam: ``(V, 3) float32`` vertices in the camera frame (x right, y down,
            z forward, metres); float64 is accepted too (computed in float64 either way).
        faces: ``(F, 3)`` int32/int64 vertex indices; moved to ``verts_cam``'s device
            if needed.
        camera: its intrinsics (``focal``, ``principal``) and its image size
            (``height x width``) are used; the extrinsics are not (the vertices are
            already in the camera frame). For another resolution pass
            ``camera.scaled(width, height)``.
        height, width: deprecated; the image size is ``camera.height x camera.width``.
            When given they must equal it.
        cull_backfaces: drop faces whose projection is clockwise as displayed (normal
            pointing away from the camera).
        near: faces with a vertex at ``z <= near`` metres are skipped (no clipping).

    Returns:
        :class:`Fragments` with ``face_id (H, W) int32``, ``bary (H, W, 3) float32``,
        ``depth (H, W) float32`` on the array module of ``verts_cam``.

    Raises:
        InputError: a wrong shape, dtype or value; the CPU path also rejects face
            indices outside ``[0, V)`` (the GPU path skips such faces instead of
            synchronising to check).
        BackendUnavailableError: numba (CPU) or a CUDA device (GPU) is missing.
    """
    if height is not None or width is not None:
        if not (_is_int(height) and _is_int(width)) or int(height) <= 0 or int(width) <= 0:  # type: ignore[arg-type]
            raise InputError(f"rasterize: height, width = {height!r}, {width!r}, expected positive integers")
        if (height, width) != (getattr(camera, "height", None), getattr(camera, "width", None)):
            raise InputError(
                f"rasterize: height, width = {height!r}, {width!r} differ from the camera's "
                f"{getattr(camera, 'height', '?')}x{getattr(camera, 'width', '?')}; pass camera.scaled(width, height)"
            )
        warnings.warn(
            "rasterize(..., height, width) is deprecated: the camera carries the image size",
            DeprecationWarning,
            stacklevel=2,
        )
    height, width, near = _check_inputs(verts_cam, faces, camera, near)
    xp = get_array_module(verts_cam)
    verts64 = xp.ascontiguousarray(verts_cam, dtype=xp.float64)
    faces32 = xp.ascontiguousarray(asarray_on(xp, faces), dtype=xp.int32)
    # intr = [focal, cx, cy] in float64 on the vertices' device (no host sync on GPU)
    intr = xp.concatenate(
        [asarray_on(xp, camera.focal, xp.float64).reshape(1), asarray_on(xp, camera.principal, xp.float64)]
    )
    if xp is np:
        if faces32.size and (int(faces32.min()) < 0 or int(faces32.max()) >= verts64.shape[0]):
            raise InputError(
                f"rasterize: faces index range [{int(faces32.min())}, {int(faces32.max())}], "
                f"expected within [0, {verts64.shape[0] - 1}]"
            )
        return _rasterize_cpu(verts64, faces32, intr, height, width, bool(cull_backfaces), near)
    return _rasterize_cuda(verts64, faces32, intr, height, width, bool(cull_backfaces), near)


# ---------------------------------------------------------------------------- CPU (numba)
#
# Plain Python functions, compiled with numba.njit(cache=True) on first use so that
# importing p3dmm.fitting does not import numba. The kernels call the helpers through
# module globals that _cpu_kernels() rebinds to their jitted versions before the
# kernels are compiled. Each function mirrors the CUDA function of the same name in
# rasterize.cu, with the same operation order.


def _perspective_weights(u0, v0, u1, v1, u2, v2, z0, z1, z2, px, py):  # type: ignore[no-untyped-def]
    a0 = (u1 - px) * (v2 - py) - (v1 - py) * (u2 - px)
    a1 = (u2 - px) * (v0 - py) - (v2 - py) * (u0 - px)
    a2 = (u0 - px) * (v1 - py) - (v0 - py) * (u1 - px)
    w0 = a0 / z0
    w1 = a1 / z1
    w2 = a2 / z2
    s = (w0 + w1) + w2
    depth = ((a0 + a1) + a2) / s
    return w0 / s, w1 / s, w2 / s, depth


def _edge_function(ax, ay, bx, by, px, py):  # type: ignore[no-untyped-def]
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax)


def _fill_bias(ax, ay, bx, by):  # type: ignore[no-untyped-def]
    dx = bx - ax
    dy = by - ay
    if dy < 0 or (dy == 0 and dx > 0):
        return 0
    return -1


def _project_vertices(verts, intr, near_z, guard, uv, fixed_uv, vert_ok):  # type: ignore[no-untyped-def]
    f = intr[0]
    scale = float(1 << SUBPIXEL_BITS)
    for i in range(verts.shape[0]):
        x = verts[i, 0]
        y = verts[i, 1]
        z = verts[i, 2]
        u = f * x / z + intr[1]
        v = f * y / z + intr[2]
        ok = (
            np.isfinite(x)
            and np.isfinite(y)
            and np.isfinite(z)
            and z > near_z
            and np.isfinite(u)
            and np.isfinite(v)
            and abs(u) <= guard
            and abs(v) <= guard
        )
        uv[i, 0] = u
        uv[i, 1] = v
        if ok:
            fixed_uv[i, 0] = np.int64(np.rint(u * scale))
            fixed_uv[i, 1] = np.int64(np.rint(v * scale))
            vert_ok[i] = 1
        else:
            fixed_uv[i, 0] = 0
            fixed_uv[i, 1] = 0
            vert_ok[i] = 0


def _raster_faces(faces, verts, uv, fixed_uv, vert_ok, height, width, cull_backfaces, zbuf):  # type: ignore[no-untyped-def]
    shift = SUBPIXEL_BITS
    # float32 <-> uint32 bit casts through a one-element scratch buffer
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    for f in range(faces.shape[0]):
        i0 = faces[f, 0]
        i1 = faces[f, 1]
        i2 = faces[f, 2]
        if vert_ok[i0] == 0 or vert_ok[i1] == 0 or vert_ok[i2] == 0:
            continue
        x0 = fixed_uv[i0, 0]
        y0 = fixed_uv[i0, 1]
        x1 = fixed_uv[i1, 0]
        y1 = fixed_uv[i1, 1]
        x2 = fixed_uv[i2, 0]
        y2 = fixed_uv[i2, 1]
        area = _edge_function(x0, y0, x1, y1, x2, y2)
        if area == 0:
            continue
        if cull_backfaces and area > 0:
            continue
        if area < 0:
            x1, x2 = x2, x1
            y1, y2 = y2, y1
        col_lo = max(0, -((-min(x0, x1, x2)) >> shift))
        col_hi = min(width - 1, max(x0, x1, x2) >> shift)
        row_lo = max(0, -((-min(y0, y1, y2)) >> shift))
        row_hi = min(height - 1, max(y0, y1, y2) >> shift)
        if col_lo > col_hi or row_lo > row_hi:
            continue
        bias12 = _fill_bias(x1, y1, x2, y2)
        bias20 = _fill_bias(x2, y2, x0, y0)
        bias01 = _fill_bias(x0, y0, x1, y1)
        u0 = uv[i0, 0]
        v0 = uv[i0, 1]
        u1 = uv[i1, 0]
        v1 = uv[i1, 1]
        u2 = uv[i2, 0]
        v2 = uv[i2, 1]
        z0 = verts[i0, 2]
        z1 = verts[i1, 2]
        z2 = verts[i2, 2]
        face_bits = np.uint64(f)
        for row in range(row_lo, row_hi + 1):
            py = np.int64(row) << shift
            for col in range(col_lo, col_hi + 1):
                px = np.int64(col) << shift
                if _edge_function(x1, y1, x2, y2, px, py) + bias12 < 0:
                    continue
                if _edge_function(x2, y2, x0, y0, px, py) + bias20 < 0:
                    continue
                if _edge_function(x0, y0, x1, y1, px, py) + bias01 < 0:
                    continue
                _, _, _, depth = _perspective_weights(u0, v0, u1, v1, u2, v2, z0, z1, z2, float(col), float(row))
                depth32 = np.float32(depth)
                if not (depth32 > 0) or np.isinf(depth32):
                    continue
                scratch[0] = depth32
                key = (np.uint64(scratch_bits[0]) << np.uint64(32)) | face_bits
                p = row * width + col
                if key < zbuf[p]:
                    zbuf[p] = key


def _resolve_pixels(zbuf, faces, verts, uv, height, width, face_id, bary, depth_out):  # type: ignore[no-untyped-def]
    empty = np.uint64(0xFFFFFFFFFFFFFFFF)
    low = np.uint64(0xFFFFFFFF)
    scratch = np.empty(1, dtype=np.float32)
    scratch_bits = scratch.view(np.uint32)
    for row in range(height):
        for col in range(width):
            key = zbuf[row * width + col]
            if key == empty:
                face_id[row, col] = -1
                bary[row, col, 0] = 0.0
                bary[row, col, 1] = 0.0
                bary[row, col, 2] = 0.0
                depth_out[row, col] = 0.0
                continue
            f = np.int64(key & low)
            i0 = faces[f, 0]
            i1 = faces[f, 1]
            i2 = faces[f, 2]
            b0, b1, b2, _ = _perspective_weights(
                uv[i0, 0], uv[i0, 1], uv[i1, 0], uv[i1, 1], uv[i2, 0], uv[i2, 1],
                verts[i0, 2], verts[i1, 2], verts[i2, 2], float(col), float(row),
            )  # fmt: skip
            face_id[row, col] = f
            bary[row, col, 0] = np.float32(b0)
            bary[row, col, 1] = np.float32(b1)
            bary[row, col, 2] = np.float32(b2)
            scratch_bits[0] = np.uint32(key >> np.uint64(32))
            depth_out[row, col] = scratch[0]


_cpu_lock = threading.Lock()
_cpu_ready = False


def _cpu_kernels() -> None:
    """JIT the numba kernels once (helpers first, then the kernels that call them)."""
    global _cpu_ready, _perspective_weights, _edge_function, _fill_bias
    global _project_vertices, _raster_faces, _resolve_pixels
    if _cpu_ready:
        return
    with _cpu_lock:
        if _cpu_ready:
            return
        try:
            import numba
        except ImportError as e:  # pragma: no cover - numba is a core dependency
            raise BackendUnavailableError("rasterize on the CPU needs numba: pip install numba") from e
        # error_model="numpy": IEEE division (inf/nan, no ZeroDivisionError), as on the GPU
        jit = numba.njit(cache=True, nogil=True, error_model="numpy")
        _perspective_weights = jit(_perspective_weights)
        _edge_function = jit(_edge_function)
        _fill_bias = jit(_fill_bias)
        _project_vertices = jit(_project_vertices)
        _raster_faces = jit(_raster_faces)
        _resolve_pixels = jit(_resolve_pixels)
        _cpu_ready = True


def _rasterize_cpu(
    verts: np.ndarray, faces: np.ndarray, intr: np.ndarray, height: int, width: int, cull: bool, near: float
) -> Fragments:
    """Launch the numba kernels (arrays already validated, contiguous, float64/int32)."""
    _cpu_kernels()
    V = verts.shape[0]
    uv = np.empty((V, 2), dtype=np.float64)
    fixed_uv = np.empty((V, 2), dtype=np.int64)
    vert_ok = np.empty(V, dtype=np.int32)
    zbuf = np.full(height * width, EMPTY_KEY, dtype=np.uint64)
    face_id = np.empty((height, width), dtype=np.int32)
    bary = np.empty((height, width, 3), dtype=np.float32)
    depth = np.empty((height, width), dtype=np.float32)
    _project_vertices(verts, intr, float(near), GUARD_BAND_PX, uv, fixed_uv, vert_ok)
    _raster_faces(faces, verts, uv, fixed_uv, vert_ok, np.int64(height), np.int64(width), bool(cull), zbuf)
    _resolve_pixels(zbuf, faces, verts, uv, np.int64(height), np.int64(width), face_id, bary, depth)
    return Fragments(face_id=face_id, bary=bary, depth=depth)


# ------------------------------------------------------------------------------ GPU (CUDA)


def _rasterize_cuda(verts: Any, faces: Any, intr: Any, height: int, width: int, cull: bool, near: float) -> Fragments:
    """Launch the kernels of ``rasterize.cu`` (arrays already on the device)."""
    cp = cupy_or_raise()
    module = cuda.load_module("p3dmm.fitting.render", "rasterize", defines=_CUDA_DEFINES, options=_CUDA_OPTIONS)
    for name, arr, dtype in (("verts", verts, cp.float64), ("faces", faces, cp.int32), ("intr", intr, cp.float64)):
        if arr.dtype != dtype or not arr.flags.c_contiguous:  # pragma: no cover - guaranteed by rasterize()
            raise InputError(f"rasterize (cuda): {name} must be C-contiguous {np.dtype(dtype)}, got {arr.dtype}")
    V, F, P = int(verts.shape[0]), int(faces.shape[0]), height * width
    uv = cp.empty((V, 2), dtype=cp.float64)
    fixed_uv = cp.empty((V, 2), dtype=cp.int64)
    vert_ok = cp.empty(V, dtype=cp.int32)
    zbuf = cp.full(P, EMPTY_KEY, dtype=cp.uint64)
    face_id = cp.empty((height, width), dtype=cp.int32)
    bary = cp.empty((height, width, 3), dtype=cp.float32)
    depth = cp.empty((height, width), dtype=cp.float32)

    def grid(n: int) -> tuple[int]:
        return ((n + _BLOCK - 1) // _BLOCK,)

    if V > 0:
        module.get_function("project_vertices")(
            grid(V), (_BLOCK,), (verts, np.int32(V), intr, np.float64(near), uv, fixed_uv, vert_ok)
        )
    if F > 0 and V > 0:
        module.get_function("raster_faces")(
            grid(F),
            (_BLOCK,),
            (
                faces, np.int32(F), np.int32(V), verts, uv, fixed_uv, vert_ok,
                np.int32(height), np.int32(width), np.int32(1 if cull else 0), zbuf,
            ),
        )  # fmt: skip
    module.get_function("resolve_pixels")(
        grid(P),
        (_BLOCK,),
        (zbuf, faces, verts, uv, np.int32(height), np.int32(width), face_id, bary, depth),
    )
    return Fragments(face_id=face_id, bary=bary, depth=depth)
