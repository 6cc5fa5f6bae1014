"""Datasets read image by image from ``<folder>/<class>/<image>`` (ImageNet layout)."""

import copy
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .._core.errors import CstarError
from ._spec import DATASETS, Augment, check_augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
_SCALE = (0.08, 1.0)
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


def _scan(folder: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted sub-folder names) and ``(image path, label)`` pairs, sorted."""
    if not folder.is_dir():
        raise CstarError(f"image folder {folder} does not exist: expected {folder}/<class>/<image>")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = [(path, label) for label, name in enumerate(classes)
               for path in sorted((folder / name).rglob("*"))
               if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()]
    if not samples:
        raise CstarError(f"no images in {folder}: expected {folder}/<class>/<image> with one of "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    return classes, samples


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as e:
        raise CstarError(f"cannot decode image {path} ({e}): replace or delete the file") from e


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random box (8-100% of the area, aspect ratio 3/4..4/3) resized to ``size`` x ``size``.

    After 10 failed draws (boxes larger than the image), the largest centred box
    with its aspect ratio clamped to 3/4..4/3 is used.
    """
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*_SCALE)
        ratio = math.exp(rng.uniform(*_LOG_RATIO))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            break
    else:
        ratio = min(max(width / height, 3 / 4), 4 / 3)
        w, h = min(width, round(height * ratio)), min(height, round(width / ratio))
        left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``round(size * 256 / 224)``, then take the centred ``size`` square."""
    short = round(size * 256 / 224)
    width, height = image.size
    scale = short / min(width, height)
    new_width, new_height = round(width * scale), round(height * scale)
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.BILINEAR)
    left, top = (new_width - size) // 2, (new_height - size) // 2
    return image.crop((left, top, left + size, top + size))


class FolderData(torch.utils.data.Dataset):
    """Images decoded on demand from ``<folder>/<class>/<image>``; classes are sorted folder names.

    ``data[i]`` is ``(image uint8 (3, image_size, image_size), label int)``.
    With ``augment="none"`` (default) the image is resized (shorter side
    ``image_size * 256 / 224``) and centre-cropped; otherwise a random-resized
    crop, plus a horizontal flip with p=0.5 for ``"crop_flip"``. The random draws
    for image ``i`` come from ``numpy.random.default_rng((*seed, i))`` when
    ``seed`` (a tuple of non-negative ints) is set, else from fresh entropy.

    Attributes:
        folder: the folder scanned. classes: class names; label ``k`` is ``classes[k]``.
        samples: ``(path, label)`` pairs. spec: ``DATASETS["imagefolder"]`` with the
        found ``num_classes`` and ``image_shape`` ``(3, image_size, image_size)``.
    """

    def __init__(self, folder: str | os.PathLike, image_size: int = 224, augment: Augment = "none",
                 seed: tuple[int, ...] | None = None):
        check_augment(augment)
        if image_size < 1:
            raise CstarError(f"image_size must be a positive number of pixels, got {image_size}")
        self.folder = Path(folder)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.classes, self.samples = _scan(self.folder)
        self.spec = replace(DATASETS["imagefolder"], num_classes=len(self.classes),
                            image_shape=(3, image_size, image_size))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_augment(self, augment: Augment, seed: tuple[int, ...] | None = None) -> "FolderData":
        """A shallow copy (same file list) with another augmentation and seed."""
        check_augment(augment)
        view = copy.copy(self)
        view.augment, view.seed = augment, seed
        return view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _open_rgb(path)
        if self.augment == "none":
            pixels = np.asarray(resize_center_crop(image, self.image_size))
        else:
            rng = np.random.default_rng(None if self.seed is None else (*self.seed, index))
            pixels = np.asarray(random_resized_crop(image, self.image_size, rng))
            if self.augment == "crop_flip" and rng.random() < 0.5:
                pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), label
