"""p3dmm.fitting: FLAME model, camera, rendering and fitting on NumPy / CuPy.

This package never imports torch or timm.
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
from .flame_model import FlameModel, FlameParams, FlameUV, LandmarkEmbedding

__all__ = [
    "BackendUnavailableError",
    "Camera",
    "EngineError",
    "FittingError",
    "FlameModel",
    "FlameParams",
    "FlameUV",
    "InputError",
    "LandmarkEmbedding",
    "ModelFileError",
    "P3DMMError",
]
