"""Epoch iterators of ``(x, y)`` batches: x float32 in [0, 1] ``(N, C, H, W)``, y int64 ``(N,)``."""

import math
from collections.abc import Iterator

import torch

from .._core.errors import CstarError
from ._augment import random_crop, random_flip
from ._folder import FolderData
from ._spec import Augment, check_augment
from ._tensor import TensorData

Batch = tuple[torch.Tensor, torch.Tensor]


def _epoch_order(n: int, shuffle: bool, generator: torch.Generator, rank: int,
                 world_size: int) -> torch.Tensor:
    """Indices one rank visits this epoch: its strided slice of the (shuffled) order.

    Each of ``world_size`` ranks gets ``n // world_size`` indices, disjoint from
    the others'; the last ``n % world_size`` of the order are left out.
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return order[rank:(n // world_size) * world_size:world_size]


class _EpochLoader:
    """Validation, sharding and epoch bookkeeping shared by the two loaders."""

    def __init__(self, data: TensorData | FolderData, batch_size: int, *, train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, drop_last: bool | None = None,
                 augment: Augment | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise CstarError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise CstarError(f"seed must be a non-negative integer, got {seed}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise CstarError(f"need world_size >= 1 and 0 <= rank < world_size, "
                             f"got rank={rank}, world_size={world_size}")
        self.augment = (data.spec.augment if train else "none") if augment is None else augment
        check_augment(self.augment)
        self.data, self.batch_size, self.train = data, batch_size, train
        self.device = torch.device(device)
        self.seed, self.epoch = seed, 0
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        if len(self) == 0:
            raise CstarError(f"the loader would yield no batch ({len(data) // world_size} samples per "
                             f"rank, batch_size {batch_size}, drop_last={self.drop_last}): "
                             f"lower batch_size or pass drop_last=False")

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose shuffle and augmentation the next iteration uses (seed + epoch)."""
        if epoch < 0:
            raise CstarError(f"epoch must be a non-negative integer, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        """Number of batches per epoch for this rank."""
        per_rank = len(self.data) // self.world_size
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def _generator_and_order(self) -> tuple[torch.Generator, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = _epoch_order(len(self.data), self.train, generator, self.rank, self.world_size)
        return generator, order[:len(self) * self.batch_size]


class BatchLoader(_EpochLoader):
    """Batches of a :class:`TensorData` cut, augmented and scaled on ``device``.

    The uint8 images are moved to ``device`` once. Each epoch the order is
    ``torch.randperm`` from ``torch.Generator().manual_seed(seed + epoch)`` when
    ``train`` (the stored order otherwise), sharded by ``rank``/``world_size``.
    Augmentation (``"crop"``: random crop with ``spec.crop_padding`` zero padding;
    ``"crop_flip"``: also a horizontal flip with p=0.5) draws from the same
    generator, so equal ``seed`` and epoch give identical batches.
    Call :meth:`set_epoch` before each epoch; iterating does not advance it.
    """

    def __init__(self, data: TensorData, batch_size: int, **kwargs):
        super().__init__(data, batch_size, **kwargs)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)

    def hold_out(self, n: int) -> tuple["BatchLoader", Batch]:
        """This loader without the data's last ``n`` images, and those images: (x in [0, 1], y) on ``device``.

        The images are held out before sharding, so every rank holds out the same ones.
        """
        if not 0 < n < len(self.data):
            raise CstarError(f"cannot hold out {n} of {len(self.data)} images: hold out between 1 and "
                             f"{len(self.data) - 1}")
        kept, held = self.data.split_off(n, self.device)
        rest = BatchLoader(kept, self.batch_size, train=self.train, device=self.device, seed=self.seed,
                           drop_last=self.drop_last, augment=self.augment, rank=self.rank, world_size=self.world_size)
        rest.epoch = self.epoch
        return rest, held

    def __iter__(self) -> Iterator[Batch]:
        generator, order = self._generator_and_order()
        order = order.to(self.device)
        for index in order.split(self.batch_size):
            x = self.images[index]
            if self.augment != "none":
                x = random_crop(x, self.data.spec.crop_padding, generator)
            if self.augment == "crop_flip":
                x = random_flip(x, generator)
            yield x.float().div_(255), self.labels[index]


class FolderLoader(_EpochLoader):
    """Batches of a :class:`FolderData`, decoded by ``num_workers`` DataLoader worker processes.

    Order and sharding are as in :class:`BatchLoader`; augmentation is the
    folder's random-resized crop (and flip for ``"crop_flip"``), seeded per image
    from ``(seed, epoch, index)``, so results do not depend on ``num_workers``.
    """

    def __init__(self, data: FolderData, batch_size: int, *, num_workers: int = 2, **kwargs):
        super().__init__(data, batch_size, **kwargs)
        self.num_workers = num_workers

    def __iter__(self) -> Iterator[Batch]:
        _, order = self._generator_and_order()
        loader = torch.utils.data.DataLoader(
            self.data.with_augment(self.augment, seed=(self.seed, self.epoch)),
            batch_size=self.batch_size, sampler=order.tolist(), num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield (x.to(self.device, non_blocking=True).float().div_(255),
                   y.to(self.device, non_blocking=True))


def make_loader(data: TensorData | FolderData, batch_size: int, *, train: bool,
                device: str | torch.device = "cpu", seed: int = 0, drop_last: bool | None = None,
                num_workers: int = 2, augment: Augment | None = None, rank: int = 0,
                world_size: int = 1) -> BatchLoader | FolderLoader:
    """An iterable of ``(x, y)`` batches over ``data``, with ``len()`` = batches per epoch.

    Args:
        data: from :func:`cstar.data.load`.
        batch_size: samples per batch (per rank).
        train: shuffle each epoch; also selects the default augmentation and ``drop_last``.
        device: where x (float32 in [0, 1], ``(N, C, H, W)``) and y (int64) are yielded.
        seed: non-negative; epoch ``e`` uses ``seed + e`` (see ``set_epoch``).
        drop_last: drop the last incomplete batch; default ``train``.
        num_workers: decoding processes, for :class:`FolderData` only.
        augment: ``"crop_flip"``, ``"crop"`` or ``"none"``; default ``data.spec.augment``
            when ``train``, else ``"none"``.
        rank, world_size: this process's shard: ``len(data) // world_size`` samples,
            disjoint across ranks.
    """
    common = dict(train=train, device=device, seed=seed, drop_last=drop_last, augment=augment,
                  rank=rank, world_size=world_size)
    if isinstance(data, TensorData):
        return BatchLoader(data, batch_size, **common)
    if isinstance(data, FolderData):
        return FolderLoader(data, batch_size, num_workers=num_workers, **common)
    raise CstarError(f"make_loader needs TensorData or FolderData (from cstar.data.load), "
                     f"got {type(data).__name__}")
