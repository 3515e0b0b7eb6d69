"""Training: dataset items, schedule, resume, non-finite steps, DDP (gloo), CLI, and that it learns."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from p3dmm.fitting import FlameModel
from p3dmm.fitting.base.errors import InputError
from p3dmm.training import train as train_module
from p3dmm.training.augment import AugmentConfig, UVMirror
from p3dmm.training.checkpoint import load_checkpoint, load_predictor, weights_digest
from p3dmm.training.data import MapsDataset, ResumableDistributedSampler, resize_sample
from p3dmm.training.networks import PredictorConfig
from p3dmm.training.synth import synthesize
from p3dmm.training.train import TrainConfig, evaluate, lr_factor, train

SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models run fastest on one thread (and do not fight other test workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("maps")
    head = FlameModel.synthetic(seed=0)
    synthesize(root / "train", n=16, seed=0, size=SIZE, workers=1, model=head)
    synthesize(root / "val", n=8, seed=1, size=SIZE, workers=1, model=head)
    return {"train": root / "train", "val": root / "val"}


def _config(data: dict[str, Path], out: Path, task: str = "normals", **kw) -> TrainConfig:
    base = dict(
        data=str(data["train"]),
        out=str(out),
        task=task,
        val=None,
        predictor=PredictorConfig.tiny(task, img_size=SIZE, backbone_img_size=56),
        augment=None,
        steps=8,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        log_every=1,
        val_every=0,
        ckpt_every=0,
        num_workers=0,
        tensorboard=False,
        amp=None,
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------ data
def test_dataset_items_are_deterministic_per_epoch_and_index(data: dict[str, Path]) -> None:
    mirror = UVMirror.from_model(FlameModel.synthetic(seed=0), resolution=256)
    ds = MapsDataset(data["train"], augment=AugmentConfig(), uv_mirror=mirror, seed=3)
    item = ds[1]
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
    assert item["normals"].shape == (3, SIZE, SIZE) and item["uv"].shape == (2, SIZE, SIZE)
    for key in ("mask", "coverage", "occluder"):
        assert item[key].shape == (1, SIZE, SIZE)
        assert set(torch.unique(item[key]).tolist()) <= {0.0, 1.0}
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert int(item["index"]) == 1
    again = ds[1]
    for key in item:
        assert torch.equal(item[key], again[key]), key
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], item["image"])
    # validation data: no augmentation, the stored maps
    plain = MapsDataset(data["train"], targets=("normals",))
    raw = plain.reader[1]
    assert_allclose(plain[1]["normals"].permute(1, 2, 0).numpy(), raw["normals"])
    assert "uv" not in plain[1]
    with pytest.raises(InputError, match="UVMirror"):
        MapsDataset(data["train"], augment=AugmentConfig(), targets=("uv",))


def test_resize_sample_keeps_maps_exact() -> None:
    rng = np.random.default_rng(0)
    n = rng.normal(size=(8, 8, 3)).astype(np.float32)
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    sample = {"image": rng.uniform(0, 1, (8, 8, 3)).astype(np.float32), "normals": n, "mask": n[..., 0] > 0}
    up = resize_sample(sample, 16)
    assert up["image"].shape == (16, 16, 3)
    np.testing.assert_array_equal(up["normals"][::2, ::2], n)  # nearest: every map value is a stored one
    np.testing.assert_array_equal(up["mask"][1::2, 1::2], sample["mask"])


def test_resumable_sampler_partitions_and_skips() -> None:
    ds = list(range(10))
    s0 = ResumableDistributedSampler(ds, batch_size=2, num_replicas=2, rank=0, seed=5)
    s1 = ResumableDistributedSampler(ds, batch_size=2, num_replicas=2, rank=1, seed=5)
    s0.set_epoch(3)
    s1.set_epoch(3)
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    s0.set_epoch(3, start_batch=1)
    assert list(s0) == a[2:] and len(s0) == 3


# -------------------------------------------------------------------------- schedule
def test_lr_follows_warmup_and_cosine_with_backbone_at_a_tenth(data: dict[str, Path], tmp_path: Path) -> None:
    assert lr_factor(0, 4, 20) == 0.25 and lr_factor(3, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5) and lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert lr_factor(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    cfg = _config(data, tmp_path, steps=10, warmup_steps=3, lr=2e-4)
    train(cfg)
    lines = [m for m in _metrics(tmp_path) if m["split"] == "train"]
    assert [m["step"] for m in lines] == list(range(1, 11))
    for m in lines:
        want = 2e-4 * lr_factor(m["step"] - 1, 3, 10)
        assert m["lr_head"] == pytest.approx(want, rel=1e-12)
        assert m["lr_backbone"] == pytest.approx(want / 10, rel=1e-12)


# ---------------------------------------------------------------------------- resume
def test_resume_reproduces_an_uninterrupted_run(data: dict[str, Path], tmp_path: Path) -> None:
    # uv with augmentation (flips through the UV mirror, occluders, ...); 4 batches per
    # epoch, so the interruption at step 6 is mid-epoch
    kw = dict(task="uv", steps=12, augment=AugmentConfig(), ckpt_every=4)
    full = train(_config(data, tmp_path / "full", **kw))
    first = train(_config(data, tmp_path / "staged", **kw), stop_at_step=6)
    assert first.step == 6
    ckpt = load_checkpoint(tmp_path / "staged" / "last.pt")
    assert ckpt["step"] == 6 and set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    second = train(_config(data, tmp_path / "staged", resume="auto", **kw))
    assert second.step == 12 and full.step == 12
    _assert_same_weights(full.model, second.model)
    _assert_same_weights(full.model, load_predictor(tmp_path / "staged" / "last.pt"))
    # the log of the resumed run continues the first one, without duplicated steps
    steps = [m["step"] for m in _metrics(tmp_path / "staged") if m["split"] == "train"]
    assert steps == list(range(1, 13))
    with pytest.raises(InputError, match="architecture"):
        other = PredictorConfig.tiny("uv", img_size=SIZE, backbone_img_size=56, head_dim=16)
        train(_config(data, tmp_path / "staged", resume="auto", **dict(kw, predictor=other)))


# ------------------------------------------------------------------------ non-finite
def test_non_finite_step_is_skipped(data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = train(_config(data, tmp_path / "ref", steps=3), stop_at_step=2)
    real_loss = train_module.task_loss
    calls = {"n": 0}

    def nan_on_third_call(outputs, batch, config):
        loss, parts = real_loss(outputs, batch, config)
        calls["n"] += 1
        return (loss * float("nan"), parts) if calls["n"] == 3 else (loss, parts)

    monkeypatch.setattr(train_module, "task_loss", nan_on_third_call)
    result = train(_config(data, tmp_path / "nan", steps=3))
    assert result.step == 3 and result.skipped_steps == 1
    # the skipped step changed nothing: weights equal those after the two good steps
    _assert_same_weights(reference.model, result.model)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    last = _metrics(tmp_path / "nan")[-1]
    assert last["skipped_steps"] == 1
    assert load_checkpoint(tmp_path / "nan" / "last.pt")["skipped_steps"] == 1


# ------------------------------------------------------------------------------- DDP
def test_ddp_two_processes_gloo(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "p3dmm.training",
        "--data", str(data["train"]), "--val", str(data["val"]), "--task", "normals", "--out", str(out),
        "--steps", "3", "--batch-size", "2", "--backbone", "tiny", "--img-size", str(SIZE), "--workers", "0",
        "--val-every", "0", "--log-every", "1", "--device", "cpu", "--no-tensorboard", "--lr", "1e-3",
        "--warmup", "1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["last.pt", "metrics.jsonl"]  # rank 0 only
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 3
    final = [m for m in _metrics(out) if m["split"] == "final"]
    assert len(final) == 1
    digests = final[0]["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == weights_digest(load_predictor(out / "last.pt"))
    vals = [m for m in _metrics(out) if m["split"] == "val"]
    assert [m["step"] for m in vals] == [0, 3] and vals[0]["pixels"] > 0


# ------------------------------------------------------------------------------- CLI
def test_cli_is_torch_free_and_maps_onto_the_config(data: dict[str, Path], tmp_path: Path) -> None:
    code = (
        "import argparse, sys\n"
        "from p3dmm.training.train_cli import add_parsers\n"
        "p = argparse.ArgumentParser(); add_parsers(p.add_subparsers())\n"
        "p.parse_args(['train', '--data', 'd', '--task', 'uv', '--out', 'o'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    from p3dmm.training.train_cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "--data", "d", "--val", "v", "--task", "uv", "--out", "o", "--steps", "7", "--batch-size", "3",
        "--backbone", "tiny", "--img-size", "64", "--amp", "none", "--resume", "--no-augment", "--lr", "3e-4",
    ])
    cfg = config_from_args(args)
    assert (cfg.task, cfg.steps, cfg.batch_size, cfg.amp, cfg.resume, cfg.augment, cfg.lr) == (
        "uv", 7, 3, None, "auto", None, 3e-4
    )
    assert cfg.predictor == PredictorConfig.tiny("uv", img_size=64, backbone_img_size=56)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InputError, match="task"):
        dataclasses.replace(cfg, task="normals")


# ---------------------------------------------------------------------------- learns
@pytest.fixture(scope="module")
def learn_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learn")
    head = FlameModel.synthetic(seed=0)
    synthesize(root / "train", n=96, seed=0, size=SIZE, workers=1, model=head)
    synthesize(root / "val", n=8, seed=1, size=SIZE, workers=1, model=head)
    return {"train": root / "train", "val": root / "val"}


def _constant_direction_error(data: dict[str, Path]) -> float:
    """Mean validation angle (deg) of the best single normal: the training set's mean direction."""
    from p3dmm.training.dataset_format import DatasetReader

    train_set, val_set = DatasetReader(data["train"]), DatasetReader(data["val"])
    mean = sum(s["normals"][s["coverage"]].sum(0) for s in (train_set[i] for i in range(len(train_set))))
    mean = mean / np.linalg.norm(mean)
    angles = [
        np.degrees(np.arccos(np.clip(s["normals"][s["coverage"]] @ mean, -1, 1)))
        for s in (val_set[i] for i in range(len(val_set)))
    ]
    return float(np.concatenate(angles).mean())


def test_tiny_predictor_learns_normals(learn_data: dict[str, Path], tmp_path: Path) -> None:
    """Validation error falls well below its start and below the best constant prediction,
    i.e. the network learns per-pixel normals, not just the mean direction."""
    cfg = _config(
        learn_data, tmp_path, steps=600, batch_size=8, lr=1e-3, warmup_steps=20,
        val=str(learn_data["val"]), val_every=200, log_every=100,
    )
    result = train(cfg)
    curve = [(h["step"], h["normal_angle_mean_deg"], h["normal_angle_median_deg"]) for h in result.val_history]
    print("learning curve (step, mean deg, median deg):", curve)
    assert [c[0] for c in curve] == [0, 200, 400, 600]
    start, end = curve[0][1], curve[-1][1]
    assert end < 0.5 * start, curve
    assert curve[-1][2] < 0.5 * curve[0][2]
    constant = _constant_direction_error(learn_data)
    assert end < 0.85 * constant, (end, constant)
    # the checkpoint reproduces the final validation
    model = load_predictor(tmp_path / "last.pt")
    again = evaluate(model, MapsDataset(learn_data["val"], targets=("normals",)), cfg, torch.device("cpu"))
    assert math.isclose(again["normal_angle_mean_deg"], end, rel_tol=1e-5)