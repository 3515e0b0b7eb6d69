"""Compile-check every CUDA source of p3dmm.fitting (no GPU needed).

* nvcc: each ``*.cu`` file on its own (so every file must give its constants
  defaults), warnings are errors.
* NVRTC: the exact text :func:`p3dmm.fitting.base.cuda.load_module` compiles
  (define preamble + file), with the module's default options, for sm_90 PTX. NVRTC
  has no standard headers, so this catches what nvcc alone would not.

New ``.cu`` files in the packages of :data:`p3dmm.fitting.base.cuda.KERNEL_PACKAGES` are
picked up automatically.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources

import pytest
from p3dmm.fitting.base import cuda as _cuda

CU_FILES = sorted(
    (package, p.name)
    for package in _cuda.KERNEL_PACKAGES
    for p in resources.files(package).iterdir()
    if p.name.endswith(".cu")
)


def test_there_are_kernels() -> None:
    assert ("p3dmm.fitting.render", "rasterize.cu") in CU_FILES
    assert ("p3dmm.fitting.fitter", "uv_nn.cu") in CU_FILES


def test_every_shipped_cu_file_is_in_a_kernel_package() -> None:
    """A .cu file outside KERNEL_PACKAGES would escape these compile checks."""
    from pathlib import Path

    import p3dmm.fitting

    root = Path(p3dmm.fitting.__file__).parent
    found = {str(p.relative_to(root)) for p in root.rglob("*.cu")}
    listed = {f"{pkg.rsplit('.', 1)[1]}/{name}" for pkg, name in CU_FILES}
    assert found == listed


@pytest.mark.parametrize(("package", "filename"), CU_FILES)
def test_nvcc_compiles(package: str, filename: str) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH (install the CUDA toolkit to compile-check kernels)")
    with resources.as_file(resources.files(package).joinpath(filename)) as path:
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


@pytest.mark.parametrize(("package", "filename"), CU_FILES)
def test_nvrtc_compiles_module_source(package: str, filename: str) -> None:
    name = filename[: -len(".cu")]
    _nvrtc_compile(_cuda.kernel_source(package, name), filename, _cuda.DEFAULT_OPTIONS)


def test_nvrtc_compiles_rasterizer_as_loaded() -> None:
    """The rasterizer with the defines and options raster.py passes to load_module."""
    from p3dmm.fitting.render import raster

    source = _cuda.kernel_source("p3dmm.fitting.render", "rasterize", raster._CUDA_DEFINES)
    _nvrtc_compile(source, "rasterize.cu", raster._CUDA_OPTIONS)
