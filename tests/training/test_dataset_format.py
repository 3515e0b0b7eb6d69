"""The p3dmm-maps dataset format: 16-bit PNG codec, quantisation, writer/reader, errors."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from p3dmm.fitting import Camera, FlameParams, InputError, RenderedMaps
from p3dmm.training.dataset_format import (
    DatasetReader,
    add_to_manifest,
    create_dataset,
    decode_normals,
    decode_png16,
    decode_uv,
    encode_normals,
    encode_png16,
    encode_uv,
    read_manifest,
    read_png16,
    sample_complete,
    write_png16,
    write_sample,
)
from PIL import Image

REGIONS = ["coverage", "face", "lips", "nose"]


def random_unit(rng, shape):
    n = rng.normal(size=shape + (3,))
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def fake_maps(seed: int = 0, size: int = 40) -> tuple[RenderedMaps, FlameParams]:
    """RenderedMaps with random content: a disc of coverage, random normals and uv."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cov = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    normals = np.where(cov[..., None], random_unit(rng, (size, size)), 0).astype(np.float32)
    uv = np.where(cov[..., None], rng.uniform(0, 1, (size, size, 2)), 0).astype(np.float32)
    uv[cov.nonzero()[0][0], cov.nonzero()[1][0]] = (0.0, 1.0)  # the range ends survive
    face = cov & (yy < size * 0.6)
    lips = face & (yy > size * 0.5)
    params = FlameParams(
        shape=rng.normal(size=300).astype(np.float32),
        expr=rng.normal(size=100).astype(np.float32),
        pose=rng.normal(scale=0.1, size=(5, 3)).astype(np.float32),
        transl=np.zeros(3, np.float32),
    )
    maps = RenderedMaps(
        normals=normals,
        uv=uv,
        mask=face,
        coverage=cov,
        regions={"face": face, "lips": lips, "nose": np.zeros_like(cov), "neck": cov & ~face},
        depth=np.where(cov, 1.0, 0.0).astype(np.float32),
        face_id=np.where(cov, 1, -1).astype(np.int32),
        bary=np.zeros((size, size, 3), np.float32),
        rgb=rng.integers(0, 256, (size, size, 3)).astype(np.uint8),
        normal_space="camera",
        camera=Camera.frontal(width=size, height=size),
    )
    return maps, params


def make_dataset(root, n=2, size=40):
    create_dataset(
        root,
        model_name="test",
        n_vertices=5023,
        image_size=size,
        normal_space="camera",
        uv_layout="uv-test",
        regions=REGIONS,
        generator={"name": "test", "seed": 0},
    )
    out = []
    for i in range(n):
        maps, params = fake_maps(i, size)
        write_sample(root, f"s{i}", maps, region_names=REGIONS, params=params, extra={"seed": [0, i]})
        out.append((maps, params))
    return out


# ------------------------------------------------------------------------- PNG codec
@pytest.mark.parametrize("shape", [(7, 11), (13, 5, 3), (1, 1, 3)])
def test_png16_round_trip_and_other_readers(shape):
    a = np.random.default_rng(0).integers(0, 65536, shape).astype(np.uint16)
    data = encode_png16(a)
    np.testing.assert_array_equal(decode_png16(data), a)
    im = Image.open(io.BytesIO(data))
    if len(shape) == 2:
        np.testing.assert_array_equal(np.asarray(im), a)  # Pillow reads 16-bit gray exactly
    else:
        np.testing.assert_array_equal(np.asarray(im), (a >> 8).astype(np.uint8))  # Pillow: 8-bit view


def _png_with_filter(a: np.ndarray, ftype: int) -> bytes:
    """Encode 16-bit RGB with one filter type on every row (3 = Average, 4 = Paeth)."""
    H, W = a.shape[:2]
    raw = a.astype(">u2").view(np.uint8).reshape(H, W * 6).astype(np.int64)
    left = np.zeros_like(raw)
    left[:, 6:] = raw[:, :-6]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    ul = np.zeros_like(raw)
    ul[1:, 6:] = raw[:-1, :-6]
    if ftype == 3:
        pred = (left + up) >> 1
    else:
        p = left + up - ul
        pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - ul)
        pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, ul))
    rows = ((raw - pred) & 0xFF).astype(np.uint8)
    body = np.concatenate([np.full((H, 1), ftype, np.uint8), rows], 1).tobytes()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("ftype", [3, 4])
def test_png16_reader_handles_average_and_paeth_filters(ftype):
    a = np.random.default_rng(ftype).integers(0, 65536, (6, 9, 3)).astype(np.uint16)
    np.testing.assert_array_equal(decode_png16(_png_with_filter(a, ftype)), a)


def test_png16_errors_name_the_file(tmp_path):
    a = np.arange(60, dtype=np.uint16).reshape(4, 5, 3)
    path = tmp_path / "x.png"
    write_png16(path, a)
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside IDAT
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"x\.png: (corrupted|not a valid PNG)"):
        read_png16(path)
    path.write_bytes(encode_png16(a)[:-20])
    with pytest.raises(InputError, match=r"x\.png: corrupted or truncated"):
        read_png16(path)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(path)
    with pytest.raises(InputError, match=r"x\.png: PNG with bit depth 8.*expected a 16-bit"):
        read_png16(path)
    path.write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a valid PNG"):
        read_png16(path)
    with pytest.raises(InputError, match=r"missing\.png: missing"):
        read_png16(tmp_path / "missing.png")
    with pytest.raises(InputError, match="expected uint16"):
        encode_png16(np.zeros((2, 2), np.float32))


# ---------------------------------------------------------------------- quantisation
def test_normal_quantisation_error_after_renormalisation():
    rng = np.random.default_rng(0)
    n = random_unit(rng, (256, 256))
    n[0, :6] = [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]]
    back = decode_normals(decode_png16(encode_png16(encode_normals(n))))
    assert back.dtype == np.float32
    assert np.abs(back - n).max() < 2e-5
    np.testing.assert_allclose(np.linalg.norm(back, axis=-1), 1.0, atol=1e-6)
    # background (zero) normals stay zero
    z = decode_normals(encode_normals(np.zeros((2, 2, 3))))
    assert np.all(z == 0)


def test_uv_quantisation_error():
    uv = np.random.default_rng(1).uniform(0, 1, (128, 128, 2))
    uv[0, 0] = (0.0, 1.0)
    codes = decode_png16(encode_png16(encode_uv(uv)))
    assert np.all(codes[..., 2] == 0)
    back = decode_uv(codes)
    assert np.abs(back - uv).max() < 1e-5
    assert back[0, 0, 0] == 0.0 and back[0, 0, 1] == 1.0


# ---------------------------------------------------------------- writer and reader
def test_round_trip(tmp_path):
    written = make_dataset(tmp_path / "ds", n=2)
    reader = DatasetReader(tmp_path / "ds")
    assert len(reader) == 2 and reader.ids == ["s0", "s1"]
    m = read_manifest(tmp_path / "ds")
    assert m["count"] == 2 and m["regions"] == REGIONS and m["image_size"] == 40
    for i, (maps, params) in enumerate(written):
        s = reader[i]
        assert s["id"] == f"s{i}" and reader[f"s{i}"]["id"] == f"s{i}"
        np.testing.assert_array_equal(s["rgb"], maps.rgb)
        np.testing.assert_array_equal(s["coverage"], maps.coverage)
        np.testing.assert_array_equal(s["mask"], maps.mask)
        assert set(s["regions"]) == {"face", "lips", "nose"}  # "neck" is not in the region list
        for name in ("face", "lips", "nose"):
            np.testing.assert_array_equal(s["regions"][name], maps.regions[name])
        assert s["normals"].dtype == np.float32 and s["uv"].dtype == np.float32
        assert np.abs(s["normals"] - maps.normals).max() < 2e-5
        assert np.abs(s["uv"] - maps.uv).max() < 1e-5
        np.testing.assert_array_equal(s["params"].to_vector(), params.to_vector())
        assert s["camera"].to_dict() == maps.camera.to_dict()
        assert s["normal_space"] == "camera" and s["meta"]["seed"] == [0, i]
    with pytest.raises(IndexError):
        reader[2]


def test_jpg_rgb_and_rewrite(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    maps, _ = fake_maps(5)
    write_sample(root, "s0", maps, region_names=REGIONS, params=None, rgb_format="jpg")
    files = sorted(p.name for p in (root / "s0").iterdir())
    assert "rgb.jpg" in files and "rgb.png" not in files
    s = DatasetReader(root)["s0"]
    assert s["params"] is None and s["rgb"].shape == (40, 40, 3)
    assert np.abs(s["normals"] - maps.normals).max() < 2e-5


def test_incomplete_samples_and_manifest_checks(tmp_path):
    root = tmp_path / "ds"
    make_dataset(root, n=2)
    assert sample_complete(root, "s0")
    (root / "s0" / "uv.png").unlink()
    assert not sample_complete(root, "s0")
    (root / "s1" / "sample.json").unlink()
    assert not sample_complete(root, "s1")
    assert not sample_complete(root, "nope")
    with pytest.raises(InputError, match="differs in .'image_size'"):
        create_dataset(
            root,
            model_name="test",
            n_vertices=5023,
            image_size=64,
            normal_space="camera",
            uv_layout="uv-test",
            regions=REGIONS,
            generator={"name": "test", "seed": 0},
        )
    with pytest.raises(InputError, match="sample id"):
        add_to_manifest(root, ["../evil"])
    assert not list(root.rglob("*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "normals.png").unlink(), r"normals\.png: missing"),
        (lambda d: (d / "uv.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10), r"uv\.png: (truncated|corrupted|not a valid PNG)"),
        (lambda d: _flip_byte(d / "regions.png"), r"regions\.png: corrupted"),
        (
            lambda d: Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "mask.png"),
            r"mask\.png: size 8x8, expected 40x40",
        ),
        (lambda d: Image.fromarray(np.zeros((40, 40), np.uint8)).save(d / "rgb.png"), r"rgb\.png: image mode L"),
        (lambda d: (d / "rgb.png").write_bytes(b"garbage"), r"rgb\.png: cannot be decoded"),
        (lambda d: write_png16(d / "normals.png", np.zeros((40, 40), np.uint16)), r"normals\.png: 16-bit image"),
        (lambda d: (d / "sample.json").write_text("{"), r"sample\.json: not valid JSON"),
        (lambda d: (d / "sample.json").write_text("{}"), r"sample\.json: bad or missing field"),
    ],
)
def test_reader_errors_name_the_file(tmp_path, damage, match):
    root = tmp_path / "ds"
    make_dataset(root, n=1)
    damage(root / "s0")
    reader = DatasetReader(root)
    with pytest.raises(InputError, match=match):
        reader[0]


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[45] ^= 0x5A
    path.write_bytes(bytes(data))


def test_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        DatasetReader(tmp_path / "none")
    with pytest.raises(InputError, match=r"manifest\.json: missing"):
        DatasetReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputError, match="format is 'other'"):
        DatasetReader(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "p3dmm-maps", "format_version": 99}))
    with pytest.raises(InputError, match="format_version 99"):
        DatasetReader(tmp_path)
