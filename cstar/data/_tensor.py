"""In-memory datasets: every image as one uint8 tensor."""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .._core.errors import CstarError
from ._spec import DatasetSpec


@dataclass(frozen=True)
class TensorData:
    """A whole dataset in memory, on the CPU.

    Attributes:
        images: uint8 ``(N, C, H, W)``, pixel values 0..255.
        labels: int64 ``(N,)``, in ``[0, spec.num_classes)``.
        spec: the dataset's :class:`DatasetSpec`.

    Indexing gives ``(image uint8 (C, H, W), label int)``, so it is also a map-style
    dataset; for training use ``make_loader``, which batches on the device.
    """

    images: torch.Tensor
    labels: torch.Tensor
    spec: DatasetSpec

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise CstarError(f"TensorData images must be uint8 (N, C, H, W), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}: convert them first")
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise CstarError(f"TensorData labels must be int64 ({len(self.images)},), got "
                             f"{self.labels.dtype} {tuple(self.labels.shape)}: convert them first")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def take(self, n: int) -> "TensorData":
        """The first ``n`` samples (all of them if ``n >= len(self)``), e.g. "first 1000 test images"."""
        if n < 0:
            raise CstarError(f"take(n) needs n >= 0, got {n}")
        return TensorData(self.images[:n], self.labels[:n], self.spec)

    def split_off(self, n: int, device: str | torch.device = "cpu") -> tuple["TensorData", tuple[torch.Tensor, torch.Tensor]]:
        """(the first ``len - n`` samples, the last ``n`` as (x float32 in [0, 1], y) on ``device``): a held-out
        set for per-epoch checks, taken from the end so that ``take``/``--train-n`` prefixes stay stable."""
        keep = len(self) - n
        held = self.subset(torch.arange(keep, len(self)))
        return self.subset(torch.arange(keep)), (held.images.to(device).float() / 255, held.labels.to(device))

    def subset(self, indices: Sequence[int] | torch.Tensor) -> "TensorData":
        """The samples at ``indices``, in that order."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return TensorData(self.images[index], self.labels[index], self.spec)
