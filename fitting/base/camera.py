"""Pinhole camera, OpenCV convention (x right, y down, z forward).

Pixel coordinates are continuous with the centre of pixel (row i, column j) at
``(x, y) = (j, i)``, as in OpenCV; the principal point of a centred camera on a
W x H image is ``((W - 1) / 2, (H - 1) / 2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError
from .xp import asarray_on, get_array_module, to_numpy

__all__ = ["Camera", "FLAME_TO_OPENCV"]

#: Rotation taking FLAME's frame (x left-of-subject, y up, z out of the face) to an
#: OpenCV camera looking at the face from the front.
FLAME_TO_OPENCV = np.diag([1.0, -1.0, -1.0]).astype(np.float64)


@dataclass
class Camera:
    """Pinhole camera: ``x_cam = R @ X + t``; ``u = f * x/z + cx``, ``v = f * y/z + cy``.

    Attributes:
        focal: scalar focal length in pixels (square pixels).
        principal: ``(2,)`` principal point (cx, cy) in pixels.
        R: ``(3, 3)`` world-to-camera rotation.
        t: ``(3,)`` world-to-camera translation, metres.
        width: image width in pixels.
        height: image height in pixels.
    """

    focal: Any
    principal: Any
    R: Any
    t: Any
    width: int
    height: int

    def __post_init__(self) -> None:
        if tuple(np.shape(self.principal)) != (2,):
            raise InputError(f"Camera.principal has shape {np.shape(self.principal)}, expected (2,)")
        if tuple(np.shape(self.R)) != (3, 3):
            raise InputError(f"Camera.R has shape {np.shape(self.R)}, expected (3, 3)")
        if tuple(np.shape(self.t)) != (3,):
            raise InputError(f"Camera.t has shape {np.shape(self.t)}, expected (3,)")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise InputError(f"Camera size must be positive, got {self.width}x{self.height}")

    @staticmethod
    def frontal(
        distance: float = 1.0,
        focal: float | None = None,
        width: int = 512,
        height: int = 512,
        dtype: Any = np.float32,
    ) -> "Camera":
        """Camera on FLAME's +z axis looking at the origin, image centred.

        Args:
            distance: camera-to-origin distance in metres.
            focal: focal length in pixels; default makes a 0.3 m wide region fill the image.
        """
        if focal is None:
            focal = width * distance / 0.3
        return Camera(
            focal=np.asarray(focal, dtype=dtype),
            principal=np.array([(width - 1) / 2, (height - 1) / 2], dtype=dtype),
            R=FLAME_TO_OPENCV.astype(dtype),
            t=np.array([0.0, 0.0, distance], dtype=dtype),
            width=int(width),
            height=int(height),
        )

    @property
    def K(self) -> np.ndarray:
        """``(3, 3)`` intrinsic matrix (host)."""
        f = float(to_numpy(self.focal))
        cx, cy = (float(v) for v in to_numpy(self.principal))
        return np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]], dtype=np.float64)

    def to_camera(self, points: Any) -> Any:
        """World ``(N, 3)`` -> camera-frame ``(N, 3)``."""
        xp = get_array_module(points)
        R = asarray_on(xp, self.R, points.dtype)
        t = asarray_on(xp, self.t, points.dtype)
        # x_cam[n, i] = sum_j R[i, j] * X[n, j] + t[i]
        return points @ R.T + t

    def project_camera(self, points_cam: Any) -> Any:
        """Camera-frame ``(N, 3)`` -> pixel coordinates ``(N, 2)``."""
        xp = get_array_module(points_cam)
        f = asarray_on(xp, self.focal, points_cam.dtype)
        c = asarray_on(xp, self.principal, points_cam.dtype)
        return f * points_cam[:, :2] / points_cam[:, 2:3] + c

    def project(self, points: Any) -> Any:
        """World ``(N, 3)`` -> pixel coordinates ``(N, 2)``."""
        return self.project_camera(self.to_camera(points))

    def project_camera_jacobian(self, points_cam: Any) -> Any:
        """``(N, 2, 3)`` derivative of :meth:`project_camera` w.r.t. the camera-frame points.

        ``J[n, k, :] = d pixel_k / d x_cam = f / z * e_k - f * x_k / z^2 * e_z``.
        """
        xp = get_array_module(points_cam)
        f = asarray_on(xp, self.focal, points_cam.dtype)
        x, y, z = points_cam[:, 0], points_cam[:, 1], points_cam[:, 2]
        zero = xp.zeros_like(z)
        fz = f / z
        return xp.stack(
            [xp.stack([fz, zero, -fz * x / z], -1), xp.stack([zero, fz, -fz * y / z], -1)], 1
        )

    def scaled(self, width: int, height: int) -> "Camera":
        """The same view for an image of ``width x height`` pixels (pixel-centre convention).

        Focal and principal point scale by ``width / self.width`` about the pixel corner
        ``(-0.5, -0.5)``: ``c' = (c + 0.5) * s - 0.5``. Computed in float64 and cast back to
        the camera's dtype; arrays stay on their device (nothing is read back).

        Raises:
            InputError: the aspect ratio changes, or the size is not positive.
        """
        if (int(width), int(height)) == (self.width, self.height):
            return self
        if int(width) <= 0 or int(height) <= 0:
            raise InputError(f"Camera.scaled: size {width}x{height}, expected positive integers")
        sx, sy = width / self.width, height / self.height
        if abs(sx - sy) > 1e-6:
            raise InputError(
                f"Camera.scaled: {width}x{height} changes the camera's aspect ratio ({self.width}x{self.height})"
            )
        xp = get_array_module(self.principal, self.focal)
        dtype = getattr(self.principal, "dtype", np.float32)
        c = asarray_on(xp, self.principal, np.float64)
        return Camera(
            focal=(asarray_on(xp, self.focal, np.float64) * sx).astype(dtype),
            principal=((c + 0.5) * sx - 0.5).astype(dtype),
            R=self.R,
            t=self.t,
            width=int(width),
            height=int(height),
        )

    def astype(self, xp: Any, dtype: Any = np.float32) -> "Camera":
        return Camera(
            focal=asarray_on(xp, self.focal, dtype),
            principal=asarray_on(xp, self.principal, dtype),
            R=asarray_on(xp, self.R, dtype),
            t=asarray_on(xp, self.t, dtype),
            width=self.width,
            height=self.height,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "focal": float(to_numpy(self.focal)),
            "principal": to_numpy(self.principal).tolist(),
            "R": to_numpy(self.R).tolist(),
            "t": to_numpy(self.t).tolist(),
            "width": self.width,
            "height": self.height,
        }

    @staticmethod
    def from_dict(d: dict[str, Any], dtype: Any = np.float32) -> "Camera":
        try:
            return Camera(
                focal=np.asarray(d["focal"], dtype=dtype),
                principal=np.asarray(d["principal"], dtype=dtype),
                R=np.asarray(d["R"], dtype=dtype),
                t=np.asarray(d["t"], dtype=dtype),
                width=int(d["width"]),
                height=int(d["height"]),
            )
        except KeyError as e:
            raise InputError(f"camera dict lacks key {e}; expected focal, principal, R, t, width, height") from e
