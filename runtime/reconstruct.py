"""``Reconstructor``: image -> face crop -> predicted maps -> FLAME fit -> :class:`Reconstruction`.

::

    rec = Reconstructor.from_engines("engines/", backend="auto", device="auto")
    r = rec.reconstruct("photo.jpg")            # the largest face; box="full" for a crop
    r.save("out/photo")                         # meshes, params, camera, maps, texture, report

The predictors and the fits run batched (:meth:`Reconstructor.reconstruct_batch`; the
fits through :func:`p3dmm.fitting.fit_batch`, one set of solver launches per batch). The fitter's ``normal_space`` and the FLAME model's UV layout come from the
engines' manifest: official engines predict head-space normals in FLAME 2020's layout
and need ``model=FlameModel.load(...)``; engines trained on the synthetic head predict in
its layout, which is the default model. When the engines have no ``mask`` output, the
face mask is the set of pixels whose predicted UV lies on the atlas charts of the fitted
regions (face and ears): a predictor trained on face pixels gives background pixels UV
off those charts only approximately, so engines with a mask channel are better.

Thread safety: one :class:`Reconstructor` can be shared by threads; predictor calls are
serialised per backend where the engine needs it (TensorRT), the fit is a pure function,
and results equal serial calls.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from p3dmm.fitting import Camera, FitConfig, FitResult, FlameModel, FlameParams, Observation, fit_batch
from p3dmm.fitting.base.atomic_io import atomic_write, atomic_write_bytes
from p3dmm.fitting.base.errors import EngineError, InputError, P3DMMError
from p3dmm.fitting.base.mesh_io import save_mesh
from p3dmm.fitting.base.xp import get_array_module, resolve_device

from .backends import Backend, load_backend
from .decode import decode_image
from .detect import FaceBox, FaceDetector, NoFaceError, crop_box, get_detector, resize_crop
from .images import normals_to_rgb, overlay_mesh, save_png, uv_to_rgb
from .texture import photo_texture

__all__ = ["CROP_SIZE", "Reconstruction", "Reconstructor", "crop_camera_to_image", "default_engines_dir", "mask_from_uv"]

log = logging.getLogger("p3dmm")

CROP_SIZE = 512


def default_engines_dir() -> Path:
    """Where the embedded default predictors live (``p3dmm/runtime/engines``)."""
    return Path(__file__).resolve().parent / "engines"


def crop_camera_to_image(camera: Camera, left: int, top: int, side: int, width: int, height: int) -> Camera:
    """The crop's camera in the original image's pixel frame (pixel centres at integers).

    Crop pixel ``x`` (of ``CROP_SIZE``) covers original pixels ``left + x s .. left + (x + 1) s``
    with ``s = side / CROP_SIZE``, so ``x' = left + (x + 0.5) s - 0.5``.
    """
    s = side / float(camera.width)
    pp = np.asarray(camera.principal, np.float64)
    principal = np.array([left + (pp[0] + 0.5) * s - 0.5, top + (pp[1] + 0.5) * s - 0.5], np.float32)
    return dataclasses.replace(camera, focal=np.float32(float(camera.focal) * s), principal=principal,
                               width=int(width), height=int(height))  # fmt: skip


def mask_from_uv(uv: np.ndarray, model: FlameModel, regions: Sequence[str]) -> np.ndarray:
    """``(H, W) bool``: pixels whose UV (``(H, W, 2)``) lies on the atlas charts of ``regions``."""
    assert model.uv is not None
    found = [model.masks[r] for r in regions if r in model.masks]
    if found:
        keep = np.isin(np.asarray(model.faces), np.concatenate(found)).all(axis=1)
        cov = model.uv.coverage(512, margin=1, faces=np.nonzero(keep)[0])
    else:  # a model without region masks: the whole atlas
        cov = model.uv.coverage(512, margin=1)
    R = cov.shape[0]
    col = np.clip((uv[..., 0] * R).astype(np.int64), 0, R - 1)
    row = np.clip(((1.0 - uv[..., 1]) * R).astype(np.int64), 0, R - 1)
    return cov[row, col]


@dataclass
class Reconstruction:
    """One reconstructed face (host arrays).

    Attributes:
        vertices / neutral_vertices: ``(V, 3) float32`` posed / identity-only mesh, FLAME
            frame, metres.
        faces: ``(F, 3)`` triangles.
        params: fitted :class:`FlameParams`.
        camera: the fitted camera in the 512 px crop's pixel frame.
        camera_image: the same camera in the original image's pixel frame.
        box: the face box ``(x0, y0, x1, y1)`` in the original image (detection, caller's
            box or the full image) and ``crop``: the square crop ``(left, top, side)``.
        maps: predicted ``normals (512, 512, 3)``, ``uv (512, 512, 2)``, ``mask (512, 512)``.
        fit: the :class:`FitResult` (``fit.report``, with the quality and confidence).
        timings: seconds per stage (decode, detect, crop, predict, fit, total).
        image: the original ``(H, W, 3) uint8`` photo; ``crop_image`` the 512 px crop.
        model: the FLAME model the fit used (for UVs when saving).
        normal_space / engines: what the predictors output and where they came from.
    """

    vertices: np.ndarray
    neutral_vertices: np.ndarray
    faces: np.ndarray
    params: FlameParams
    camera: Camera
    camera_image: Camera
    box: tuple[float, float, float, float]
    crop: tuple[int, int, int]
    maps: dict[str, np.ndarray]
    fit: FitResult
    timings: dict[str, float]
    image: np.ndarray
    crop_image: np.ndarray
    model: FlameModel = field(repr=False)
    normal_space: str = "camera"
    engines: str = ""

    @property
    def confidence(self) -> float:
        return float(self.fit.quality.get("confidence", 0.0))

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (``report.json``)."""
        return {"box": list(self.box), "crop": list(self.crop), "normal_space": self.normal_space,
                "engines": self.engines, "timings": self.timings, "fit": self.fit.report}  # fmt: skip

    def save(self, directory: str | os.PathLike[str], texture_size: int = 1024) -> Path:
        """Write the outputs into ``directory`` (created), each file atomically:

        ``posed.obj`` / ``neutral.obj`` (FLAME vertex order, the model's UVs; ``posed.obj``
        references ``texture.mtl``), ``posed.ply``, ``params.npz`` (keys ``shape``,
        ``expr``, ``pose`` (5, 3) axis-angle: global, neck, jaw, left eye, right eye,
        ``transl``, ``camera_focal``, ``camera_principal``, ``camera_R``, ``camera_t``
        in the original image's frame), ``camera.json`` (both cameras), ``overlay.png``
        (the shaded mesh blended over the photo), ``crop.png``, ``normals.png``,
        ``uv.png``, ``mask.png``, ``texture.png`` (the photo's colours in the UV layout,
        alpha = visible texels), ``texture.mtl`` and ``report.json``.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        uv = self.model.uv
        save_mesh(out / "posed.obj", self.vertices, self.faces, uv=uv)
        save_mesh(out / "neutral.obj", self.neutral_vertices, self.faces, uv=uv)
        save_mesh(out / "posed.ply", self.vertices, self.faces)
        if uv is not None:
            tex = photo_texture(self.model, self.vertices, self.camera_image, self.image, texture_size)
            save_png(out / "texture.png", tex)
            atomic_write_bytes(out / "texture.mtl", b"newmtl face\nKa 1 1 1\nKd 1 1 1\nmap_Kd texture.png\n")
            obj = (out / "posed.obj").read_text()
            atomic_write_bytes(out / "posed.obj", ("mtllib texture.mtl\nusemtl face\n" + obj).encode())
        cam = self.camera_image
        buf: dict[str, Any] = {
            "shape": self.params.shape, "expr": self.params.expr, "pose": self.params.pose,
            "transl": self.params.transl, "camera_focal": np.float32(cam.focal),
            "camera_principal": np.asarray(cam.principal, np.float32), "camera_R": np.asarray(cam.R, np.float32),
            "camera_t": np.asarray(cam.t, np.float32),
        }  # fmt: skip
        arrays = {k: np.asarray(v) for k, v in buf.items()}
        atomic_write(out / "params.npz", lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]

        def camera_dict(c: Camera) -> dict[str, Any]:
            return {"focal": float(c.focal), "principal": [float(v) for v in np.asarray(c.principal)],
                    "R": np.asarray(c.R, float).tolist(), "t": [float(v) for v in np.asarray(c.t)],
                    "width": int(c.width), "height": int(c.height)}  # fmt: skip

        cams = {"convention": "OpenCV pinhole, x_cam = R X + t, u = f x/z + cx; pixel centres at integers",
                "image": camera_dict(self.camera_image), "crop": camera_dict(self.camera), "crop_box": list(self.crop)}  # fmt: skip
        atomic_write_bytes(out / "camera.json", json.dumps(cams, indent=1).encode())
        save_png(out / "overlay.png", overlay_mesh(self.image, self.vertices, self.faces, self.camera_image))
        save_png(out / "crop.png", self.crop_image)
        mask = self.maps["mask"]
        save_png(out / "normals.png", normals_to_rgb(self.maps["normals"], mask))
        save_png(out / "uv.png", uv_to_rgb(self.maps["uv"], mask))
        save_png(out / "mask.png", (mask * 255).astype(np.uint8))
        atomic_write_bytes(out / "report.json", json.dumps(self.report(), indent=1, default=float).encode())
        return out


class Reconstructor:
    """Predictors + fitter (see the module docstring).

    Args:
        normals / uv: the two predictor backends.
        model: the FLAME model whose UV layout the uv predictor outputs.
        config: fitting configuration (``focal`` is set per call when given;
            ``check_conventions`` is turned off: the manifest states the conventions).
        normal_space: what the normals predictor outputs (``"camera"`` / ``"head"``).
        detector: a :class:`FaceDetector`, a name for :func:`get_detector`, or None
            (then every call needs ``box``).
        device: the fitting device (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, normals: Backend, uv: Backend, model: FlameModel, config: FitConfig | None = None,
                 normal_space: str = "camera", detector: FaceDetector | str | None = "auto", device: str = "cpu",
                 engines: str = "") -> None:  # fmt: skip
        self.normals, self.uv, self.model = normals, uv, model
        # the conventions are the manifest's, so a collapsed fit is a poor prediction (reported
        # in the result's quality), never a convention mistake of the caller
        self.config = dataclasses.replace(config or FitConfig(), check_conventions=False)
        self.normal_space = normal_space
        self.device = device
        self.engines = engines
        self._detector_spec = detector
        self._detector: FaceDetector | None = detector if not isinstance(detector, (str, type(None))) else None
        self._detector_lock = threading.Lock()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_engines(cls, directory: str | os.PathLike[str], backend: str = "auto", device: str = "auto",
                     model: FlameModel | None = None, config: FitConfig | None = None,
                     detector: FaceDetector | str | None = "auto", precision: str | None = None,
                     threads: int = 0) -> Reconstructor:  # fmt: skip
        """Load both predictors of an engine directory (see :func:`load_backend`).

        Raises:
            EngineError: a missing manifest, model or file, a file that fails its checks,
                or a model whose UV layout differs from the engines'.
            BackendUnavailableError: ``backend`` cannot run here.
        """
        directory = Path(directory)
        normals = load_backend(directory, "normals", backend, precision, threads)
        uv = load_backend(directory, "uv", backend, precision, threads)
        layout = uv.entry.uv_layout
        if model is None:
            model = FlameModel.synthetic(seed=0)
            if layout != model.uv.layout_id():  # type: ignore[union-attr]
                raise EngineError(
                    f"{directory}: the uv predictor outputs UV layout {layout!r}, not the synthetic head's "
                    f"{model.uv.layout_id()!r}; pass model=FlameModel.load(...) with that layout"  # type: ignore[union-attr]
                )
        elif model.uv is None:
            raise EngineError(f"Reconstructor: model {model.name!r} has no UV layout")
        elif layout not in (None, "flame2020", "unknown") and layout != model.uv.layout_id():
            raise EngineError(f"{directory}: the uv predictor outputs UV layout {layout!r}, the model {model.name!r} "
                              f"has {model.uv.layout_id()!r}")  # fmt: skip
        if device == "auto":
            device = "cpu"
            if normals.name in ("tensorrt", "ort-cuda", "ort-tensorrt"):
                try:
                    resolve_device("cuda")
                    device = "cuda"
                except P3DMMError:
                    pass
        return cls(normals, uv, model, config, normal_space=normals.entry.normal_space or "camera",
                   detector=detector, device=device, engines=str(directory))  # fmt: skip

    @classmethod
    def default(cls, **kwargs: Any) -> Reconstructor:
        """The embedded default predictors shipped inside the package (``runtime/engines``).

        Two small fp16 ONNX predictors (normals; uv with a face mask) trained on
        ``p3dmm synth`` renders of the built-in synthetic head, so they pair with
        ``FlameModel.synthetic(seed=0)`` (the default model). They make a fresh install run
        the whole pipeline with no download; on real photographs they are rough (see
        ``runtime/engines/README.md``). ``kwargs`` go to :meth:`from_engines`.

        Raises:
            EngineError: the package was installed without its engine files.
        """
        here = default_engines_dir()
        if not (here / "manifest.json").is_file():
            raise EngineError(
                f"{here}: the embedded engines are missing from this installation (reinstall p3dmm); or use "
                "Reconstructor.from_engines(DIR) with an export-engines directory"
            )
        return cls.from_engines(here, **kwargs)

    def close(self) -> None:
        self.normals.close()
        self.uv.close()

    def __enter__(self) -> Reconstructor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ stages
    @property
    def detector(self) -> FaceDetector:
        with self._detector_lock:
            if self._detector is None:
                if self._detector_spec is None:
                    raise InputError("this Reconstructor has no face detector: pass box='full' or box=(x0, y0, x1, y1)")
                self._detector = get_detector(str(self._detector_spec))
            return self._detector

    def faces_in(self, image: np.ndarray, name: str = "image") -> list[FaceBox]:
        """Detections in ``image``, largest first.

        Raises:
            NoFaceError: none found.
        """
        detector = self.detector
        with self._detector_lock:  # detectors (dlib, OpenCV) are not documented as thread-safe
            boxes = sorted(detector.detect(image), key=lambda b: -b.area)
        if not boxes:
            raise NoFaceError(f"{name}: no face found (detector {self.detector.name}); for a face crop pass box='full' "
                              "(--box full on the command line), or box=(x0, y0, x1, y1)")  # fmt: skip
        return boxes

    def _boxes(self, image: np.ndarray, box: Any, all_faces: bool, name: str) -> list[tuple[float, float, float, float]]:
        H, W = image.shape[:2]
        if isinstance(box, str):
            if box != "full":
                raise InputError(f"box {box!r}: expected 'full', (x0, y0, x1, y1) or None (detect)")
            return [(0.0, 0.0, float(W), float(H))]
        if box is not None:
            b = tuple(float(v) for v in box)
            if len(b) != 4 or not (b[2] > b[0] and b[3] > b[1]) or b[2] <= 0 or b[3] <= 0 or b[0] >= W or b[1] >= H:
                raise InputError(f"{name}: box {box} must be (x0, y0, x1, y1) with x1 > x0, y1 > y0, overlapping the {W}x{H} image")
            return [b]  # type: ignore[list-item]
        found = self.faces_in(image, name)
        return [f.as_tuple() for f in (found if all_faces else found[:1])]

    def predict(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """``(B, 512, 512, 3) uint8`` crops -> ``normals (B, 512, 512, 3)``, ``uv (B, 512, 512, 2)``,
        ``mask (B, 512, 512) bool``: host arrays, or CuPy arrays when the backend's outputs are
        on the GPU and the fit runs there (no host copy before the fit)."""
        x = np.ascontiguousarray(crops.transpose(0, 3, 1, 2), dtype=np.float32) / np.float32(255.0)
        n_out = self._infer(self.normals, x)
        uv_out = self._infer(self.uv, x)
        # a GPU backend's outputs (CuPy) stay on the device when the fit runs there
        on_device = self.device == "cuda" and not isinstance(n_out["normals"], np.ndarray)
        if not on_device:
            n_out = {k: _host(v) for k, v in n_out.items()}
            uv_out = {k: _host(v) for k, v in uv_out.items()}
        xp = get_array_module(n_out["normals"])
        normals = xp.ascontiguousarray(n_out["normals"].transpose(0, 2, 3, 1))
        uv = xp.ascontiguousarray(uv_out["uv"].transpose(0, 2, 3, 1))
        mask_src = n_out.get("mask", uv_out.get("mask"))
        if mask_src is not None:
            mask = mask_src[:, 0] > 0.5
        else:
            mask = xp.asarray(np.stack([mask_from_uv(_host(u), self.model, self.config.uv_regions) for u in uv]))
        return {"normals": normals, "uv": uv, "mask": mask}

    @staticmethod
    def _infer(backend: Backend, x: np.ndarray) -> dict[str, Any]:
        """``backend.infer`` in chunks of the engine's largest batch (a plan's profile)."""
        step = backend.max_batch or len(x)
        if len(x) <= step:
            return backend.infer({"image": x})
        parts = [backend.infer({"image": x[i : i + step]}) for i in range(0, len(x), step)]
        xp = get_array_module(next(iter(parts[0].values())))
        return {k: xp.concatenate([p[k] for p in parts]) for k in parts[0]}

    # ------------------------------------------------------------------ calls
    def reconstruct(self, image: Any, box: Any = None, focal: float | None = None,
                    all_faces: bool = False) -> Reconstruction | list[Reconstruction]:  # fmt: skip
        """Reconstruct the largest face of ``image`` (a path or an array).

        Args:
            image: file path, or ``(H, W, 3)`` uint8 / float array.
            box: None (detect), ``"full"`` (the image is the crop) or ``(x0, y0, x1, y1)``.
            focal: a known focal length in pixels of the original image (held fixed).
            all_faces: every detected face (returns a list, largest first).

        Raises:
            InputError: unreadable image, bad box; NoFaceError when nothing is detected.
            FittingError: the maps cannot be fitted (e.g. no UV correspondences).
        """
        results = self._run([image], [box], focal, all_faces)
        return results[0] if not all_faces else results

    def reconstruct_batch(self, images: Sequence[Any], boxes: Sequence[Any] | None = None, focal: float | None = None,
                          errors: str = "raise") -> list[Any]:  # fmt: skip
        """One face per image; the predictors and the fits run on the batch (:func:`~p3dmm.fitting.fit_batch`).

        Args:
            errors: ``"raise"`` (the first bad image raises) or ``"return"`` (a bad
                image's slot holds its :class:`P3DMMError`; the rest go on).
        """
        if errors not in ("raise", "return"):
            raise InputError(f"errors={errors!r}: expected 'raise' or 'return'")
        return self._run(list(images), list(boxes) if boxes is not None else [None] * len(images), focal, False,
                         keep_errors=errors == "return")  # fmt: skip

    def _run(self, images: list[Any], boxes: list[Any], focal: float | None, all_faces: bool,
             keep_errors: bool = False) -> list[Any]:  # fmt: skip
        if len(boxes) != len(images):
            raise InputError(f"boxes: {len(boxes)} given for {len(images)} images")
        t_all = time.perf_counter()
        items: list[Any] = []  # (index, image, box, crop, crop image, timings) or (index, error)
        for i, (img, box) in enumerate(zip(images, boxes)):
            full = isinstance(box, str) and box == "full"
            name = str(img) if isinstance(img, (str, os.PathLike)) else f"images[{i}]"
            try:
                timings: dict[str, float] = {}
                t0 = time.perf_counter()
                rgb = decode_image(img, name)
                timings["decode"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                face_boxes = self._boxes(rgb, box, all_faces, name)
                timings["detect"] = time.perf_counter() - t0
                for fb in face_boxes:
                    t0 = time.perf_counter()
                    left, top, side = _full(rgb) if full else crop_box(fb, rgb.shape[1], rgb.shape[0])
                    crop = resize_crop(rgb, left, top, side, CROP_SIZE)
                    items.append((i, rgb, fb, (left, top, side), crop, dict(timings, crop=time.perf_counter() - t0)))
            except P3DMMError as e:
                if not keep_errors:
                    raise
                items.append((i, e))
        good = [it for it in items if len(it) > 2]
        maps: dict[str, np.ndarray] = {}
        t_pred = 0.0
        if good:
            t0 = time.perf_counter()
            maps = self.predict(np.stack([it[4] for it in good]))
            t_pred = (time.perf_counter() - t0) / len(good)
        results: list[Any] = [None] * (len(items) if all_faces else len(images))
        # the fits of faces that share a configuration run as one batch (fit_batch)
        jobs: dict[FitConfig, list[tuple[int, tuple[Any, ...], Observation]]] = {}
        k = 0
        for slot, it in enumerate(items):
            if len(it) == 2:
                results[slot if all_faces else it[0]] = it[1]
                continue
            m = {name: maps[name][k] for name in maps}
            k += 1
            try:
                config = self._config(focal, it[3][2])
            except P3DMMError as e:
                if not keep_errors:
                    raise
                results[slot if all_faces else it[0]] = e
                continue
            obs = Observation(normals=m["normals"], uv=m["uv"], mask=m["mask"], normal_space=self.normal_space)
            jobs.setdefault(config, []).append((slot, (*it, m), obs))
        for config, job in jobs.items():
            t0 = time.perf_counter()
            fits = fit_batch([o for _, _, o in job], self.model, config, device=self.device,
                             errors="return" if keep_errors else "raise")  # fmt: skip
            t_fit = (time.perf_counter() - t0) / len(job)
            for (slot, (i, rgb, fb, crop, crop_img, timings, m), _), result in zip(job, fits):
                r: Any = result
                if not isinstance(result, P3DMMError):
                    r = self._reconstruction(rgb, fb, crop, crop_img, m, result,
                                             dict(timings, predict=t_pred, fit=t_fit))  # fmt: skip
                results[slot if all_faces else i] = r
        for r in results:
            if isinstance(r, Reconstruction):
                r.timings["batch_total"] = time.perf_counter() - t_all
        return [r for r in results if r is not None] if all_faces else results

    def _config(self, focal: float | None, side: int) -> FitConfig:
        """The fit's configuration for a crop of ``side`` pixels (a known focal length scaled to the crop)."""
        if focal is None:
            return self.config
        if not (np.isfinite(focal) and focal > 0):
            raise InputError(f"focal {focal!r}: expected a positive focal length in pixels of the original image")
        return dataclasses.replace(self.config, focal=float(focal) * CROP_SIZE / side)

    def _reconstruction(self, rgb: np.ndarray, box: tuple[float, ...], crop: tuple[int, int, int], crop_img: np.ndarray,
                        maps: dict[str, Any], result: FitResult, timings: dict[str, float]) -> Reconstruction:  # fmt: skip
        left, top, side = crop
        maps = {k: _host(v) for k, v in maps.items()}  # after the fit: the result is on the host anyway
        timings["total"] = sum(v for k, v in timings.items() if k in ("decode", "detect", "crop", "predict", "fit"))
        return Reconstruction(
            vertices=result.vertices, neutral_vertices=result.neutral_vertices, faces=np.asarray(self.model.faces),
            params=result.params, camera=result.camera,
            camera_image=crop_camera_to_image(result.camera, left, top, side, rgb.shape[1], rgb.shape[0]),
            box=tuple(float(v) for v in box), crop=(left, top, side), maps=maps, fit=result, timings=timings,  # type: ignore[arg-type]
            image=rgb, crop_image=crop_img, model=self.model, normal_space=self.normal_space, engines=self.engines,
        )  # fmt: skip


def _full(rgb: np.ndarray) -> tuple[int, int, int]:
    """``box="full"``: the centred square of the image (the whole image when square)."""
    H, W = rgb.shape[:2]
    side = min(H, W)
    return (W - side) // 2, (H - side) // 2, side


def _host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):
        return np.asarray(a.get())
    raise EngineError(f"backend returned {type(a).__name__}, expected an array")
