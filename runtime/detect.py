"""Face detection behind one small interface, and the official crop rule.

A detector is any object with ``detect(image) -> list[FaceBox]`` (``image``: ``(H, W, 3)
uint8`` RGB); :func:`get_detector` returns one by name. All built-in detectors need no
download at run time:

* ``"dlib"`` (the default): dlib's HOG + linear SVM frontal detector, whose model is
  compiled into the ``dlib-bin`` wheel (Boost licence). Small images are upsampled once.
* ``"haar"``: OpenCV's Haar cascade (``haarcascade_frontalface_default.xml``, shipped in
  ``opencv-python-headless < 5``; OpenCV 5 dropped both).
* ``"lbp"``: scikit-image's LBP frontal-face cascade (shipped in scikit-image).

Why dlib is the default (``benchmarks/bench_face_detectors.py`` compares the three on the
photographs that ship in packages, on rotated, small and dark variants and on
synthetic profile views; the README has the table): it found every real face the others
found, gave no false positive on the LFW non-faces, is the fastest on the CPU, and its
wheel is 4 MB with no data file to locate. Its limits: frontal faces (profile views
beyond about 60 degrees of yaw are missed by all three), and no landmarks.

The crop (:func:`crop_box`) is the official rule: a square of 1.42 times the detection's
larger side around its centre, shifted (not padded) to stay inside the image, clamped
to the image's shorter side; the crop is then resized to 512 x 512.
"""

from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from p3dmm.fitting.base.errors import BackendUnavailableError, InputError

__all__ = [
    "CROP_SCALE",
    "DETECTORS",
    "DlibHogDetector",
    "FaceBox",
    "FaceDetector",
    "HaarDetector",
    "LbpDetector",
    "NoFaceError",
    "crop_box",
    "get_detector",
    "resize_crop",
]

log = logging.getLogger("p3dmm")

#: The official crop: 1.42 x the detection's side.
CROP_SCALE = 1.42


class NoFaceError(InputError):
    """No face was found in an image."""


@dataclass(frozen=True)
class FaceBox:
    """A detection: pixel box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) and a score."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def area(self) -> float:
        return max(self.x1 - self.x0, 0.0) * max(self.y1 - self.y0, 0.0)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


class FaceDetector(Protocol):
    """What the runtime needs from a face detector."""

    name: str

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Faces in ``image`` (``(H, W, 3) uint8`` RGB), best first."""
        ...


def _import(module: str, install: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(f"face detector needs {module}: pip install {install} ({e})") from e


class DlibHogDetector:
    """dlib's HOG frontal face detector (model compiled into the wheel)."""

    name = "dlib"

    def __init__(self, min_face: int = 80, min_score: float = 0.1) -> None:
        dlib = _import("dlib", "dlib-bin")
        self._det = dlib.get_frontal_face_detector()
        self.min_face = int(min_face)
        # real faces in bench_face_detectors.py score 0.16-1.7 (rotated and tiny ones lowest);
        # the one false positive seen, on a two-photo collage, scored 0.03
        self.min_score = float(min_score)

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        # The HOG window is 80 px. Nothing found at the image's own scale: try again
        # upsampled 2x, and 4x for small images (faces down to ~20 px), so the common
        # case pays for one pass only.
        img = np.ascontiguousarray(image)
        side = min(image.shape[:2])
        for upsample in (0, 1, 2):
            if upsample and side * 2 ** (upsample - 1) >= 8 * self.min_face:
                break
            rects, scores, _ = self._det.run(img, upsample, self.min_score)
            boxes = [FaceBox(r.left(), r.top(), r.right() + 1, r.bottom() + 1, float(s)) for r, s in zip(rects, scores)]
            if boxes:
                return sorted(boxes, key=lambda b: -b.score)
        return []


class HaarDetector:
    """OpenCV's Haar cascade (opencv-python-headless < 5)."""

    name = "haar"

    def __init__(self) -> None:
        cv2 = _import("cv2", "'opencv-python-headless<5'")
        if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
            raise BackendUnavailableError("OpenCV 5 has no Haar cascades: pip install 'opencv-python-headless<5'")
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        grey = self._cv2.cvtColor(np.ascontiguousarray(image), self._cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._cascade.detectMultiScale3(grey, scaleFactor=1.1, minNeighbors=5, outputRejectLevels=True)
        boxes = [FaceBox(x, y, x + w, y + h, float(s)) for (x, y, w, h), s in zip(rects, np.ravel(weights))]
        return sorted(boxes, key=lambda b: -b.score)


class LbpDetector:
    """scikit-image's LBP frontal-face cascade."""

    name = "lbp"

    def __init__(self, min_size: int = 60) -> None:
        skimage = _import("skimage", "scikit-image")
        from skimage import data, feature

        self._skimage = skimage
        self._cascade = feature.Cascade(data.lbp_frontal_face_cascade_filename())
        self.min_size = int(min_size)

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        from skimage.color import rgb2gray

        size = max(image.shape[:2])
        found = self._cascade.detect_multi_scale(rgb2gray(image), scale_factor=1.2, step_ratio=1,
                                                 min_size=(self.min_size, self.min_size), max_size=(size, size))  # fmt: skip
        boxes = [FaceBox(d["c"], d["r"], d["c"] + d["width"], d["r"] + d["height"], 1.0) for d in found]
        return sorted(boxes, key=lambda b: -b.area)


DETECTORS = {"dlib": DlibHogDetector, "haar": HaarDetector, "lbp": LbpDetector}


def get_detector(name: str = "auto") -> FaceDetector:
    """A detector by name; ``"auto"`` is dlib, else the first of haar, lbp that is installed.

    Raises:
        InputError: an unknown name.
        BackendUnavailableError: the named detector (or, for auto, every one) is not installed.
    """
    if name != "auto" and name not in DETECTORS:
        raise InputError(f"detector {name!r}: expected 'auto' or one of {sorted(DETECTORS)}")
    order = ["dlib", "haar", "lbp"] if name == "auto" else [name]
    reasons = []
    for n in order:
        try:
            det: FaceDetector = DETECTORS[n]()
        except BackendUnavailableError as e:
            reasons.append(str(e))
            continue
        if n != order[0]:
            log.warning("face detector: using %s (%s)", n, "; ".join(reasons))
        return det
    raise BackendUnavailableError("no face detector is installed: " + "; ".join(reasons))


def crop_box(box: tuple[float, float, float, float], width: int, height: int, scale: float = CROP_SCALE) -> tuple[int, int, int]:
    """The official square crop of a detection: ``(x0, y0, side)`` in whole pixels.

    The side is ``scale`` times the box's larger side (at most the image's shorter side);
    the square is centred on the box and shifted, not padded, to lie inside the image.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"box {box}: expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    side = int(round(min(scale * max(x1 - x0, y1 - y0), width, height)))
    side = max(side, 1)
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, side


def resize_crop(image: np.ndarray, left: int, top: int, side: int, size: int = 512) -> np.ndarray:
    """The ``side x side`` crop at ``(left, top)`` resized to ``size x size`` (Pillow, bicubic
    with antialiasing when shrinking)."""
    from PIL import Image

    crop = image[top : top + side, left : left + side]
    if crop.shape[:2] != (side, side):
        raise InputError(f"crop ({left}, {top}, {side}) is outside the {image.shape[1]}x{image.shape[0]} image")
    if side == size:
        return np.ascontiguousarray(crop)
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
