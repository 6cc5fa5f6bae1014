"""Static description of each supported dataset: shape, classes, statistics, threat model."""

from dataclasses import dataclass
from typing import Literal

from .._core.errors import CstarError

Augment = Literal["crop_flip", "crop", "none"]
AUGMENTS = ("crop_flip", "crop", "none")


def check_augment(augment: str) -> None:
    """Raise ``CstarError`` unless ``augment`` is one of ``AUGMENTS``."""
    if augment not in AUGMENTS:
        raise CstarError(f"unknown augment {augment!r}: use one of {', '.join(AUGMENTS)}")


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a training run need to know about a dataset.

    Attributes:
        name: registry key, e.g. ``"cifar10"``.
        num_classes: number of labels; ``None`` in the ``imagefolder`` template
            (found from the folder at load time, see ``FolderData.spec``).
        image_shape: ``(C, H, W)`` of the images the loaders yield.
        mean, std: per-channel statistics of pixels scaled to [0, 1]
            (for ``cstar.models.Normalize``).
        eps: default L-inf attack radius, in [0, 1] pixel units.
        augment: default training augmentation: ``"crop_flip"`` (random crop
            and horizontal flip), ``"crop"`` (crop only) or ``"none"``.
        crop_padding: zero padding, in pixels, of the random crop of tensor
            datasets (0 means the crop is the identity).
    """

    name: str
    num_classes: int | None
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float
    augment: Augment
    crop_padding: int = 0


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), 0.3, "none"),
        DatasetSpec("fashion_mnist", 10, (1, 28, 28), (0.2860,), (0.3530,), 0.1, "none"),
        DatasetSpec("cifar10", 10, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                    (0.2470, 0.2435, 0.2616), 8 / 255, "crop_flip", 4),
        DatasetSpec("cifar100", 100, (3, 32, 32), (0.5071, 0.4865, 0.4409),
                    (0.2673, 0.2564, 0.2762), 8 / 255, "crop_flip", 4),
        DatasetSpec("svhn", 10, (3, 32, 32), (0.4377, 0.4438, 0.4728),
                    (0.1980, 0.2010, 0.1970), 8 / 255, "crop", 4),
        DatasetSpec("digits", 10, (1, 8, 8), (0.3053,), (0.3759,), 0.2, "none"),
        DatasetSpec("imagefolder", None, (3, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD,
                    4 / 255, "crop_flip"),
    )
}
"""Every dataset ``cstar.data.load`` knows, by name."""
