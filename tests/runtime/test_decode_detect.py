"""Image decoding, face detection on real photographs that ship in packages, and the crop rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from p3dmm.fitting.base.errors import BackendUnavailableError, InputError
from p3dmm.runtime import decode
from p3dmm.runtime.decode import decode_image, load_image
from p3dmm.runtime.detect import CROP_SCALE, NoFaceError, crop_box, get_detector, resize_crop

skimage_data = pytest.importorskip("skimage.data")


def _astronaut() -> np.ndarray:
    return skimage_data.astronaut()


def _grace() -> np.ndarray:
    cbook = pytest.importorskip("matplotlib.cbook")
    return load_image(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


# ---------------------------------------------------------------------------- decoding
def test_exif_orientation_is_applied(tmp_path):
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "portrait.jpg"
    Image.fromarray(img).save(path, exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (60, 40, 3)  # displayed upright: rotated
    assert out[:30].mean() > 200 and out[30:].mean() < 50  # the white half is now on top


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA", "CMYK"])
def test_modes_decode_to_rgb(tmp_path, mode):
    rgb = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    if mode == "I;16":
        im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
        assert im.mode == "I;16"
        ext = "png"
    else:
        im = Image.fromarray(rgb).convert(mode)
        ext = "jpg" if mode == "CMYK" else "png"
    path = tmp_path / f"x.{ext}"
    im.save(path)
    out = load_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    if mode == "I;16":  # 16-bit is scaled, not clipped
        np.testing.assert_allclose(out[..., 0].astype(int), rgb[..., 0], atol=1)


def test_rgba_is_composited_over_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top opaque, bottom transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = load_image(path)
    assert (out[:2, :, 0] == 200).all() and (out[2:] == 0).all()


def test_bad_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name, what in (("empty.png", "empty"), ("text.jpg", "not an image"), ("cut.png", "truncated"),
                       ("missing.png", "not found")):  # fmt: skip
        with pytest.raises(InputError, match=what) as e:
            load_image(tmp_path / name)
        assert name in str(e.value)
    monkeypatch.setattr(decode, "MAX_PIXELS", 1000)
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(InputError, match="image too large"):
        load_image(tmp_path / "big.png")


def test_arrays_are_accepted_and_checked():
    assert decode_image(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
    assert decode_image(np.ones((5, 6, 3), np.float32)).max() == 255
    with pytest.raises(InputError, match=r"in \[0, 1\]"):
        decode_image(np.full((5, 6, 3), 2.0))
    with pytest.raises(InputError, match="expected"):
        decode_image(np.zeros((5, 6, 2), np.uint8))


# --------------------------------------------------------------------------- detection
def _iou(a, b):
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(x1 - x0, 0) * max(y1 - y0, 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.parametrize("name", ["dlib", "haar", "lbp"])
def test_detectors_find_the_real_faces(name):
    try:
        det = get_detector(name)
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    for img, ref in ((_astronaut(), (172, 66, 270, 168)), (_grace(), (158, 112, 377, 350))):
        boxes = det.detect(img)
        assert boxes and _iou(boxes[0].as_tuple(), ref) > 0.5, (name, boxes)


def test_default_detector_is_dlib_and_finds_a_rotated_face():
    pytest.importorskip("dlib")
    det = get_detector("auto")
    assert det.name == "dlib"
    rot = np.asarray(Image.fromarray(_grace()).rotate(20, resample=Image.Resampling.BICUBIC))
    assert det.detect(rot)
    assert det.detect(np.full((300, 300, 3), 128, np.uint8)) == []


def test_no_face_and_several_faces(tmp_path):
    pytest.importorskip("dlib")
    from p3dmm.runtime.reconstruct import Reconstructor

    rec = Reconstructor.__new__(Reconstructor)  # only the detection part
    Reconstructor.__init__(rec, None, None, None, detector="dlib")  # type: ignore[arg-type]
    with pytest.raises(NoFaceError, match="blank: no face found"):
        rec.faces_in(np.zeros((200, 200, 3), np.uint8), "blank")
    a, g = _astronaut(), _grace()
    both = np.zeros((600, 1024, 3), np.uint8)
    both[:512, :512] = a
    both[:600, 512:] = g[:, :512]
    faces = rec.faces_in(both)
    assert len(faces) == 2 and faces[0].x0 > 512  # the larger (Grace Hopper) first


def test_get_detector_errors():
    with pytest.raises(InputError, match="detector 'yolo'"):
        get_detector("yolo")


# ----------------------------------------------------------------------------- crop rule
def test_crop_rule_scales_centres_and_shifts_inside():
    # centred: 1.42 x the larger side around the centre
    left, top, side = crop_box((200, 200, 300, 280), 1000, 800)
    assert side == round(CROP_SCALE * 100) and (left, top) == (250 - 71, 240 - 71)
    # near the corner: shifted, not padded
    left, top, side = crop_box((0, 0, 100, 100), 1000, 800)
    assert (left, top, side) == (0, 0, 142)
    left, top, side = crop_box((950, 750, 1000, 800), 1000, 800)
    assert left + side == 1000 and top + side == 800
    # larger than the image: clamped to the shorter side
    assert crop_box((0, 0, 900, 700), 1000, 800)[2] == 800
    with pytest.raises(InputError, match="x1 > x0"):
        crop_box((10, 10, 10, 20), 100, 100)


def test_resize_crop_and_the_astronaut_crop():
    pytest.importorskip("dlib")
    img = _astronaut()
    box = get_detector("dlib").detect(img)[0]
    left, top, side = crop_box(box.as_tuple(), 512, 512)
    crop = resize_crop(img, left, top, side)
    assert crop.shape == (512, 512, 3)
    assert 120 <= side <= 130 and 0 <= left and left + side <= 512
    with pytest.raises(InputError, match="outside"):
        resize_crop(img, 500, 0, 100)
