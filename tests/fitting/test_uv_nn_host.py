"""Run the CUDA source ``kernels/uv_nn.cu`` on the host, through the real CuPy launch code.

There is no GPU in CI, so this is the substitute check for the ``method="cuda"`` path of
:func:`p3dmm.fitting.fitter.uv_nn.uv_nearest_pixels` (same idea as the rasterizer's
``test_cuda_source_logic_matches_cpu_on_the_host``):

* The exact text CuPy would compile, ``kernel_source("uv_nn", {"UVNN_GRID_SIZE": G})``
  (define preamble + file), is compiled as host C++ (``g++ -std=c++17 -ffp-contract=off``)
  behind a small shim for the CUDA built-ins and intrinsics (:mod:`tests.host_cuda`).
* The Python launch code itself -- :func:`_cuda_search` / :func:`_cuda_build_grid`,
  unchanged -- runs with ``cupy`` replaced by NumPy and ``load_module`` replaced by a
  loader that returns this host build. So the cupy-side steps between the kernels
  (zeroed counts, ``cumsum`` exclusive scan, ``sort(keys) % n``, output pre-fills) are the
  real ones, on NumPy.
* Each launch runs every thread of its grid (``blocks x 128``, including the
  out-of-range tail) serially in a shuffled order, and checks that the argument dtypes
  match the kernel's C signature (CuPy passes raw pointers, so a mismatch would be
  silent on a GPU) and that no buffer is written past its end.

The grid and the results must be bit-identical to the numba twin
(:func:`build_uv_grid_reference`, ``method="grid"``) and to the brute force.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from p3dmm.fitting.base import cuda as _cuda
from p3dmm.fitting.fitter.uv_nn import (
    _check_inputs,
    _cuda_build_grid,
    _cuda_search,
    build_uv_grid_reference,
    uv_nearest_pixels,
    uv_nearest_pixels_bruteforce,
)

from ..host_cuda import HostCuda, host_compiler
from .test_uv_nn import assert_same, queries_for, random_map, rendered_like_map

HOST_GRID_SIZES = (1, 8, 64)

# C dtypes of each kernel's parameters, in order ("i32" = an int passed by value).
@pytest.fixture
def host_cuda(tmp_path: Path) -> HostCuda:
    cxx = host_compiler()
    if cxx is None:
        pytest.skip("no host C++ compiler (g++/clang++) to run kernels/uv_nn.cu on the CPU")
    return HostCuda(tmp_path, cxx)


@contextlib.contextmanager
def cupy_on_host(host: HostCuda) -> Iterator[None]:
    """Within the block, ``import cupy`` gives NumPy and ``load_module`` the host build."""
    fake_cp = types.ModuleType("cupy")
    fake_cp.__dict__["__getattr__"] = lambda attr: getattr(np, attr)  # everything else: NumPy
    fake_cp.ndarray = type("NotACupyArray", (), {})  # type: ignore[attr-defined]

    def empty(shape: Any, dtype: Any = float) -> np.ndarray:  # garbage, like uninitialised GPU memory
        out = np.empty(shape, dtype=dtype)
        out.view(np.uint8)[...] = 0x5A
        return out

    fake_cp.empty = empty  # type: ignore[attr-defined]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "cupy", fake_cp)
        mp.setattr(_cuda, "load_module", host.load_module)
        yield


# ---------------------------------------------------------------- cases
def _tie_map() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UVs on a 1/8 lattice including 0 and 1 (many exact duplicates), queries on a 1/16
    lattice (equidistant ties between lattice points, cell boundaries, some outside)."""
    rng = np.random.default_rng(21)
    uv = (rng.integers(0, 9, (30, 34, 2)) / 8).astype(np.float32)
    mask = rng.random((30, 34)) < 0.5
    q = (rng.integers(-3, 20, (400, 2)) / 16).astype(np.float32)
    return uv, mask, q


def _outside_map() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UVs and queries well outside [0, 1]^2, plus non-finite, huge, subnormal and signed-zero values."""
    rng = np.random.default_rng(22)
    uv = (rng.random((26, 30, 2)) * 5 - 2).astype(np.float32)  # [-2, 3]
    mask = rng.random((26, 30)) < 0.7
    flat = uv.reshape(-1, 2)
    flat[3] = (np.inf, 0.5)  # masked but non-finite: never a candidate
    flat[4] = (0.5, -np.inf)
    flat[5] = (np.nan, np.nan)
    flat[6] = (1e19, 1e19)  # huge: only a huge query can reach it without overflow
    flat[7] = (-3e38, 3e38)
    flat[8] = (1e-42, -1e-42)  # subnormals
    flat[9] = (-0.0, 1.0)
    flat[10] = (0.0, 1.0)  # same value, other sign bit, higher index
    mask.reshape(-1)[3:11] = True
    q = np.concatenate(
        [
            rng.random((250, 2)) * 9 - 4,  # [-4, 5]
            [
                [1e19, 1e19],
                [1e20, -1e20],
                [3e38, -3e38],
                [-3e38, 3e38],
                [1e-42, 0.0],
                [0.0, 1.0],
            ],
            [[np.nan, 0.5], [0.5, np.inf], [-np.inf, -np.inf], [0.25, 0.75]],
        ]
    ).astype(np.float32)
    return uv, mask, q


def _cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    cases = []
    for seed in (0, 1):
        uv, mask = random_map(36, 44, seed)
        cases.append((f"random{seed}", uv, mask, queries_for(uv, mask, 300, seed + 50)))
    uv, mask = rendered_like_map(64)
    cases.append(("rendered_like", uv, mask, queries_for(uv, mask, 200, 9)))
    cases.append(("ties", *_tie_map()))
    cases.append(("outside", *_outside_map()))
    uv, _ = random_map(20, 24, 5)
    cases.append(
        (
            "empty_mask",
            uv,
            np.zeros((20, 24), bool),
            queries_for(uv, np.ones((20, 24), bool), 50, 6),
        )
    )
    nan_uv = np.full((7, 9, 2), np.nan, np.float32)
    cases.append(
        (
            "all_nan",
            nan_uv,
            np.ones((7, 9), bool),
            np.array([[0.5, 0.5], [-1.0, 2.0]], np.float32),
        )
    )
    return cases


@pytest.mark.parametrize("grid_size", (1, 8))
def test_cuda_source_searches_a_stack_like_each_map_on_its_own(host_cuda: HostCuda, grid_size: int) -> None:
    """One bin, sort and search launch for B maps: image b's slice of the stacked grid is
    its own grid (offset by its place in the stack) and its results its own search's."""
    from .test_uv_nn import _stack_cases

    g = grid_size
    uvs, masks = _stack_cases()
    query = queries_for(uvs[0], masks[0], 200, 31)
    _, q, uv, valid, _, _ = _check_inputs("host", query, uvs, masks)
    assert uv.shape == (len(uvs), 30 * 34, 2)
    with cupy_on_host(host_cuda):
        cell_start, cell_pix = _cuda_build_grid(uv, valid, g)
        got = _cuda_search(q, uv, valid, g)
    n, cells = uv.shape[1], g * g + 1
    assert cell_start.shape == (len(uvs) * cells + 1,) and cell_pix.shape == (len(uvs) * n,)
    for b in range(len(uvs)):
        ref_start, ref_pix = build_uv_grid_reference(uv[b], valid[b], g)
        assert_array_equal(cell_start[b * cells : (b + 1) * cells + 1] - b * n, ref_start, err_msg=f"cell_start {b}")
        assert_array_equal(cell_pix[b * n : (b + 1) * n], ref_pix, err_msg=f"cell_pix {b}")
        ref = uv_nearest_pixels_bruteforce(query, uvs[b], masks[b])
        assert_same(ref, (got[0][b], got[1][b]), f"stacked host CUDA vs brute force, image {b} G={g}")
    assert host_cuda.launches.count("uvnn_search") == 1


@pytest.mark.parametrize("grid_size", HOST_GRID_SIZES)
def test_cuda_source_matches_cpu_on_the_host(host_cuda: HostCuda, grid_size: int) -> None:
    g = grid_size
    for name, uv_map, mask, query in _cases():
        what = f"{name} G={g}"
        _, q, uv, valid, _, _ = _check_inputs("host", query, uv_map, mask)

        with cupy_on_host(host_cuda):
            cell_start, cell_pix = _cuda_build_grid(uv, valid, g)
            got = _cuda_search(q, uv, valid, g)
        # the "outside" case overflows float32 on purpose (d = +inf is never chosen); the
        # NumPy references report that as a RuntimeWarning, the kernels cannot
        with np.errstate(over="ignore"):
            ref_start, ref_pix = build_uv_grid_reference(uv, valid, g)
            grid = uv_nearest_pixels(query, uv_map, mask, method="grid", grid_size=g)
            brute = uv_nearest_pixels_bruteforce(query, uv_map, mask)
        assert cell_start.dtype == np.int32 and cell_pix.dtype == np.int32, what
        assert_array_equal(cell_start, ref_start, err_msg=f"cell_start {what}")
        assert_array_equal(cell_pix, ref_pix, err_msg=f"cell_pix {what}")

        assert_same(grid, got, f"host CUDA vs numba grid, {what}")
        assert_same(brute, got, f"host CUDA vs brute force, {what}")
        if name in ("empty_mask", "all_nan"):
            assert (got[0] == -1).all() and np.isposinf(got[1]).all(), what
        else:
            assert (got[0] >= 0).mean() > 0.9, f"{what}: the case should mostly find pixels"
    # per case: one bin launch from the direct _cuda_build_grid call, one bin + one search
    # launch from _cuda_search -- all of them through the host build
    assert host_cuda.launches.count("uvnn_bin_pixels") == 2 * len(_cases())
    assert host_cuda.launches.count("uvnn_search") == len(_cases())
    assert len(host_cuda.libs) == 1, "one compile per grid size (the define preamble)"
    assert all(opts is None for _, _, opts in host_cuda.loads), "uv_nn compiles with the default NVRTC options"
