"""Compile-check every CUDA source in p3dmm/fitting/kernels (no GPU needed).

* nvcc: each ``*.cu`` file on its own (so every file must give its constants
  defaults), warnings are errors.
* NVRTC: the exact text :func:`p3dmm.fitting.kernels._cuda.load_module` compiles
  (define preamble + file), with the module's default options, for sm_90 PTX. NVRTC
  has no standard headers, so this catches what nvcc alone would not.

New ``.cu`` files are picked up automatically.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources

import pytest

from p3dmm.fitting.kernels import _cuda

KERNEL_DIR = resources.files("p3dmm.fitting.kernels")
CU_FILES = sorted(p.name for p in KERNEL_DIR.iterdir() if p.name.endswith(".cu"))


def test_there_are_kernels() -> None:
    assert "rasterize.cu" in CU_FILES


@pytest.mark.parametrize("filename", CU_FILES)
def test_nvcc_compiles(filename: str) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH (install the CUDA toolkit to compile-check kernels)")
    with resources.as_file(KERNEL_DIR.joinpath(filename)) as path:
        cmd = [nvcc, "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings", "-c", str(path), "-o", "/dev/null"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"


def _nvrtc():  # type: ignore[no-untyped-def]
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001 - cupy or libnvrtc missing
        pytest.skip(f"NVRTC not loadable ({type(e).__name__}: {e})")
    return nvrtc


def _nvrtc_compile(source: str, filename: str, options: tuple[str, ...]) -> None:
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["--gpu-architecture=compute_90", *options])
        except nvrtc.NVRTCError as e:
            pytest.fail(f"NVRTC failed on {filename}: {e}\n{nvrtc.getProgramLog(prog)}")
        assert len(nvrtc.getPTX(prog)) > 0
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.parametrize("filename", CU_FILES)
def test_nvrtc_compiles_module_source(filename: str) -> None:
    name = filename[: -len(".cu")]
    _nvrtc_compile(_cuda.kernel_source(name), filename, _cuda.DEFAULT_OPTIONS)


def test_nvrtc_compiles_rasterizer_as_loaded() -> None:
    """The rasterizer with the defines and options raster.py passes to load_module."""
    from p3dmm.fitting import raster

    source = _cuda.kernel_source("rasterize", raster._CUDA_DEFINES)
    _nvrtc_compile(source, "rasterize.cu", raster._CUDA_OPTIONS)
