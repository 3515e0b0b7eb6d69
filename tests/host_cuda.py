"""Run the CUDA sources of ``p3dmm.fitting`` (``render/rasterize.cu``, ``fitter/uv_nn.cu``) on the host (there is no GPU in CI).

The exact text CuPy would hand to NVRTC (:func:`p3dmm.fitting.base.cuda.kernel_source`:
define preamble + file) is compiled as host C++ (``-std=c++17 -ffp-contract=off``) into a
shared library behind a small shim for the CUDA built-ins and intrinsics, and loaded with
ctypes. :meth:`HostCuda.load_module` stands in for ``load_module`` and returns an object
with the ``RawModule.get_function(name)(grid, block, args)`` interface, so the Python
launch code of :mod:`p3dmm.fitting.render.raster` and :mod:`p3dmm.fitting.fitter.uv_nn` runs unchanged.

Each launch runs every thread of its grid (``blocks x block``, including the out-of-range
tail) serially, in a different shuffled order each time (blocks shuffled, and the threads
within each block: a kernel must not depend on thread scheduling), checks that the arguments match the kernel's C signature (CuPy passes
raw pointers, so a dtype mismatch would be silent on a GPU: see :data:`SIGNATURES`) and
that no buffer is written past its end (each array is copied into a guarded buffer).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
from p3dmm.fitting.base import cuda as _cuda

def _float_variants(prefix: str, kernels: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The ``_f32`` and ``_f64`` kernels of templated sources: ``"T"`` in a signature is the float type."""
    return {
        f"{prefix}{name}_{suf}": tuple(dt if t == "T" else t for t in sig)
        for suf, dt in (("f32", "float32"), ("f64", "float64"))
        for name, sig in kernels.items()
    }


#: C parameter types of every kernel, in order: an array dtype name (a pointer to that
#: element type), ``"i32"`` (an ``int`` passed by value, np.int32) or ``"f64"`` (a
#: ``double`` by value, np.float64).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "project_vertices": ("float64", "i32", "float64", "f64", "float64", "int64", "int32"),
    "raster_faces": (
        "int32", "i32", "i32", "float64", "float64", "int64", "int32", "i32", "i32", "i32", "uint64",
    ),  # fmt: skip
    "resolve_pixels": ("uint64", "int32", "float64", "float64", "i32", "i32", "int32", "float32", "float32"),
    "uvnn_bin_pixels": ("float32", "uint8", "i32", "i32", "int32", "int64"),
    "uvnn_search": ("float32", "i32", "i32", "float32", "i32", "int32", "int32", "int32", "float32"),
    # base/rotation.cu
    **_float_variants("rot_", {
        "rodrigues": ("T", "i32", "T"),
        "rodrigues_vjp": ("T", "T", "i32", "T"),
        "rodrigues_jvp": ("T", "T", "i32", "i32", "T"),
        "axis_angle": ("T", "i32", "T"),
    }),
    # model/lbs.cu
    **_float_variants("lbs_", {
        "chain": ("T", "T", "int32", "i32", "T", "T", "T"),
        "chain_vjp": ("T", "T", "int32", "T", "T", "T", "i32", "T", "T"),
        "jacobian_chain": ("T", "T", "T", "T", "T", "int32", "i32", "i32", "i32", "T", "T", "T"),
        "vertex_jacobian": ("int64", "i32", "i32", "i32", "i32", "T", "T", "T", "T", "T", "T", "T", "T", "T"),
    }),
    # fitter/irls.cu
    **_float_variants("", {
        "irls_normal_rows": ("T", "T", "uint8", "f64", "T", "f64", "T", "i32", "i32", "T"),
        "irls_uv_rows": ("T", "T", "uint8", "f64", "T", "f64", "T", "i32", "i32", "T"),
        "nrm_pixels": ("T", "int64", "int32", "T", "int64", "T", "uint8", "T", "f64", "i32",
                       "T", "uint8", "T", "int64", "T"),  # fmt: skip
        "nrm_pixels_grad": ("T", "int64", "int32", "T", "int64", "T", "uint8", "T", "f64", "i32", "f64", "T",
                            "T", "uint8", "T", "int64", "T", "T", "T", "T"),  # fmt: skip
    }),
}

_C_TYPES = {
    "float32": "float",
    "float64": "double",
    "int32": "int",
    "int64": "long long",
    "uint64": "unsigned long long",
    "uint8": "unsigned char",
    "i32": "int",
    "f64": "double",
}

_SHIM = r"""
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>
using std::fabs; using std::isfinite; using std::isinf; using std::llrint; using std::max; using std::min;
struct U3 { unsigned x; };
static U3 blockIdx, blockDim, threadIdx;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline float __double2float_rn(double d) { return (float)d; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int atomicAdd(int* a, int v) { int old = *a; *a = old + v; return old; }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
  unsigned long long old = *a; if (v < old) *a = v; return old; }
#include "kernel.cu"
// Blocks in a shuffled order, and the threads of each block in a shuffled order of their
// own: every pair of threads runs in either order (as the whole-grid shuffle it replaced
// did), while a block's threads touch neighbouring memory (6M-thread element-wise
// launches ran 10x slower through a whole-grid shuffle).
template <typename F>
static void for_each_thread(long long grid, long long block, unsigned seed, F run) {
  std::mt19937 rng(seed);
  std::vector<long long> blocks(grid), threads(block);
  std::iota(blocks.begin(), blocks.end(), 0LL);
  std::iota(threads.begin(), threads.end(), 0LL);
  std::shuffle(blocks.begin(), blocks.end(), rng);
  blockDim.x = (unsigned)block;
  for (long long b : blocks) {
    std::shuffle(threads.begin(), threads.end(), rng);
    for (long long t : threads) {
      blockIdx.x = (unsigned)b; threadIdx.x = (unsigned)t;
      run();
    }
  }
}
"""

_LAUNCHER = """
extern "C" int launch_{name}(long long grid, long long block, unsigned seed, void** a) {{
  for_each_thread(grid, block, seed, [&]() {{ {name}({args}); }});
  return 0;
}}
"""

#: Host builds by (compiler, source text), shared by every HostCuda of the process (a
#: build takes a second or two; the emulated tests would otherwise repeat each one).
_BUILT: dict[tuple[str, str], ctypes.CDLL] = {}

_GUARD = 64  # bytes after each argument buffer that must stay untouched
_GUARD_BYTE = 0xA5


def _launcher(name: str) -> str:
    args = []
    for k, t in enumerate(SIGNATURES[name]):
        c = _C_TYPES[t]
        args.append(f"*({c}*)a[{k}]" if t in ("i32", "f64") else f"({c}*)a[{k}]")
    return _LAUNCHER.format(name=name, args=", ".join(args))


class HostKernel:
    """``RawModule.get_function(name)`` stand-in: ``kernel(grid, block, args)``."""

    def __init__(self, lib: ctypes.CDLL, name: str, host: "HostCuda") -> None:
        self.fn = getattr(lib, f"launch_{name}")
        self.fn.restype = ctypes.c_int
        self.fn.argtypes = [ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        self.name, self.host = name, host

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...]) -> None:
        sig = SIGNATURES[self.name]
        assert len(grid) == 1 and len(block) == 1, f"{self.name}: 1-D launches only"
        assert len(args) == len(sig), f"{self.name}: {len(args)} arguments, the kernel takes {len(sig)}"
        keep: list[Any] = []
        ptrs = []
        copies: list[tuple[np.ndarray, np.ndarray]] = []
        for k, (a, want) in enumerate(zip(args, sig)):
            if want == "i32":
                assert isinstance(a, np.int32), f"{self.name} arg {k}: {type(a).__name__}, expected np.int32"
                c: Any = ctypes.c_int32(int(a))
            elif want == "f64":
                assert isinstance(a, np.float64), f"{self.name} arg {k}: {type(a).__name__}, expected np.float64"
                c = ctypes.c_double(float(a))
            else:
                arr = self.host.unwrap(a)
                assert isinstance(arr, np.ndarray), f"{self.name} arg {k}: {type(a).__name__}, expected an array"
                assert arr.dtype == np.dtype(want), f"{self.name} arg {k}: dtype {arr.dtype}, kernel expects {want}"
                assert arr.flags.c_contiguous, f"{self.name} arg {k}: not C-contiguous"
                buf = np.full(arr.nbytes + _GUARD, _GUARD_BYTE, np.uint8)
                buf[: arr.nbytes] = arr.reshape(-1).view(np.uint8)
                copies.append((arr, buf))
                c = buf
            keep.append(c)
            ptrs.append(c.ctypes.data if isinstance(c, np.ndarray) else ctypes.addressof(c))
        seed = 1000 + len(self.host.launches)  # a different thread order for every launch
        rc = self.fn(grid[0], block[0], seed, (ctypes.c_void_p * len(ptrs))(*ptrs))
        assert rc == 0, f"{self.name}: host launch failed ({rc})"
        for arr, buf in copies:
            assert (buf[arr.nbytes :] == _GUARD_BYTE).all(), f"{self.name}: a buffer was written past its end"
            arr.reshape(-1).view(np.uint8)[...] = buf[: arr.nbytes]
        self.host.launches.append(self.name)


class HostModule:
    def __init__(self, lib: ctypes.CDLL, host: "HostCuda") -> None:
        self.lib, self.host = lib, host

    def get_function(self, name: str) -> HostKernel:
        assert name in SIGNATURES, f"unknown kernel {name}"
        return HostKernel(self.lib, name, self.host)


class HostCuda:
    """Compiles ``kernel_source(name, defines)`` as host C++ (memoised per source text).

    Args:
        root: scratch directory for the builds.
        cxx: host C++ compiler.
        unwrap: maps a kernel array argument to the NumPy array holding its data (the
            identity for NumPy arguments; the device emulation passes its own).
    """

    def __init__(self, root: Path, cxx: str, unwrap: Any = None) -> None:
        self.root, self.cxx = root, cxx
        self.unwrap = unwrap or (lambda a: a)
        self.libs: dict[str, ctypes.CDLL] = {}
        self.launches: list[str] = []
        self.loads: list[tuple[str, Any, Any]] = []

    def build(self, source: str) -> ctypes.CDLL:
        lib = self.libs.get(source) or _BUILT.get((self.cxx, source))
        if lib is None:
            d = self.root / f"build{len(self.libs)}"
            d.mkdir(parents=True)
            (d / "kernel.cu").write_text(source)
            names = [n for n in SIGNATURES if f" {n}(" in source]
            assert names, "no known kernel in the source"
            (d / "main.cpp").write_text(_SHIM + "".join(_launcher(n) for n in names))
            out = d / "libkernel.so"
            cmd = [self.cxx, "-std=c++17", "-ffp-contract=off", "-O2", "-shared", "-fPIC", "-o", str(out), str(d / "main.cpp")]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
            lib = _BUILT[(self.cxx, source)] = ctypes.CDLL(str(out))
        self.libs[source] = lib
        return lib

    def load_module(self, package: str, name: str, defines: Any = None, options: Any = None) -> HostModule:
        """``p3dmm.fitting.base.cuda.load_module`` stand-in (records each call)."""
        self.loads.append((name, dict(defines or {}), options))
        # what load_module hands to NVRTC; looked up at call time so it can be patched
        return HostModule(self.build(_cuda.kernel_source(package, name, defines)), self)


def host_compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")
