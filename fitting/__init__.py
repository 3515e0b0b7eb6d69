"""p3dmm.fitting: FLAME model, camera, rendering and fitting on NumPy / CuPy.

Layers, each importing only the ones before it: ``base`` (errors, array modules, camera,
rotations, geometry, mesh files, atomic writes, the CUDA loader, the CLI runner) <-
``model`` (FLAME arrays, LBS, FLAME files, synthetic head) <- ``render`` (rasterizer,
maps, photo) <- ``fitter`` (energy, UV search, initialisation, the ``paper`` and ``fast``
solvers, ``fit``); ``metrics`` uses ``base`` only. This module re-exports the public API.

This package never imports torch or timm. Heavy optional modules (numba, cupy) are
imported lazily by the functions that need them.
"""

from .base.camera import Camera
from .base.errors import (
    BackendUnavailableError,
    EngineError,
    FittingError,
    InputError,
    ModelFileError,
    P3DMMError,
)
from .fitter.config import FitConfig, Observation
from .fitter.fit import fit, fit_batch
from .fitter.result import FitResult
from .model.arrays import FlameUV, LandmarkEmbedding
from .model.flame_model import FlameModel
from .model.params import FlameParams
from .render.maps import RenderedMaps, render_maps
from .render.raster import Fragments, rasterize

__all__ = [
    "BackendUnavailableError",
    "Camera",
    "EngineError",
    "FitConfig",
    "FitResult",
    "FittingError",
    "FlameModel",
    "FlameParams",
    "FlameUV",
    "Fragments",
    "InputError",
    "LandmarkEmbedding",
    "ModelFileError",
    "Observation",
    "P3DMMError",
    "RenderedMaps",
    "fit",
    "fit_batch",
    "rasterize",
    "render_maps",
]
