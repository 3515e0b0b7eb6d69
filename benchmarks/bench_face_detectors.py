"""Offline face detectors compared on the photographs that ship in packages, variants of
them, LFW faces and non-faces, and synthetic profile views (the runtime's default is chosen
from this table).

Images: ``skimage.data.astronaut()``, matplotlib's ``grace_hopper.jpg`` and
``skimage.data.camera()`` (a small face), each also rotated by 20 and 35 degrees, shrunk
to 160 px, darkened to 30 % and mirrored; ``skimage.data.lfw_subset()``: 100 LFW faces and
100 non-faces (25 px, upscaled to 100 px); renders of the synthetic FLAME-format head at
yaw 0, 30, 60 and 75 degrees (photo-like; the stylised head is not a real face, so this
row measures pose robustness only loosely). A face counts as found when a box overlaps
the reference box with IoU >= 0.3; every other box is a false positive.

    python benchmarks/bench_face_detectors.py [--detectors dlib,haar,lbp] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np

# reference face boxes (x0, y0, x1, y1), read off the images
ASTRONAUT_BOX = (172.0, 66.0, 270.0, 168.0)
GRACE_BOX = (158.0, 112.0, 377.0, 350.0)
CAMERA_BOX = (200.0, 123.0, 276.0, 199.0)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(x1 - x0, 0) * max(y1 - y0, 0)
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def variants(name: str, image: np.ndarray, box: tuple[float, ...]) -> list[tuple[str, np.ndarray, tuple[float, ...] | None]]:
    """The photo and its rotated, small, dark and mirrored versions, with their reference boxes."""
    from PIL import Image

    H, W = image.shape[:2]
    out: list[tuple[str, np.ndarray, tuple[float, ...] | None]] = [(name, image, box)]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    for deg in (20, 35):
        rot = np.asarray(Image.fromarray(image).rotate(deg, resample=Image.Resampling.BICUBIC, center=(cx, cy)))
        s = (box[2] - box[0]) / 2
        out.append((f"{name} rotated {deg}", rot, (cx - s, cy - s, cx + s, cy + s)))
    k = 160 / max(H, W)
    small = np.asarray(Image.fromarray(image).resize((round(W * k), round(H * k)), Image.Resampling.LANCZOS))
    out.append((f"{name} {small.shape[1]}x{small.shape[0]}", small, tuple(v * k for v in box)))
    out.append((f"{name} dark", (image.astype(np.float32) * 0.3).astype(np.uint8), box))
    out.append((f"{name} mirrored", np.ascontiguousarray(image[:, ::-1]), (W - box[2], box[1], W - box[0], box[3])))
    return out


def synthetic_views() -> list[tuple[str, np.ndarray, tuple[float, ...] | None]]:
    from p3dmm.fitting import Camera, FlameModel, render_maps

    model = FlameModel.synthetic(seed=0)
    cam = Camera.frontal(distance=1.0, focal=1200.0, width=512, height=512)
    out = []
    for yaw in (0, 30, 60, 75):
        p = model.zero_params()
        p.pose[0] = np.radians([0.0, yaw, 0.0]).astype(np.float32)
        maps = render_maps(model, p, cam, rgb=True, rng=np.random.default_rng(yaw))
        ys, xs = np.nonzero(maps.mask)
        out.append((f"synthetic head yaw {yaw}", maps.rgb, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detectors", default="dlib,haar,lbp")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from matplotlib import cbook
    from PIL import Image
    from skimage import data

    from p3dmm.runtime.decode import load_image
    from p3dmm.runtime.detect import get_detector

    photos: list[tuple[str, np.ndarray, tuple[float, ...] | None]] = []
    photos += variants("astronaut", data.astronaut(), ASTRONAUT_BOX)
    photos += variants("grace_hopper", load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), GRACE_BOX)
    photos += variants("camera", np.repeat(data.camera()[..., None], 3, -1), CAMERA_BOX)
    views = synthetic_views()
    lfw = data.lfw_subset()
    lfw_img = [np.repeat(np.asarray(Image.fromarray((f * 255).astype(np.uint8)).resize((100, 100), Image.Resampling.BICUBIC))[..., None], 3, -1) for f in lfw]

    rows: list[dict[str, Any]] = []
    for name in args.detectors.split(","):
        det = get_detector(name)
        found, fp, times, per_image = 0, 0, [], {}
        for label, img, box in photos + views:
            t0 = time.perf_counter()
            boxes = det.detect(img)
            times.append(time.perf_counter() - t0)
            hit = [b for b in boxes if box is not None and iou(b.as_tuple(), box) >= 0.3]
            per_image[label] = "yes" if hit else "no"
            found += bool(hit) and not label.startswith("synthetic")
            fp += len(boxes) - min(len(hit), 1)
        lfw_found = sum(1 for im in lfw_img[:100] if det.detect(im))
        lfw_fp = sum(1 for im in lfw_img[100:] if det.detect(im))
        rows.append({"detector": name, "photos_found": found, "photos": sum(1 for p in photos), "false_positives": fp,
                     "lfw_faces": lfw_found, "lfw_nonfaces_flagged": lfw_fp, "ms": 1000 * float(np.median(times)),
                     "per_image": per_image})  # fmt: skip
        print(f"[{name}] done", file=sys.stderr, flush=True)

    labels = [p[0] for p in photos + views]
    print("| image | " + " | ".join(r["detector"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        print(f"| {label} | " + " | ".join(r["per_image"][label] for r in rows) + " |")
    print(f"| **real photos found** (of {rows[0]['photos']}) | " + " | ".join(str(r["photos_found"]) for r in rows) + " |")
    print("| false positives (photos + renders) | " + " | ".join(str(r["false_positives"]) for r in rows) + " |")
    print("| LFW faces found (of 100) | " + " | ".join(str(r["lfw_faces"]) for r in rows) + " |")
    print("| LFW non-faces flagged (of 100) | " + " | ".join(str(r["lfw_nonfaces_flagged"]) for r in rows) + " |")
    print("| median ms per image | " + " | ".join(f"{r['ms']:.0f}" for r in rows) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
