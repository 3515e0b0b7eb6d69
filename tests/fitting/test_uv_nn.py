"""UV nearest-neighbour search: every implementation equals the float32 brute force exactly."""

from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting.base.errors import InputError
from p3dmm.fitting.fitter.uv_nn import (
    _grid_search_reference,
    build_uv_grid_reference,
    uv_nearest_pixels,
    uv_nearest_pixels_bruteforce,
    uv_targets,
)

GRID_SIZES = (1, 8, 64)


# ---------------------------------------------------------------- fixtures
def random_map(h: int, w: int, seed: int, frac: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random UVs in [-0.05, 1.05]^2 and a random mask."""
    rng = np.random.default_rng(seed)
    uv = (rng.random((h, w, 2)) * 1.1 - 0.05).astype(np.float32)
    mask = rng.random((h, w)) < frac
    return uv, mask


def rendered_like_map(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Smooth UV field over a disc mask, slightly outside [0, 1], with duplicates and ties.

    Contents: a smooth warp of the disc onto [-0.05, 1.05]^2; a block snapped to a 1/64
    lattice (many exact duplicates and exact equidistant ties); a clamped band (UVs on the
    lines u = 0 / u = 1); copied UVs at random pixels; signed zeros; NaN pixels.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    sx, sy = (xx - c) / (0.45 * size), (yy - c) / (0.45 * size)
    mask = sx**2 + sy**2 < 1.0
    u = 0.5 + 0.55 * sx + 0.04 * sx * sy
    v = 0.5 + 0.53 * sy + 0.03 * sx**2
    uv = np.stack([u, v], axis=-1).astype(np.float32)
    b0, b1 = size // 5, size // 5 + size // 6
    uv[b0:b1, b0:b1] = np.round(uv[b0:b1, b0:b1] * 64) / 64
    band = slice(size // 2, size // 2 + 3)
    uv[band, :, 0] = np.clip(uv[band, :, 0] * 1.3 - 0.15, 0.0, 1.0)
    flat = uv.reshape(-1, 2)
    inside = np.flatnonzero(mask.reshape(-1))
    dst = rng.choice(inside, 150, replace=False)
    src = rng.choice(inside, 150, replace=False)
    flat[dst] = flat[src]
    flat[inside[10]] = (0.0, 0.25)
    flat[inside[5]] = (-0.0, 0.25)  # equal value, different bits, lower index
    flat[inside[rng.choice(inside.size, 12, replace=False)]] = np.nan
    flat[inside[20], 1] = np.nan  # one NaN channel is enough to unmask
    return uv, mask


def queries_for(uv: np.ndarray, mask: np.ndarray, n_random: int, seed: int) -> np.ndarray:
    """Random queries, exact hits on map UVs, lattice midpoints and far-away points."""
    rng = np.random.default_rng(seed)
    rand = rng.random((n_random, 2)) * 1.3 - 0.15
    flat = uv.reshape(-1, 2)
    ok = np.flatnonzero(mask.reshape(-1) & np.isfinite(flat).all(1))
    hits = flat[rng.choice(ok, min(60, ok.size), replace=False)] if ok.size else np.zeros((0, 2))
    lat = rng.integers(0, 64, (60, 2)) / 64.0
    mid = lat + np.array([1 / 128, 0.0]) * rng.integers(0, 2, (60, 1))  # exact ties between lattice points
    far = np.array([[5.0, -3.0], [-0.5, 0.5], [0.5, 1.7], [1e6, 1e6], [-2.0, -2.0], [0.0, 0.25], [-0.0, 0.25]])
    return np.concatenate([rand, hits, lat, mid, far]).astype(np.float32)


def assert_same(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], what: str) -> None:
    ri, rd = ref
    gi, gd = got
    assert gi.dtype == np.int32 and gd.dtype == np.float32, what
    bad = np.flatnonzero((ri != gi) | (rd.view(np.int32) != gd.view(np.int32)))
    b = bad[:5]
    assert bad.size == 0, f"{what}: {bad.size} mismatches at {b}: ref {ri[b]} {rd[b]}, got {gi[b]} {gd[b]}"


def all_methods(q: np.ndarray, uv: np.ndarray, mask: np.ndarray) -> None:
    ref = uv_nearest_pixels_bruteforce(q, uv, mask)
    assert_same(ref, uv_nearest_pixels(q, uv, mask, method="bruteforce"), "bruteforce via dispatch")
    assert_same(ref, uv_nearest_pixels(q, uv, mask), "kdtree (auto)")
    for g in GRID_SIZES:
        assert_same(ref, uv_nearest_pixels(q, uv, mask, method="grid", grid_size=g), f"grid G={g}")


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_maps_match_bruteforce(seed: int) -> None:
    uv, mask = random_map(48, 40, seed)
    all_methods(queries_for(uv, mask, 300, seed + 100), uv, mask)


def test_quantised_random_map_many_ties() -> None:
    """UVs on a coarse lattice: most queries have several exactly-tied pixels."""
    uv, mask = random_map(40, 40, 7)
    uv = (np.round(uv * 16) / 16).astype(np.float32)
    all_methods(queries_for(uv, mask, 200, 8), uv, mask)


def test_rendered_like_map() -> None:
    uv, mask = rendered_like_map(96)
    q = queries_for(uv, mask, 400, 3)
    all_methods(q, uv, mask)
    idx, d = uv_nearest_pixels(q, uv, mask)
    # signed zeros: query (0, 0.25) hits both the +0.0 and the -0.0 pixel; the lower index wins
    inside = np.flatnonzero(mask.reshape(-1))
    assert idx[-2] == idx[-1] == inside[5] and d[-1] == 0.0


@pytest.mark.parametrize("seed", [1, 19])  # seeds whose construction shows the disagreement
def test_float32_order_differs_from_exact_order(seed: int) -> None:
    """Points on a thin annulus: the float64-nearest point is not the float32 winner.

    This is the case the k-d tree path must re-rank: a plain float64 nearest neighbour
    would return a different pixel than the float32 brute force.
    """
    rng = np.random.default_rng(seed)
    q = np.array([[0.3, 0.6]], dtype=np.float32)
    n = 3000
    theta = rng.random(n) * 2 * np.pi
    pts = (q.astype(np.float64) + 0.01 * np.stack([np.cos(theta), np.sin(theta)], 1)).astype(np.float32)
    pts64, q64 = pts.astype(np.float64), q.astype(np.float64)
    exact = ((pts64 - q64) ** 2).sum(1)
    d32 = ((q[0, 0] - pts[:, 0]) ** 2 + (q[0, 1] - pts[:, 1]) ** 2).astype(np.float32)
    order = np.lexsort((np.arange(n), d32))
    assert np.argmin(exact) != order[0], "construction must produce a float32/float64 disagreement"
    uv = pts.reshape(1, n, 2)
    mask = np.ones((1, n), dtype=bool)
    ref = uv_nearest_pixels_bruteforce(q, uv, mask)
    assert ref[0][0] == order[0]
    all_methods(q, uv, mask)
    # the same map with many copies of the query: every method still agrees
    all_methods(np.repeat(q, 8, axis=0), uv, mask)


def test_exact_tie_goes_to_lowest_index() -> None:
    uv = np.full((2, 8, 2), 0.9, dtype=np.float32)
    uv[1, 2] = (0.25, 0.5)  # pixel 10
    uv[0, 5] = (0.375, 0.5)  # pixel 5, same distance to the query
    uv[1, 7] = (0.375, 0.5)  # pixel 15, duplicate of pixel 5
    mask = np.ones((2, 8), dtype=bool)
    q = np.array([[0.3125, 0.5], [0.375, 0.5], [0.25, 0.5]], dtype=np.float32)
    idx, d = uv_nearest_pixels(q, uv, mask)
    np.testing.assert_array_equal(idx, [5, 5, 10])
    np.testing.assert_array_equal(d, np.float32([0.0625**2, 0.0, 0.0]))
    all_methods(q, uv, mask)
    mask[0, 5] = False
    idx, _ = uv_nearest_pixels(q, uv, mask)
    np.testing.assert_array_equal(idx, [10, 15, 10])
    all_methods(q, uv, mask)


def test_queries_outside_grid_and_small_grids() -> None:
    """Points and queries far outside [0, 1]^2 all land in edge cells; the stop rule holds."""
    uv, mask = random_map(24, 24, 11)
    uv = (uv * 4 - 1.5).astype(np.float32)  # UVs in [-1.7, 2.7]
    rng = np.random.default_rng(12)
    q = (rng.random((200, 2)) * 8 - 4).astype(np.float32)
    all_methods(q, uv, mask)


# ---------------------------------------------------------------- edge cases
def test_empty_mask_gives_minus_one() -> None:
    uv, _ = random_map(16, 16, 0)
    mask = np.zeros((16, 16), dtype=bool)
    q = np.float32([[0.5, 0.5], [0.1, 0.9]])
    for method in ("kdtree", "grid", "bruteforce"):
        idx, d = uv_nearest_pixels(q, uv, mask, method=method)
        np.testing.assert_array_equal(idx, [-1, -1])
        assert np.isposinf(d).all()
    xy, valid = uv_targets(q, uv, mask)
    np.testing.assert_array_equal(xy, -1.0)
    assert not valid.any()


def test_single_masked_pixel() -> None:
    uv, _ = random_map(8, 8, 3)
    mask = np.zeros((8, 8), dtype=bool)
    mask[5, 2] = True
    q = np.float32([[0.5, 0.5], [-3.0, 9.0]])
    for method in ("kdtree", "grid", "bruteforce"):
        idx, _ = uv_nearest_pixels(q, uv, mask, method=method)
        np.testing.assert_array_equal(idx, [42, 42])
    all_methods(q, uv, mask)


def test_all_nan_map_behaves_as_empty() -> None:
    uv = np.full((8, 8, 2), np.nan, dtype=np.float32)
    mask = np.ones((8, 8), dtype=bool)
    for method in ("kdtree", "grid", "bruteforce"):
        idx, d = uv_nearest_pixels(np.float32([[0.5, 0.5]]), uv, mask, method=method)
        assert idx[0] == -1 and np.isposinf(d[0])


def test_all_masked() -> None:
    uv, _ = random_map(32, 32, 4)
    mask = np.ones((32, 32), dtype=bool)
    all_methods(queries_for(uv, mask, 150, 5), uv, mask)


def test_nan_pixel_is_unmasked() -> None:
    uv = np.full((4, 4, 2), 0.8, dtype=np.float32)
    uv[0, 1] = (0.2, np.nan)
    uv[2, 3] = (0.3, 0.3)
    mask = np.ones((4, 4), dtype=bool)
    q = np.float32([[0.2, 0.2]])
    for method in ("kdtree", "grid", "bruteforce"):
        idx, _ = uv_nearest_pixels(q, uv, mask, method=method)
        assert idx[0] == 11, method


def test_nonfinite_query_gives_minus_one() -> None:
    uv, mask = random_map(16, 16, 1)
    q = np.float32([[np.nan, 0.5], [np.inf, 0.1], [0.5, 0.5]])
    for method in ("kdtree", "grid", "bruteforce"):
        idx, d = uv_nearest_pixels(q, uv, mask, method=method)
        np.testing.assert_array_equal(idx[:2], [-1, -1])
        assert np.isposinf(d[:2]).all() and idx[2] >= 0


def test_no_queries() -> None:
    uv, mask = random_map(8, 8, 0)
    for method in ("kdtree", "grid", "bruteforce"):
        idx, d = uv_nearest_pixels(np.zeros((0, 2), np.float32), uv, mask, method=method)
        assert idx.shape == (0,) and d.shape == (0,)


def test_bruteforce_chunking_does_not_change_result() -> None:
    uv, mask = random_map(20, 20, 9)
    q = queries_for(uv, mask, 50, 9)
    ref = uv_nearest_pixels_bruteforce(q, uv, mask)
    assert_same(ref, uv_nearest_pixels_bruteforce(q, uv, mask, chunk_elems=1), "chunk 1")


# ---------------------------------------------------------------- grid layout
def test_grid_layout_is_a_stable_counting_sort() -> None:
    uv, mask = rendered_like_map(64)
    flat = uv.reshape(-1, 2)
    valid = mask.reshape(-1) & np.isfinite(flat).all(1)
    g = 16
    start, pix = build_uv_grid_reference(flat, valid, g)
    assert start.shape == (g * g + 2,) and pix.shape == (flat.shape[0],)
    assert start[0] == 0 and start[g * g] == valid.sum() and start[-1] == flat.shape[0]
    np.testing.assert_array_equal(np.sort(pix[: start[g * g]]), np.flatnonzero(valid))
    for c in range(g * g):
        seg = pix[start[c] : start[c + 1]]
        assert np.all(np.diff(seg) > 0), "ascending pixel index within a cell"
        if seg.size:
            cy, cx = divmod(c, g)
            u, v = flat[seg, 0], flat[seg, 1]
            assert np.all((u >= cx / g) | (cx == 0)) and np.all((u < (cx + 1) / g) | (cx == g - 1))
            assert np.all((v >= cy / g) | (cy == 0)) and np.all((v < (cy + 1) / g) | (cy == g - 1))


def test_grid_reference_direct_call() -> None:
    uv, mask = random_map(16, 16, 2)
    flat = uv.reshape(-1, 2)
    valid = mask.reshape(-1)
    start, pix = build_uv_grid_reference(flat, valid, 8)
    q = np.float32([[0.5, 0.5], [2.0, -1.0]])
    assert_same(uv_nearest_pixels_bruteforce(q, uv, mask), _grid_search_reference(q, flat, start, pix, 8), "direct")


def _stack_cases(h: int = 30, w: int = 34) -> tuple[np.ndarray, np.ndarray]:
    """A stack of same-size maps: random, quantised (ties), an empty mask, an all-NaN map."""
    uvs, masks = [], []
    for seed in (3, 4):
        uv, mask = random_map(h, w, seed)
        uvs.append(uv)
        masks.append(mask)
    uvs.append((np.round(uvs[0] * 8) / 8).astype(np.float32))
    masks.append(masks[1])
    uvs.append(uvs[1])
    masks.append(np.zeros((h, w), bool))
    uvs.append(np.full((h, w, 2), np.nan, np.float32))
    masks.append(np.ones((h, w), bool))
    return np.stack(uvs), np.stack(masks)


@pytest.mark.parametrize("method", ["kdtree", "grid", "bruteforce"])
def test_a_stack_of_maps_is_searched_image_by_image(method: str) -> None:
    """``(B, H, W, 2)`` maps: each row of the ``(B, Q)`` result is that map's own search."""
    uvs, masks = _stack_cases()
    q = queries_for(uvs[0], masks[0], 150, 11)
    idx, d = uv_nearest_pixels(q, uvs, masks, method=method, grid_size=8)
    assert idx.shape == d.shape == (len(uvs), len(q))
    for b in range(len(uvs)):
        assert_same(uv_nearest_pixels_bruteforce(q, uvs[b], masks[b]), (idx[b], d[b]), f"{method} image {b}")
    assert_same(uv_nearest_pixels_bruteforce(q, uvs, masks), (idx, d), f"{method} vs stacked brute force")
    assert (idx[3] == -1).all() and (idx[4] == -1).all() and (idx[0] >= 0).all()
    xy, valid = uv_targets(q, uvs, masks, delta_uv_sq=2e-4)
    assert xy.shape == (len(uvs), len(q), 2) and valid.shape == (len(uvs), len(q))
    for b in range(len(uvs)):
        xy_b, valid_b = uv_targets(q, uvs[b], masks[b], delta_uv_sq=2e-4)
        np.testing.assert_array_equal(xy[b], xy_b)
        np.testing.assert_array_equal(valid[b], valid_b)
    empty = uv_nearest_pixels(q, uvs[:0], masks[:0])
    assert empty[0].shape == (0, len(q)) and empty[0].dtype == np.int32


def test_a_stack_needs_masks_of_its_shape() -> None:
    uvs, masks = _stack_cases(6, 7)
    q = np.zeros((2, 2), np.float32)
    with pytest.raises(InputError, match=r"mask has shape \(6, 7\), expected \(5, 6, 7\)"):
        uv_nearest_pixels(q, uvs, masks[0])
    with pytest.raises(InputError, match=r"uv_map.*\(B, H, W, 2\)"):
        uv_nearest_pixels(q, uvs[None], masks[None])


# ---------------------------------------------------------------- uv_targets
def test_uv_targets_pixel_coordinates_and_threshold() -> None:
    uv = np.full((3, 5, 2), 0.9, dtype=np.float32)
    uv[2, 1] = (0.2, 0.2)  # row 2, col 1
    uv[0, 4] = (0.6, 0.6)  # row 0, col 4
    mask = np.ones((3, 5), dtype=bool)
    q = np.float32([[0.2, 0.201], [0.6, 0.62], [0.61, 0.6]])
    xy, valid = uv_targets(q, uv, mask, delta_uv_sq=2e-4)
    np.testing.assert_array_equal(xy, np.float32([[1, 2], [4, 0], [4, 0]]))
    np.testing.assert_array_equal(valid, [True, False, True])
    assert xy.dtype == np.float32 and valid.dtype == np.bool_
    _, valid_default = uv_targets(q, uv, mask)  # delta 5e-5
    np.testing.assert_array_equal(valid_default, [True, False, False])


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "q, uv, mask, words",
    [
        (np.zeros((3, 3), np.float32), np.zeros((4, 4, 2), np.float32), np.ones((4, 4), bool), ["query_uv", "(Q, 2)"]),
        (np.zeros((3, 2), np.float32), np.zeros((2, 4, 4), np.float32), np.ones((4, 4), bool), ["uv_map", "(H, W, 2)"]),
        (np.zeros((3, 2), np.float32), np.zeros((4, 4, 2), np.float32), np.ones((4, 5), bool), ["mask", "(4, 4)"]),
        (np.zeros((3, 2), np.float32), np.zeros((4, 4, 2), np.float32), np.ones((4, 4), np.float32), ["mask", "bool"]),
        (np.zeros((3, 2), np.int32), np.zeros((4, 4, 2), np.float32), np.ones((4, 4), bool), ["query_uv", "int32"]),
        (np.zeros((3, 2), np.float32), np.zeros((4, 4, 2), np.uint8), np.ones((4, 4), bool), ["uv_map", "uint8"]),
    ],
)
def test_input_errors_name_argument_and_expectation(q, uv, mask, words) -> None:
    with pytest.raises(InputError) as ei:
        uv_nearest_pixels(q, uv, mask)
    msg = str(ei.value)
    assert "uv_nearest_pixels" in msg
    for w in words:
        assert w in msg


def test_method_and_grid_size_errors() -> None:
    uv, mask = random_map(4, 4, 0)
    q = np.zeros((1, 2), np.float32)
    with pytest.raises(InputError, match="method"):
        uv_nearest_pixels(q, uv, mask, method="octree")
    with pytest.raises(InputError, match="CuPy"):
        uv_nearest_pixels(q, uv, mask, method="cuda")
    with pytest.raises(InputError, match="grid_size"):
        uv_nearest_pixels(q, uv, mask, method="grid", grid_size=48)
    with pytest.raises(InputError, match="delta_uv_sq"):
        uv_targets(q, uv, mask, delta_uv_sq=-1.0)


def test_float64_inputs_are_searched_as_float32() -> None:
    uv, mask = random_map(12, 12, 3)
    q = queries_for(uv, mask, 30, 3)
    got = uv_nearest_pixels(q.astype(np.float64), uv.astype(np.float64), mask)
    assert_same(uv_nearest_pixels(q, uv, mask), got, "f64")


# ---------------------------------------------------------------- CUDA source
def test_kernel_source_compiles_with_nvrtc() -> None:
    """NVRTC (no device needed) accepts the source for several grid sizes, no FMA in PTX."""
    try:
        from cupy_backends.cuda.libs import nvrtc
    except Exception as e:  # noqa: BLE001 - cupy missing or no NVRTC library
        pytest.skip(f"NVRTC unavailable ({type(e).__name__})")
    from p3dmm.fitting.base.cuda import kernel_source

    for g in (1, 64, 128):
        prog = nvrtc.createProgram(kernel_source("p3dmm.fitting.fitter", "uv_nn", {"UVNN_GRID_SIZE": g}), "uv_nn.cu", [], [])
        try:
            nvrtc.compileProgram(prog, ["--std=c++17", "-arch=compute_90"])
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"G={g}: {e}\n{nvrtc.getProgramLog(prog)}")
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx


# ---------------------------------------------------------------- GPU parity
@pytest.mark.gpu
@pytest.mark.parametrize("grid_size", [1, 16, 64, 128])
def test_cuda_matches_cpu(grid_size: int) -> None:
    import cupy as cp
    from p3dmm.fitting.fitter.uv_nn import _cuda_build_grid

    cases = [rendered_like_map(96), random_map(48, 40, 0), random_map(40, 40, 7)]
    cases.append(((np.round(cases[2][0] * 16) / 16).astype(np.float32), cases[2][1]))
    for k, (uv, mask) in enumerate(cases):
        q = queries_for(uv, mask, 400, k)
        ref = uv_nearest_pixels_bruteforce(q, uv, mask)
        q_d, uv_d, mask_d = cp.asarray(q), cp.asarray(uv), cp.asarray(mask)
        got = uv_nearest_pixels(q_d, uv_d, mask_d, grid_size=grid_size)
        assert isinstance(got[0], cp.ndarray)
        assert_same(ref, (got[0].get(), got[1].get()), f"cuda G={grid_size} case {k}")
        bf = uv_nearest_pixels(q_d, uv_d, mask_d, method="bruteforce")
        assert_same(ref, (bf[0].get(), bf[1].get()), f"cupy bruteforce case {k}")
        # the device grid layout is the CPU counting sort, bit for bit
        flat = uv.reshape(-1, 2)
        valid = mask.reshape(-1) & np.isfinite(flat).all(1)
        start, pix = build_uv_grid_reference(flat, valid, grid_size)
        start_d, pix_d = _cuda_build_grid(cp.asarray(flat), cp.asarray(valid), grid_size)
        np.testing.assert_array_equal(start, start_d.get())
        np.testing.assert_array_equal(pix, pix_d.get())


@pytest.mark.gpu
def test_cuda_empty_mask_and_targets() -> None:
    import cupy as cp

    uv, _ = random_map(16, 16, 0)
    q = cp.asarray(np.float32([[0.5, 0.5], [np.nan, 0.0]]))
    idx, d = uv_nearest_pixels(q, cp.asarray(uv), cp.zeros((16, 16), dtype=bool))
    np.testing.assert_array_equal(idx.get(), [-1, -1])
    assert np.isposinf(d.get()).all()
    uv2, mask2 = rendered_like_map(64)
    qn = queries_for(uv2, mask2, 100, 1)
    xy_c, ok_c = uv_targets(qn, uv2, mask2)
    xy_g, ok_g = uv_targets(cp.asarray(qn), cp.asarray(uv2), cp.asarray(mask2))
    np.testing.assert_array_equal(xy_c, xy_g.get())
    np.testing.assert_array_equal(ok_c, ok_g.get())


@pytest.mark.gpu
def test_cuda_searches_a_stack_in_one_launch_like_the_cpu() -> None:
    import cupy as cp

    uvs, masks = _stack_cases(48, 40)
    q = queries_for(uvs[0], masks[0], 300, 4)
    got = uv_nearest_pixels(cp.asarray(q), cp.asarray(uvs), cp.asarray(masks))
    for b in range(len(uvs)):
        assert_same(uv_nearest_pixels_bruteforce(q, uvs[b], masks[b]), (got[0][b].get(), got[1][b].get()), f"image {b}")
