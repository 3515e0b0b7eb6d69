"""The p3dmm exception family.

Every error p3dmm raises on purpose is a :class:`P3DMMError`. Messages name the
file or argument at fault and say what was expected, so a user can act on them
without reading the source.
"""

from __future__ import annotations


class P3DMMError(Exception):
    """Base class of every error p3dmm raises on purpose."""


class InputError(P3DMMError, ValueError):
    """An argument or input file has the wrong shape, dtype, range or content."""


class ModelFileError(P3DMMError):
    """A FLAME / UV / landmark / mask / checkpoint file is missing, truncated or wrong."""


class EngineError(P3DMMError):
    """An ONNX / TensorRT engine or its manifest cannot be built, loaded or run."""


class FittingError(P3DMMError):
    """The fitter cannot run on the given observation (e.g. no valid correspondences)."""


class BackendUnavailableError(P3DMMError, ImportError):
    """An optional backend (cupy, tensorrt, pycuda, numba, ...) is not installed or has no device."""


class P3DMMWarning(UserWarning):
    """Base class of the warnings p3dmm issues (filter them with ``warnings.filterwarnings``)."""


class FitQualityWarning(P3DMMWarning):
    """A fit's result explains too little of its input to be trusted (see ``FitResult.issues``)."""


class ConventionWarning(P3DMMWarning):
    """The input looks like it uses another convention than declared (see ``FitResult.issues``)."""
