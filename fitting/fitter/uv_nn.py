"""UV nearest-neighbour search: FLAME template UVs -> pixels of a predicted UV map.

For every query UV ``T_v`` (a FLAME vertex's template UV) the fitter needs the pixel
``p*`` of the predicted UV map ``U(I)`` whose UV is nearest,

    p*_v = argmin_{p in mask} ||T_v - U(I)_p||^2,

computed once per image. This module defines that search *exactly* and gives several
implementations that return bit-identical results:

* :func:`uv_nearest_pixels_bruteforce` -- the definition, chunked, on NumPy or CuPy.
* ``method="kdtree"`` (NumPy default) -- :class:`scipy.spatial.cKDTree` over the
  de-duplicated masked UVs, then an exact float32 re-ranking of every candidate that
  could tie (see :func:`_kdtree_search`).
* ``method="grid"`` (NumPy) -- a uniform-grid search, the line-for-line CPU (numba)
  emulation of the CUDA kernel, so its logic is tested without a GPU.
* ``method="cuda"`` (CuPy default) -- the same uniform-grid search as a CUDA kernel
  (``uv_nn.cu``), no host round-trip.

Exact semantics (all methods):

* A pixel takes part iff ``mask`` is True and both of its UV channels are finite; NaN
  (or inf) pixels are treated as unmasked.
* The squared distance is evaluated in float32 with one rounding per operation and no
  fused multiply-add: ``dx = fl(qu - u)``, ``dy = fl(qv - v)``,
  ``d = fl(fl(dx*dx) + fl(dy*dy))``.
* The result is the pixel with the smallest ``d``; ties (equal float32 ``d``, common in
  rendered maps with duplicated UVs) go to the lowest flat pixel index
  ``row * W + col``. A pixel whose ``d`` is ``+inf`` (overflow) is never chosen.
* A query with no candidate (empty mask, or a non-finite query) gets index ``-1`` and
  distance ``+inf``. An empty mask is not an error here; the fitter decides.
"""

from __future__ import annotations

import functools
import math
from types import ModuleType
from typing import Any

import numpy as np

from ..base import cuda
from ..base.errors import BackendUnavailableError, InputError
from ..base.xp import asarray_on, get_array_module

__all__ = [
    "DEFAULT_GRID_SIZE",
    "DEFAULT_DELTA_UV_SQ",
    "uv_nearest_pixels",
    "uv_nearest_pixels_bruteforce",
    "uv_targets",
    "build_uv_grid_reference",
]

#: Cells per axis of the uniform grid over UV space [0, 1]^2 (a power of two).
DEFAULT_GRID_SIZE = 64
#: Threshold on the squared UV distance below which a correspondence is valid
#: (the public Pixel3DMM tracker's value).
DEFAULT_DELTA_UV_SQ = 5e-5

_METHODS = ("auto", "kdtree", "grid", "bruteforce", "cuda")
# Relative and absolute slack of the k-d tree candidate radius; see _kdtree_search.
_KDTREE_REL_SLACK = 2.0**-18
_KDTREE_ABS_SLACK = 1e-38
_INT32_MAX = np.iinfo(np.int32).max


# ---------------------------------------------------------------- validation
def _check_inputs(fn: str, query_uv: Any, uv_map: Any, mask: Any) -> tuple[ModuleType, Any, Any, Any, int, int]:
    """Validate and normalise the three inputs of a search.

    Returns:
        ``(xp, query (Q, 2) float32, uv (H*W, 2) float32, valid (H*W,) bool, H, W)``,
        all C-contiguous on the array module ``xp`` of the inputs; ``valid`` is
        ``mask`` with non-finite UV pixels removed. For a stack of maps (``uv_map``
        ``(B, H, W, 2)``, ``mask`` ``(B, H, W)``) ``uv`` is ``(B, H*W, 2)`` and ``valid``
        ``(B, H*W)``.
    """
    xp = get_array_module(query_uv, uv_map, mask)
    q = asarray_on(xp, query_uv)
    uv = asarray_on(xp, uv_map)
    m = asarray_on(xp, mask)
    if q.ndim != 2 or q.shape[1] != 2:
        raise InputError(f"{fn}: query_uv has shape {tuple(q.shape)}, expected (Q, 2)")
    if uv.ndim not in (3, 4) or uv.shape[-1] != 2:
        raise InputError(
            f"{fn}: uv_map has shape {tuple(uv.shape)}, expected (H, W, 2) channels-last, or a stack "
            "(B, H, W, 2) (transpose a (2, H, W) network output with .transpose(1, 2, 0))"
        )
    lead = tuple(int(n) for n in uv.shape[:-3])
    h, w = int(uv.shape[-3]), int(uv.shape[-2])
    if tuple(m.shape) != (*lead, h, w):
        raise InputError(f"{fn}: mask has shape {tuple(m.shape)}, expected {(*lead, h, w)} like uv_map")
    for name, a in (("query_uv", q), ("uv_map", uv)):
        if a.dtype.kind != "f":
            raise InputError(f"{fn}: {name} has dtype {a.dtype}, expected a floating dtype (float32)")
    if m.dtype != np.bool_:
        raise InputError(f"{fn}: mask has dtype {m.dtype}, expected bool (e.g. mask_prob > 0.5)")
    if math.prod(lead) * h * w >= _INT32_MAX:
        raise InputError(f"{fn}: uv_map has {math.prod(lead) * h * w} pixels, at most {_INT32_MAX - 1} are supported")
    q = xp.ascontiguousarray(q, dtype=xp.float32)
    uv = xp.ascontiguousarray(uv, dtype=xp.float32).reshape(*lead, h * w, 2)
    valid = m.reshape(*lead, h * w) & xp.isfinite(uv[..., 0]) & xp.isfinite(uv[..., 1])
    return xp, q, uv, valid, h, w


def _check_grid_size(fn: str, grid_size: int) -> int:
    try:
        g = int(grid_size)
    except (TypeError, ValueError):
        g = 0
    if g != grid_size or g < 1 or g > 2048 or (g & (g - 1)) != 0:
        raise InputError(f"{fn}: grid_size must be a power of two in [1, 2048], got {grid_size!r}")
    return g


# ---------------------------------------------------------------- public API
def uv_nearest_pixels(
    query_uv: Any,
    uv_map: Any,
    mask: Any,
    *,
    method: str = "auto",
    grid_size: int = DEFAULT_GRID_SIZE,
) -> tuple[Any, Any]:
    """Nearest masked pixel of a UV map for every query UV (exact float32 argmin).

    Args:
        query_uv: ``(Q, 2) float32`` query UVs (FLAME template UVs of the vertices).
            Any value is allowed; UVs outside [0, 1] are fine. Other floating dtypes
            (here and in ``uv_map``) are rounded to float32 first.
        uv_map: ``(H, W, 2) float32`` predicted UV map, channels-last (u, v), or a stack
            ``(B, H, W, 2)`` of maps searched each on its own (on CuPy in one set of
            launches for the stack). NaN/inf pixels are treated as unmasked.
        mask: ``(H, W) bool`` pixels that may be matched (``(B, H, W)`` for a stack).
        method: ``"auto"`` (``"kdtree"`` for NumPy inputs, ``"cuda"`` for CuPy),
            ``"kdtree"`` / ``"grid"`` (NumPy only), ``"cuda"`` (CuPy only) or
            ``"bruteforce"`` (either). All return identical results.
        grid_size: cells per axis of the uniform grid (``"grid"`` / ``"cuda"``), a power
            of two; it changes speed only, never the result.

    Returns:
        ``(pixel_index, sq_dist)``: ``(Q,) int32`` flat row-major pixel index
        ``row * W + col`` (``-1`` where no candidate exists) and ``(Q,) float32`` its
        squared UV distance (``+inf`` where the index is ``-1``), on the inputs' array
        module; ``(B, Q)`` each for a stack.

    Raises:
        InputError: wrong shape/dtype, unknown method, a method the array module cannot
            run, or a bad ``grid_size``.
        BackendUnavailableError: ``"grid"`` without numba, ``"cuda"`` without a device.
    """
    fn = "uv_nearest_pixels"
    if method not in _METHODS:
        raise InputError(f"{fn}: method must be one of {_METHODS}, got {method!r}")
    g = _check_grid_size(fn, grid_size)
    xp, q, uv, valid, _, _ = _check_inputs(fn, query_uv, uv_map, mask)
    if method == "auto":
        method = "kdtree" if xp is np else "cuda"
    if method in ("kdtree", "grid") and xp is not np:
        raise InputError(f"{fn}: method={method!r} runs on NumPy arrays; got CuPy arrays (use 'cuda')")
    if method == "cuda" and xp is np:
        raise InputError(f"{fn}: method='cuda' needs CuPy arrays; got NumPy arrays (use 'kdtree' or 'grid')")
    if method == "cuda":
        return _cuda_search(q, uv, valid, g)

    def one(uv: Any, valid: Any) -> tuple[Any, Any]:
        # huge UVs overflow float32 squared distances to +inf by design (as on the GPU)
        with np.errstate(over="ignore", invalid="ignore"):
            if method == "bruteforce":
                return _bruteforce(xp, q, uv, valid)
            if method == "kdtree":
                return _kdtree_search(q, uv, valid)
            cell_start, cell_pix = build_uv_grid_reference(uv, valid, g)
            return _grid_search_reference(q, uv, cell_start, cell_pix, g)

    return one(uv, valid) if uv.ndim == 2 else _stacked(xp, [one(uv[b], valid[b]) for b in range(uv.shape[0])], q)


def _stacked(xp: ModuleType, results: list[tuple[Any, Any]], q: Any) -> tuple[Any, Any]:
    """The per-image ``(pixel_index, sq_dist)`` of a stack of maps as ``(B, Q)`` arrays."""
    if not results:
        return xp.zeros((0, q.shape[0]), dtype=xp.int32), xp.zeros((0, q.shape[0]), dtype=xp.float32)
    return xp.stack([r[0] for r in results]), xp.stack([r[1] for r in results])


def uv_nearest_pixels_bruteforce(
    query_uv: Any, uv_map: Any, mask: Any, *, chunk_elems: int = 1 << 22
) -> tuple[Any, Any]:
    """Reference: the brute-force float32 argmin over masked pixels (NumPy or CuPy).

    Args:
        query_uv: ``(Q, 2) float32`` query UVs.
        uv_map: ``(H, W, 2) float32`` UV map (or a ``(B, H, W, 2)`` stack); NaN/inf
            pixels count as unmasked.
        mask: ``(H, W) bool`` (``(B, H, W)``).
        chunk_elems: at most this many query-pixel pairs are held at once.

    Returns:
        ``(pixel_index (Q,) int32, sq_dist (Q,) float32)`` as :func:`uv_nearest_pixels`.
    """
    xp, q, uv, valid, _, _ = _check_inputs("uv_nearest_pixels_bruteforce", query_uv, uv_map, mask)
    with np.errstate(over="ignore", invalid="ignore"):
        if uv.ndim == 2:
            return _bruteforce(xp, q, uv, valid, chunk_elems=chunk_elems)
        return _stacked(xp, [_bruteforce(xp, q, uv[b], valid[b], chunk_elems) for b in range(uv.shape[0])], q)


def uv_targets(
    query_uv: Any,
    uv_map: Any,
    mask: Any,
    delta_uv_sq: float = DEFAULT_DELTA_UV_SQ,
    *,
    method: str = "auto",
    grid_size: int = DEFAULT_GRID_SIZE,
) -> tuple[Any, Any]:
    """2-D pixel targets of the UV loss: nearest pixel per query and its validity.

    Args:
        query_uv: ``(Q, 2) float32`` FLAME template UVs of the vertices.
        uv_map: ``(H, W, 2) float32`` predicted UV map (NaN pixels are unmasked), or a
            ``(B, H, W, 2)`` stack (see :func:`uv_nearest_pixels`).
        mask: ``(H, W) bool`` pixels that may be matched (``(B, H, W)``).
        delta_uv_sq: a correspondence is valid iff its squared UV distance is
            ``< delta_uv_sq`` (compared in float32).
        method, grid_size: as :func:`uv_nearest_pixels`.

    Returns:
        ``(pixel_xy, valid)``: ``(Q, 2) float32`` pixel coordinates ``(x = col,
        y = row)`` of the nearest pixel (``(-1, -1)`` where there is none), and
        ``(Q,) bool`` validity; ``(B, Q, 2)`` and ``(B, Q)`` for a stack.
    """
    if not np.isfinite(delta_uv_sq) or delta_uv_sq < 0:
        raise InputError(f"uv_targets: delta_uv_sq must be a finite number >= 0, got {delta_uv_sq!r}")
    idx, d = uv_nearest_pixels(query_uv, uv_map, mask, method=method, grid_size=grid_size)
    xp = get_array_module(idx)
    w = int(np.shape(uv_map)[-2])
    found = idx >= 0
    col = xp.where(found, idx % w, -1)
    row = xp.where(found, idx // w, -1)
    pixel_xy = xp.stack([col, row], axis=-1).astype(xp.float32)
    valid = found & (d < xp.float32(delta_uv_sq))
    return pixel_xy, valid


# ---------------------------------------------------------------- brute force
def _bruteforce(xp: ModuleType, q: Any, uv: Any, valid: Any, chunk_elems: int = 1 << 22) -> tuple[Any, Any]:
    """Chunked brute force over the valid pixels; see the module docstring for semantics."""
    nq = q.shape[0]
    out_idx = xp.full((nq,), -1, dtype=xp.int32)
    out_d = xp.full((nq,), xp.inf, dtype=xp.float32)
    pix = xp.flatnonzero(valid).astype(xp.int32)  # ascending pixel order
    n = int(pix.shape[0])
    if n == 0 or nq == 0:
        return out_idx, out_d
    pu = uv[pix, 0][None, :]  # (1, n)
    pv = uv[pix, 1][None, :]
    col = xp.arange(n, dtype=xp.int32)[None, :]
    step = max(1, int(chunk_elems) // n)
    inf = xp.float32(xp.inf)
    for s in range(0, nq, step):
        qs = q[s : s + step]
        dx = qs[:, 0:1] - pu  # (c, n) float32, one rounding each
        dy = qs[:, 1:2] - pv
        d = dx * dx + dy * dy  # separate ufuncs: fl(fl(dx*dx) + fl(dy*dy)), no FMA
        d[xp.isnan(d)] = inf  # non-finite query rows
        mn = d.min(axis=1)  # (c,)
        # lowest column (= lowest pixel index) attaining the minimum
        first = xp.where(d == mn[:, None], col, n).min(axis=1)
        found = mn < inf
        out_idx[s : s + step] = xp.where(found, pix[xp.minimum(first, n - 1)], -1)
        out_d[s : s + step] = xp.where(found, mn, inf)
    return out_idx, out_d


# ---------------------------------------------------------------- k-d tree (CPU)
def _float32_sq_dist(q: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``(..., 2)`` float32 queries vs ``(..., 2)`` float32 points -> float32 squared distance."""
    dx = q[..., 0] - pts[..., 0]
    dy = q[..., 1] - pts[..., 1]
    return dx * dx + dy * dy


def _kdtree_search(q: np.ndarray, uv: np.ndarray, valid: np.ndarray, k0: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Exact float32 nearest pixel via a float64 cKDTree and float32 re-ranking.

    Why the result equals brute force exactly:

    1. Exact duplicates. Pixels with bit-identical UVs (after -0.0 -> +0.0) have identical
       float32 distances to every query, so only the lowest pixel index of each distinct
       UV can ever win. The tree is built over distinct UVs, each carrying that index.
       (This only keeps candidate sets small on maps with many duplicates; steps 2-4
       would be exact without it.)
    2. Candidate radius. Let ``D(p)`` be the exact real squared distance and ``d(p)`` the
       float32 one. Each of the four roundings has relative error <= u = 2^-24 (an
       underflowing product adds at most 2^-150 absolute), so
       ``D (1-u)^4 - 2^-149 <= d <= D (1+u)^4 + 2^-149``. If ``m = min D`` is attained at
       ``p0``, any ``p`` with ``d(p) <= d(p0)`` -- in particular every float32 minimiser --
       has ``D(p) <= m (1+u)^4/(1-u)^4 + 2^-147 ~= m (1 + 2^-21) + 2^-147``. We gather all
       points with float64 ``D <= r2 = m64 (1 + 2^-18) + 1e-38``; the slack covers that
       bound 8x over and the float64 rounding of the tree's distances (~1e-16 relative).
    3. Completeness. The tree returns the k nearest in float64; if the k-th lies inside
       ``r2`` there may be more, so those rows are re-queried with k doubled until the
       k-th lies outside ``r2`` (or k covers all points).
    4. Selection. Every candidate's float32 distance is recomputed with the exact
       formula; the minimum wins, ties to the lowest pixel index.
    """
    from scipy.spatial import cKDTree

    nq = q.shape[0]
    out_idx = np.full((nq,), -1, dtype=np.int32)
    out_d = np.full((nq,), np.inf, dtype=np.float32)
    pix = np.flatnonzero(valid).astype(np.int32)
    if pix.size == 0 or nq == 0:
        return out_idx, out_d
    pts = uv[pix] + np.float32(0.0)  # -0.0 -> +0.0 so equal values have equal bits
    keys = np.ascontiguousarray(pts).view(np.uint64).reshape(-1)
    _, first = np.unique(keys, return_index=True)  # stable: first = lowest pixel index
    upts = pts[first]  # (n, 2) float32 distinct UVs
    upix = pix[first]  # (n,) lowest pixel index of each
    n = upts.shape[0]
    tree = cKDTree(upts.astype(np.float64), leafsize=16, balanced_tree=False, compact_nodes=False)

    rows = np.flatnonzero(np.isfinite(q).all(axis=1))
    k = min(k0, n)
    while rows.size:
        qr = q[rows]
        dist, nbr = tree.query(qr.astype(np.float64), k=k)
        dist = dist.reshape(rows.size, k)
        nbr = nbr.reshape(rows.size, k)
        r2 = dist[:, :1] ** 2 * (1.0 + _KDTREE_REL_SLACK) + _KDTREE_ABS_SLACK
        cand = dist**2 <= r2  # (r, k); missing neighbours have dist = inf
        truncated = cand[:, -1] & (k < n)
        done = ~truncated
        nbr_c = np.minimum(nbr, n - 1)
        d32 = _float32_sq_dist(qr[:, None, :], upts[nbr_c])  # (r, k) float32, exact formula
        d32 = np.where(cand, d32, np.float32(np.inf))
        mn = d32.min(axis=1)
        best = np.where(cand & (d32 == mn[:, None]), upix[nbr_c], _INT32_MAX).min(axis=1)
        found = done & (mn < np.inf)
        out_idx[rows[found]] = best[found]
        out_d[rows[found]] = mn[found]
        rows = rows[truncated]
        k = min(2 * k, n)
    return out_idx, out_d


# ---------------------------------------------------------------- uniform grid
def build_uv_grid_reference(uv: np.ndarray, valid: np.ndarray, grid_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin valid pixels into a ``G x G`` uniform grid over UV [0, 1]^2 (counting sort).

    A pixel with UV ``(u, v)`` goes to cell ``cy * G + cx`` with
    ``cx = clamp(floor(fl(u * G)), 0, G - 1)`` (same for ``cy`` from ``v``); with ``G`` a
    power of two ``u * G`` is exact, so cell ``cx`` (not clamped) holds exactly the UVs
    with ``cx / G <= u < (cx + 1) / G``. Invalid pixels go to the sentinel cell ``G*G``.

    Args:
        uv: ``(N, 2) float32`` flat UV map.
        valid: ``(N,) bool`` pixels to bin.
        grid_size: ``G``, a power of two.

    Returns:
        ``(cell_start, cell_pix)``: ``(G*G + 2,) int32`` exclusive prefix sum of the
        per-cell counts (cell ``c`` owns ``cell_pix[cell_start[c]:cell_start[c+1]]``),
        and ``(N,) int32`` pixel indices sorted by cell, ascending within a cell.
    """
    g = grid_size
    uvc = np.where(valid[:, None], uv, np.float32(0.0))
    with np.errstate(over="ignore"):  # huge UVs saturate to the border cells, as on the GPU
        t = np.clip(uvc * np.float32(g), np.float32(0.0), np.float32(g - 1))  # exact product
    c = t.astype(np.int32)  # truncation == floor on [0, G-1]
    cell = np.where(valid, c[:, 1] * g + c[:, 0], g * g).astype(np.int32)
    counts = np.bincount(cell, minlength=g * g + 1)
    cell_start = np.zeros(g * g + 2, dtype=np.int32)
    np.cumsum(counts, out=cell_start[1:])
    cell_pix = np.argsort(cell, kind="stable").astype(np.int32)
    return cell_start, cell_pix


@functools.lru_cache(maxsize=None)
def _numba_grid_search() -> Any:
    """Compile (once) the numba emulation of the CUDA ``uvnn_search`` kernel."""
    try:
        import numba
    except ImportError as e:  # pragma: no cover - numba is a hard dependency
        raise BackendUnavailableError("uv_nearest_pixels(method='grid') needs numba: pip install numba") from e

    f32 = np.float32

    @numba.njit(cache=True, nogil=True)
    def cell_coord(x, gf, g):  # mirrors uvnn_cell_coord
        t = x * gf
        if t < f32(0.0):
            t = f32(0.0)
        if t > f32(g - 1):
            t = f32(g - 1)
        return np.int32(t)

    @numba.njit(cache=True, nogil=True)
    def visit_cell(c, qx, qy, uv, cell_start, cell_pix, best, bestp):  # mirrors uvnn_visit_cell
        for k in range(cell_start[c], cell_start[c + 1]):
            p = cell_pix[k]
            dx = qx - uv[p, 0]
            dy = qy - uv[p, 1]
            d = dx * dx + dy * dy
            if d < best or (d == best and p < bestp):
                best = d
                bestp = p
        return best, bestp

    @numba.njit(cache=True, nogil=True)
    def search(q, uv, cell_start, cell_pix, g, out_idx, out_d):  # mirrors uvnn_search
        gf = f32(g)
        inv_g = f32(1.0) / gf  # exact: g is a power of two
        inf = f32(np.inf)
        for i in range(q.shape[0]):
            qx = q[i, 0]
            qy = q[i, 1]
            best = inf
            bestp = np.int32(-1)
            if not (np.isfinite(qx) and np.isfinite(qy)):
                out_idx[i] = bestp
                out_d[i] = best
                continue
            qcx = cell_coord(qx, gf, g)
            qcy = cell_coord(qy, gf, g)
            for r in range(g):
                if r > 0:
                    # Lower bound on d for every pixel in rings >= r: such a pixel lies
                    # beyond one side of the (2r-1)^2 block of cells around the query's
                    # cell. gap = fl(real gap); fl is monotone so |fl(q - u)| >= gap,
                    # hence d >= fl(gap * gap). Sides with no cells beyond are skipped.
                    gap = inf
                    if qcx + r <= g - 1:
                        gap = min(gap, f32(qcx + r) * inv_g - qx)
                    if qcx - r >= 0:
                        gap = min(gap, qx - f32(qcx - r + 1) * inv_g)
                    if qcy + r <= g - 1:
                        gap = min(gap, f32(qcy + r) * inv_g - qy)
                    if qcy - r >= 0:
                        gap = min(gap, qy - f32(qcy - r + 1) * inv_g)
                    if gap == inf:
                        break  # the ring lies wholly outside the grid: all cells seen
                    if gap * gap > best:
                        break  # nothing further can beat or tie the best
                y0 = qcy - r
                y1 = qcy + r
                x0 = qcx - r
                x1 = qcx + r
                for cy in range(max(y0, 0), min(y1, g - 1) + 1):
                    if cy == y0 or cy == y1:
                        for cx in range(max(x0, 0), min(x1, g - 1) + 1):
                            best, bestp = visit_cell(cy * g + cx, qx, qy, uv, cell_start, cell_pix, best, bestp)
                    else:
                        if x0 >= 0:
                            best, bestp = visit_cell(cy * g + x0, qx, qy, uv, cell_start, cell_pix, best, bestp)
                        if x1 <= g - 1:
                            best, bestp = visit_cell(cy * g + x1, qx, qy, uv, cell_start, cell_pix, best, bestp)
            out_idx[i] = bestp
            out_d[i] = best

    return search


def _grid_search_reference(
    q: np.ndarray, uv: np.ndarray, cell_start: np.ndarray, cell_pix: np.ndarray, grid_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """CPU (numba) emulation of the CUDA grid search, line for line.

    One "thread" per query: visit the query's cell (clamped into the grid), then rings of
    cells at Chebyshev distance r = 1, 2, ... until the lower bound on the float32
    distance of everything in rings >= r exceeds the best found so far (strictly, so
    equal distances with a lower pixel index are still found).

    Args:
        q: ``(Q, 2) float32`` queries.
        uv: ``(N, 2) float32`` flat UV map.
        cell_start, cell_pix: from :func:`build_uv_grid_reference`.
        grid_size: ``G``, the power of two used to build the grid.

    Returns:
        ``(pixel_index (Q,) int32, sq_dist (Q,) float32)``.
    """
    out_idx = np.empty(q.shape[0], dtype=np.int32)
    out_d = np.empty(q.shape[0], dtype=np.float32)
    _numba_grid_search()(q, uv, cell_start, cell_pix, np.int64(grid_size), out_idx, out_d)
    return out_idx, out_d


# ---------------------------------------------------------------- CUDA
_BLOCK = 128


def _cuda_build_grid(uv: Any, valid: Any, grid_size: int) -> tuple[Any, Any]:
    """GPU counting sort of the valid pixels; same layout as :func:`build_uv_grid_reference`.

    Args:
        uv: ``(N, 2) float32`` CuPy flat UV map (C-contiguous), or a ``(B, N, 2)`` stack.
        valid: ``(N,) bool`` CuPy (``(B, N)``).
        grid_size: ``G``, a power of two (compile-time ``UVNN_GRID_SIZE``).

    Returns:
        ``(cell_start (G*G + 2,) int32, cell_pix (N,) int32)`` CuPy arrays, bit-identical
        to the CPU reference. For a stack the images' grids follow each other:
        ``cell_start`` has ``B * (G*G + 1) + 1`` entries (image ``b``'s cells start at
        ``b * (G*G + 1)``; its last, the invalid pixels' cell, is followed by the next
        image's first) indexing one ``(B*N,)`` ``cell_pix`` of per-image pixel indices,
        so image ``b``'s slice is exactly its own grid offset by ``b * N``.
    """
    import cupy as cp


    g = grid_size
    n = int(uv.shape[-2])
    nb = int(math.prod(uv.shape[:-2]))
    total = nb * n
    mod = cuda.load_module("p3dmm.fitting.fitter", "uv_nn", defines={"UVNN_GRID_SIZE": g})
    valid_u8 = cp.ascontiguousarray(valid).view(cp.uint8)
    # Per-cell counts (atomics; counts do not depend on thread order), an exclusive scan,
    # and a deterministic scatter: sorting the distinct keys (b * (G*G+1) + cell) * N +
    # pixel gives exactly the stable counting-sort order of each image, the images one
    # after the other, whatever order the GPU threads ran in, which an atomic-cursor
    # scatter would not.
    counts = cp.zeros(nb * (g * g + 1), dtype=cp.int32)
    keys = cp.empty(total, dtype=cp.int64)
    mod.get_function("uvnn_bin_pixels")(
        ((total + _BLOCK - 1) // _BLOCK,), (_BLOCK,), (uv, valid_u8, np.int32(n), np.int32(total), counts, keys)
    )
    cell_start = cp.zeros(nb * (g * g + 1) + 1, dtype=cp.int32)
    cell_start[1:] = cp.cumsum(counts)  # exclusive scan: cell_start[c] = sum(counts[:c])
    cell_pix = (cp.sort(keys) % np.int64(n)).astype(cp.int32)
    return cell_start, cell_pix


def _cuda_search(q: Any, uv: Any, valid: Any, grid_size: int) -> tuple[Any, Any]:
    """Uniform-grid search on the GPU (``uv_nn.cu``); same algorithm as
    :func:`build_uv_grid_reference` + :func:`_grid_search_reference`, no host round-trip.

    Args:
        q: ``(Q, 2) float32`` CuPy queries (C-contiguous).
        uv: ``(N, 2) float32`` CuPy flat UV map (C-contiguous), or a ``(B, N, 2)`` stack
            (one bin, sort and search launch for the whole stack).
        valid: ``(N,) bool`` CuPy (``(B, N)``).
        grid_size: ``G``, a power of two.

    Returns:
        ``(pixel_index (Q,) int32, sq_dist (Q,) float32)`` CuPy arrays (``(B, Q)`` each
        for a stack).
    """
    import cupy as cp


    nq = int(q.shape[0])
    lead = tuple(int(b) for b in uv.shape[:-2])
    nb = int(math.prod(lead))
    out_idx = cp.full((*lead, nq), -1, dtype=cp.int32)
    out_d = cp.full((*lead, nq), cp.inf, dtype=cp.float32)
    if nq == 0 or nb * int(uv.shape[-2]) == 0:
        return out_idx, out_d
    cell_start, cell_pix = _cuda_build_grid(uv, valid, grid_size)
    mod = cuda.load_module("p3dmm.fitting.fitter", "uv_nn", defines={"UVNN_GRID_SIZE": grid_size})
    mod.get_function("uvnn_search")(
        ((nb * nq + _BLOCK - 1) // _BLOCK,),
        (_BLOCK,),
        (q, np.int32(nq), np.int32(nb), uv, np.int32(uv.shape[-2]), cell_start, cell_pix, out_idx, out_d),
    )
    return out_idx, out_d
