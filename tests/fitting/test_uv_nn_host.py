"""Run the CUDA source ``kernels/uv_nn.cu`` on the host, through the real CuPy launch code.

There is no GPU in CI, so this is the substitute check for the ``method="cuda"`` path of
:func:`p3dmm.fitting.uv_nn.uv_nearest_pixels` (same idea as the rasterizer's
``test_cuda_source_logic_matches_cpu_on_the_host``):

* The exact text CuPy would compile, ``kernel_source("uv_nn", {"UVNN_GRID_SIZE": G})``
  (define preamble + file), is compiled as host C++ (``g++ -std=c++17 -ffp-contract=off``)
  behind a small shim for the CUDA built-ins and intrinsics.
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
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from p3dmm.fitting.kernels import _cuda
from p3dmm.fitting.uv_nn import (
    _check_inputs,
    _cuda_build_grid,
    _cuda_search,
    build_uv_grid_reference,
    uv_nearest_pixels,
    uv_nearest_pixels_bruteforce,
)

from .test_uv_nn import assert_same, queries_for, random_map, rendered_like_map

HOST_GRID_SIZES = (1, 8, 64)

# C dtypes of each kernel's parameters, in order ("i32" = an int passed by value).
_SIGNATURES: dict[str, tuple[str, ...]] = {
    "uvnn_bin_pixels": ("float32", "uint8", "i32", "int32", "int64"),
    "uvnn_search": ("float32", "i32", "float32", "int32", "int32", "int32", "float32"),
}

_HOST_SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>
struct U3 { unsigned x; };
static U3 blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int atomicAdd(int* a, int v) { int old = *a; *a = old + v; return old; }
#include "kernel.cu"

// Argument buffers, each followed by a guard band that must stay untouched.
static const size_t GUARD = 64;
struct Buf { std::string path; std::vector<unsigned char> bytes; size_t n; };
static std::vector<Buf> bufs;
static std::vector<long long> ints;
template <class T> T* A(int k) { return reinterpret_cast<T*>(bufs[k].bytes.data()); }
static int I(int k) { return (int)ints[k]; }

int main(int argc, char** argv) {
  // argv: kernel grid block seed then one token per kernel argument: a:<file> or i:<int>
  const std::string name = argv[1];
  const long long grid = std::atoll(argv[2]), block = std::atoll(argv[3]);
  const unsigned seed = (unsigned)std::atoll(argv[4]);
  for (int k = 5; k < argc; ++k) {
    std::string tok = argv[k];
    Buf b; b.n = 0; long long iv = 0;
    if (tok.rfind("a:", 0) == 0) {
      b.path = tok.substr(2);
      FILE* f = std::fopen(b.path.c_str(), "rb"); if (!f) return 2;
      std::fseek(f, 0, SEEK_END); b.n = (size_t)std::ftell(f); std::fseek(f, 0, SEEK_SET);
      b.bytes.assign(b.n + GUARD, 0xA5);
      if (b.n && std::fread(b.bytes.data(), 1, b.n, f) != b.n) return 2;
      std::fclose(f);
    } else if (tok.rfind("i:", 0) == 0) {
      iv = std::atoll(tok.c_str() + 2);
    } else {
      return 2;
    }
    bufs.push_back(std::move(b)); ints.push_back(iv);
  }
  std::vector<long long> order(grid * block);  // every thread of the launch, any schedule
  std::iota(order.begin(), order.end(), 0LL);
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  blockDim.x = (unsigned)block;
  for (long long t : order) {
    blockIdx.x = (unsigned)(t / block); threadIdx.x = (unsigned)(t % block);
    if (name == "uvnn_bin_pixels")
      uvnn_bin_pixels(A<const float>(0), A<const unsigned char>(1), I(2), A<int>(3), A<long long>(4));
    else if (name == "uvnn_search")
      uvnn_search(A<const float>(0), I(1), A<const float>(2), A<const int>(3), A<const int>(4), A<int>(5), A<float>(6));
    else
      return 4;
  }
  for (Buf& b : bufs) {
    if (b.path.empty()) continue;
    for (size_t j = b.n; j < b.n + GUARD; ++j) if (b.bytes[j] != 0xA5) return 3;  // out-of-bounds write
    FILE* f = std::fopen(b.path.c_str(), "wb"); std::fwrite(b.bytes.data(), 1, b.n, f); std::fclose(f);
  }
  return 0;
}
"""


class _HostKernel:
    """``RawModule.get_function(name)`` stand-in: ``kernel(grid, block, args)`` runs the host build."""

    def __init__(self, exe: Path, name: str, launches: list[str]) -> None:
        self.exe, self.name, self.launches = exe, name, launches

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        sig = _SIGNATURES[self.name]
        assert len(grid) == 1 and len(block) == 1, "1-D launches only"
        assert len(args) == len(sig), f"{self.name}: {len(args)} arguments, the kernel takes {len(sig)}"
        work = self.exe.parent / f"launch{len(self.launches)}"
        work.mkdir()
        tokens = []
        for k, (a, want) in enumerate(zip(args, sig)):
            if want == "i32":
                assert isinstance(a, np.int32), f"{self.name} arg {k}: {type(a).__name__}, expected np.int32"
                tokens.append(f"i:{int(a)}")
            else:
                assert isinstance(a, np.ndarray), f"{self.name} arg {k}: {type(a).__name__}, expected an array"
                assert a.dtype == np.dtype(want), f"{self.name} arg {k}: dtype {a.dtype}, kernel expects {want}"
                assert a.flags.c_contiguous, f"{self.name} arg {k}: not C-contiguous"
                a.tofile(work / f"arg{k}.bin")
                tokens.append(f"a:{work / f'arg{k}.bin'}")
        seed = 1000 + len(self.launches)  # a different thread order for every launch
        cmd = [
            str(self.exe),
            self.name,
            str(grid[0]),
            str(block[0]),
            str(seed),
            *tokens,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode != 3, f"{self.name}: a buffer was written past its end"
        assert proc.returncode == 0, f"{self.name}: host run failed ({proc.returncode}): {proc.stderr}"
        for k, a in enumerate(args):
            if isinstance(a, np.ndarray):
                a[...] = np.fromfile(work / f"arg{k}.bin", a.dtype).reshape(a.shape)
        self.launches.append(self.name)


class _HostModule:
    def __init__(self, exe: Path, launches: list[str]) -> None:
        self.exe, self.launches = exe, launches

    def get_function(self, name: str) -> _HostKernel:
        assert name in _SIGNATURES, f"unknown kernel {name}"
        return _HostKernel(self.exe, name, self.launches)


class HostCuda:
    """Compiles ``kernel_source(name, defines)`` as host C++ (memoised per source text)."""

    def __init__(self, root: Path, cxx: str) -> None:
        self.root, self.cxx = root, cxx
        self.exes: dict[str, Path] = {}
        self.launches: list[str] = []

    def build(self, source: str) -> Path:
        exe = self.exes.get(source)
        if exe is None:
            d = self.root / f"build{len(self.exes)}"
            d.mkdir()
            (d / "kernel.cu").write_text(source)
            (d / "main.cpp").write_text(_HOST_SHIM)
            cmd = [
                self.cxx,
                "-std=c++17",
                "-ffp-contract=off",
                "-O1",
                "-o",
                str(d / "emu"),
                str(d / "main.cpp"),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
            exe = self.exes[source] = d / "emu"
        return exe

    def load_module(self, name: str, defines: Any = None, options: Any = None) -> _HostModule:
        assert options is None, "the uv_nn path compiles with the default NVRTC options"
        # what load_module hands to NVRTC; looked up at call time so it can be patched
        source = _cuda.kernel_source(name, defines)
        return _HostModule(self.build(source), self.launches)


@pytest.fixture
def host_cuda(tmp_path: Path) -> HostCuda:
    cxx = shutil.which("g++") or shutil.which("clang++")
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
    assert len(host_cuda.exes) == 1, "one compile per grid size (the define preamble)"
