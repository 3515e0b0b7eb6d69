"""p3dmm.fitting: FLAME model, camera, rendering and fitting on NumPy / CuPy.

This package never imports torch or timm. Heavy optional modules (numba, cupy) are
imported lazily by the functions that need them.
"""

from .camera import Camera
from .errors import (
    BackendUnavailableError,
    EngineError,
    FittingError,
    InputError,
    ModelFileError,
    P3DMMError,
)
from .fitter import FitConfig, FitResult, Observation, fit
from .flame_model import FlameModel, FlameParams, FlameUV, LandmarkEmbedding
from .raster import Fragments, rasterize
from .render import RenderedMaps, render_maps

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
    "rasterize",
    "render_maps",
]
