"""``load(name, ...)``: find (or download) a dataset's official files and read them."""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._core.errors import CstarError
from ._download import download as _download
from ._download import extract_tar
from ._folder import FolderData
from ._formats import corrupt, read_cifar_batch, read_idx_pair, read_sklearn_digits, read_svhn_mat
from ._spec import DATASETS, DatasetSpec
from ._tensor import TensorData

SPLITS = ("train", "test")
DIGITS_TRAIN_SIZE = 1437

MIRRORS: dict[str, str] = {
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "cifar10": "https://www.cs.toronto.edu/~kriz/",
    "cifar100": "https://www.cs.toronto.edu/~kriz/",
    "svhn": "http://ufldl.stanford.edu/housenumbers/",
}
"""Base URL per dataset; ``load(mirror=...)`` or env ``CSTAR_MIRROR`` overrides it."""


@dataclass(frozen=True)
class _Source:
    """Where a dataset's official files live under the data root, and how to fetch them."""

    title: str
    folder: str                          # relative to the root
    files: dict[str, tuple[str, ...]]    # split -> files needed in ``folder``
    md5: dict[str, str]                  # downloaded file name -> md5
    archive: str | None = None           # tar.gz fetched into the root and unpacked there


def _idx_source(title: str, folder: str, md5s: tuple[str, str, str, str]) -> _Source:
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    return _Source(title, folder, {"train": names[:2], "test": names[2:]}, dict(zip(names, md5s)))


SOURCES: dict[str, _Source] = {
    "mnist": _idx_source("MNIST", "MNIST/raw", (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")),
    "fashion_mnist": _idx_source("Fashion-MNIST", "FashionMNIST/raw", (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")),
    "cifar10": _Source(
        "CIFAR-10", "cifar-10-batches-py",
        {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"}, "cifar-10-python.tar.gz"),
    "cifar100": _Source(
        "CIFAR-100", "cifar-100-python", {"train": ("train",), "test": ("test",)},
        {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"}, "cifar-100-python.tar.gz"),
    "svhn": _Source(
        "SVHN", "SVHN", {"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
         "test_32x32.mat": "eb5a983be6a315427106f1b0ad7e4e1b"}),
}
"""Official file layout and checksums of each downloadable dataset."""


def default_root() -> Path:
    """Env ``CSTAR_DATA`` if set, else ``~/.cache/cstar/data``."""
    return Path(os.environ.get("CSTAR_DATA") or "~/.cache/cstar/data").expanduser()


def _fetch(name: str, root: Path, missing: list[str], mirror: str | None) -> None:
    """Download the files of dataset ``name`` (or its archive, then unpack it into ``root``)."""
    source = SOURCES[name]
    base = (mirror or os.environ.get("CSTAR_MIRROR") or MIRRORS[name]).rstrip("/") + "/"
    if source.archive:
        archive = _download(base + source.archive, root / source.archive, md5=source.md5[source.archive])
        extract_tar(archive, root)
    else:
        for file in missing:
            _download(base + file, root / source.folder / file, md5=source.md5[file])


def _ensure_files(name: str, root: Path, split: str, download: bool, mirror: str | None) -> list[Path]:
    """Paths of the split's files, downloading them first if some are missing and ``download``."""
    source = SOURCES[name]
    folder = root / source.folder
    missing = [f for f in source.files[split] if not (folder / f).is_file()]
    if missing and download:
        _fetch(name, root, missing, mirror)
        missing = [f for f in source.files[split] if not (folder / f).is_file()]
    if missing:
        fix = ("the download did not provide them: delete what it left in the root and retry"
               if download else f"pass download=True (CLI: --download) or point --root at a folder "
                                f"holding {source.folder}/")
        raise CstarError(f"{source.title} not found in {folder} (missing {', '.join(missing)}): {fix}")
    return [folder / f for f in source.files[split]]


def _tensor_data(images: np.ndarray, labels: np.ndarray, spec: DatasetSpec, folder: Path) -> TensorData:
    """Check shape and label range against ``spec`` (naming ``folder`` if wrong); wrap as CPU tensors."""
    if images.shape[1:] != spec.image_shape:
        raise corrupt(folder, f"images have shape {images.shape[1:]}, expected {spec.image_shape}")
    if labels.size and not 0 <= labels.min() <= labels.max() < spec.num_classes:
        raise corrupt(folder, f"labels span {labels.min()}..{labels.max()}, "
                            f"expected 0..{spec.num_classes - 1}")
    return TensorData(torch.from_numpy(images), torch.from_numpy(labels), spec)


def _read(name: str, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels from a split's official files."""
    if name in ("mnist", "fashion_mnist"):
        return read_idx_pair(*paths)
    if name == "svhn":
        return read_svhn_mat(paths[0])
    label_key = "labels" if name == "cifar10" else "fine_labels"
    batches = [read_cifar_batch(p, label_key) for p in paths]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _load_digits(split: str) -> TensorData:
    images, labels = read_sklearn_digits()
    part = slice(None, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    return TensorData(torch.from_numpy(images[part].copy()), torch.from_numpy(labels[part].copy()),
                      DATASETS["digits"])


def _load_folder(root: Path | None, split: str, download: bool, image_size: int) -> FolderData:
    if root is None:
        raise CstarError("imagefolder needs root=<folder holding train/ and val/> (CLI: --root)")
    folder = root / split
    if split == "test" and not folder.is_dir():
        folder = root / "val"
    if not folder.is_dir():
        fix = "it cannot be downloaded automatically; " if download else ""
        raise CstarError(f"image folder {folder} not found: {fix}point --root at a folder holding "
                         f"{split if split == 'train' else 'val'}/<class>/<image>")
    return FolderData(folder, image_size=image_size)


def load(name: str, root: str | os.PathLike | None = None, split: str = "train",
         download: bool = False, *, mirror: str | None = None,
         image_size: int = 224) -> TensorData | FolderData:
    """Load one split of a dataset in ``DATASETS`` from its official files.

    Args:
        name: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``,
            ``digits`` or ``imagefolder`` (``-`` is accepted for ``_``).
        root: data root; default :func:`default_root`. Layouts under it:
            ``MNIST/raw/*-ubyte.gz``, ``FashionMNIST/raw/*-ubyte.gz``,
            ``cifar-10-batches-py/``, ``cifar-100-python/``,
            ``SVHN/{train,test}_32x32.mat``. For ``imagefolder``, ``root`` is
            required and holds ``train/<class>/<image>`` and ``val/`` (or ``test/``).
            Ignored for ``digits``.
        split: ``"train"`` or ``"test"``.
        download: fetch missing files (checksummed) from ``mirror``.
        mirror: base URL replacing the official one; default env ``CSTAR_MIRROR``,
            else ``MIRRORS[name]``.
        image_size: output side in pixels, ``imagefolder`` only.

    Returns:
        :class:`TensorData` (everything in memory), or :class:`FolderData` for
        ``imagefolder``. ``digits`` is scikit-learn's bundled set, split
        deterministically: the first 1437 images train, the last 360 test.
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise CstarError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise CstarError(f"unknown split {split!r}: use 'train' or 'test'")
    if key == "imagefolder":
        return _load_folder(None if root is None else Path(root).expanduser(), split, download,
                            image_size)
    if key == "digits":
        return _load_digits(split)
    root = default_root() if root is None else Path(root).expanduser()
    paths = _ensure_files(key, root, split, download, mirror)
    images, labels = _read(key, paths)
    return _tensor_data(images, labels, DATASETS[key], paths[0].parent)
