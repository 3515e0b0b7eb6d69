"""PyTorch datasets and samplers over p3dmm-maps training data.

:class:`MapsDataset` reads samples with :class:`p3dmm.training.dataset_format.DatasetReader`,
augments them (:mod:`p3dmm.training.augment`) with a generator seeded by
``(seed, epoch, index)`` and returns float tensors. Call :meth:`MapsDataset.set_epoch`
before iterating a new epoch. With ``DataLoader(num_workers > 0)`` leave
``persistent_workers`` off: workers then copy the dataset, and its epoch, when each
epoch's iterator starts. The augmentation of a sample does not depend on the worker
that loads it, the number of workers or the number of processes.

:class:`ResumableDistributedSampler` is a ``DistributedSampler`` that can start an
epoch part-way, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from p3dmm.fitting.base.errors import InputError
from torch.utils.data import Dataset, DistributedSampler

from .augment import AugmentConfig, UVMirror, augment_sample
from .dataset_format import DatasetReader

__all__ = ["MapsDataset", "ResumableDistributedSampler", "resize_sample"]

#: Keys of a :class:`MapsDataset` item.
ITEM_KEYS = ("image", "normals", "uv", "mask", "coverage", "occluder", "index")


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each output pixel for a nearest-neighbour resize (centres aligned)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_sample(sample: dict[str, Any], size: int) -> dict[str, Any]:
    """Resize an augmented sample to ``size x size``.

    The image is resampled with torch's antialiased bilinear filter. Target maps and
    masks use the nearest pixel, which keeps normals unit length and never blends UVs
    across seams or the head's outline.

    Args:
        sample: Dict with ``image (H, W, 3) float32`` and ``(H, W, ...)`` maps.
        size: Output side.

    Returns:
        The same keys, resized (a new dict).
    """
    out = dict(sample)
    H, W = sample["image"].shape[:2]
    if (H, W) == (size, size):
        return out
    img = torch.from_numpy(np.ascontiguousarray(sample["image"], dtype=np.float32)).permute(2, 0, 1)[None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out["image"] = img[0].permute(1, 2, 0).clamp(0.0, 1.0).numpy()
    rows, cols = _nearest_index(size, H), _nearest_index(size, W)
    for key in ("normals", "uv", "mask", "coverage", "occluder"):
        if sample.get(key) is not None:
            out[key] = np.asarray(sample[key])[rows][:, cols]
    return out


class MapsDataset(Dataset):
    """Training items from a p3dmm-maps dataset directory.

    An item is a dict of tensors:

    * ``image``: ``(3, S, S) float32`` RGB in [0, 1];
    * ``normals``: ``(3, S, S) float32`` unit on ``coverage``, 0 elsewhere (space: the
      manifest's ``normal_space``, see :attr:`normal_space`);
    * ``uv``: ``(2, S, S) float32`` in [0, 1] on ``coverage``, 0 elsewhere;
    * ``mask``: ``(1, S, S) float32`` face region (0/1);
    * ``coverage``: ``(1, S, S) float32`` head pixels (0/1);
    * ``occluder``: ``(1, S, S) float32`` pixels painted over by an occluder (0/1);
    * ``index``: ``() int64`` the sample index.

    The default collate stacks them into batches.

    Args:
        root: Dataset directory.
        img_size: Output side S; None keeps the stored size.
        augment: Augmentation configuration; None for none (validation).
        uv_mirror: Mirror map of the dataset's UV layout; required when ``augment`` can
            flip and ``"uv"`` is in ``targets``. Its layout id must match the manifest's.
        seed: Base seed of the augmentation generators.
        targets: Which of ``"normals"``, ``"uv"`` to return (the others are skipped).
        backgrounds: Optional background photos ``(h, w, 3) uint8`` for background swaps.

    Raises:
        InputError: No valid dataset at ``root``, a flip of uv without ``uv_mirror``, or a
            ``uv_mirror`` of another layout.
    """

    def __init__(
        self,
        root: str | PathLike[str],
        img_size: int | None = None,
        augment: AugmentConfig | None = None,
        uv_mirror: UVMirror | None = None,
        seed: int = 0,
        targets: Sequence[str] = ("normals", "uv"),
        backgrounds: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.reader = DatasetReader(root)
        self.img_size = None if img_size is None else int(img_size)
        self.augment = augment
        self.uv_mirror = uv_mirror
        self.seed = int(seed)
        self.targets = tuple(targets)
        self.backgrounds = list(backgrounds) if backgrounds else None
        self.epoch = 0
        bad = [t for t in self.targets if t not in ("normals", "uv")]
        if bad:
            raise InputError(f"MapsDataset: targets {bad} unknown, expected 'normals' and/or 'uv'")
        if len(self.reader) == 0:
            raise InputError(f"{self.reader.root}: the dataset has no complete samples")
        if augment is not None and augment.flip_prob > 0 and "uv" in self.targets:
            if uv_mirror is None:
                raise InputError(
                    f"MapsDataset({self.reader.root}): horizontal flips of uv targets need the layout's "
                    "UVMirror (UVMirror.from_model(model)); or set flip_prob=0"
                )
            want = self.reader.manifest.get("uv_layout")
            if want is not None and uv_mirror.layout_id != want:
                raise InputError(
                    f"{self.reader.root}: UV layout {want!r}, but the UVMirror is for {uv_mirror.layout_id!r}; "
                    "build it from the FLAME model and UV file the data was rendered with"
                )

    @property
    def normal_space(self) -> str:
        """``'camera'`` or ``'head'`` (from the manifest)."""
        return str(self.reader.manifest["normal_space"])

    def __len__(self) -> int:
        return len(self.reader)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations :meth:`__getitem__` draws."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> np.random.Generator:
        """The augmentation generator of ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index)])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        raw = self.reader[int(index)]
        sample: dict[str, Any] = {
            "image": raw["rgb"].astype(np.float32) / 255.0,
            "mask": raw["mask"],
            "coverage": raw["coverage"],
            "occluder": np.zeros(raw["coverage"].shape, dtype=bool),
        }
        for key in self.targets:
            sample[key] = raw[key]
        if self.augment is not None:
            sample = augment_sample(
                sample, self.generator(index), self.augment, uv_mirror=self.uv_mirror, backgrounds=self.backgrounds
            )
        if self.img_size is not None:
            sample = resize_sample(sample, self.img_size)

        def chw(a: np.ndarray) -> torch.Tensor:
            a = np.asarray(a, dtype=np.float32)
            if a.ndim == 2:
                a = a[..., None]
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

        item = {key: chw(sample[key]) for key in ("image", "mask", "coverage", "occluder")}
        for key in self.targets:
            item[key] = chw(sample[key])
        item["index"] = torch.tensor(int(index), dtype=torch.int64)
        return item


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start after ``start_batch`` batches.

    Each process gets every ``num_replicas``-th index of the epoch's seeded permutation
    (``torch.Generator().manual_seed(seed + epoch)``), as in ``DistributedSampler``.
    :meth:`set_epoch` takes the number of batches of this epoch already consumed, so a
    run resumed mid-epoch continues with the same indices.

    Args:
        dataset: The dataset (only its length is used).
        batch_size: Per-process batch size (the unit of ``start_batch``).
        num_replicas: Number of processes (default: the process group's size, or 1).
        rank: This process's rank (default: the process group's rank, or 0).
        shuffle: Shuffle each epoch.
        seed: Base seed of the permutation.
        drop_last: Drop the tail that does not divide evenly among processes.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        import torch.distributed as dist

        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.batch_size = int(batch_size)
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:  # type: ignore[override]
        """Select the epoch and skip its first ``start_batch`` batches."""
        super().set_epoch(epoch)
        self.start_batch = int(start_batch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start_batch * self.batch_size)
