"""Readers for the official file formats; each returns numpy arrays or raises ``CstarError``.

Images come back as uint8 ``(N, C, H, W)``, labels as int64 ``(N,)``.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np

from .._core.errors import CstarError
from ._pickle import safe_load

_REFETCH = "delete it and load again with download=True (CLI: --download)"


def corrupt(path: Path, problem: str) -> CstarError:
    """The error for a dataset file that exists but cannot be used."""
    return CstarError(f"{path} is corrupt ({problem}): {_REFETCH}")


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file of unsigned bytes (MNIST's format) into a uint8 array.

    The header is 2 zero bytes, the type code 0x08, the number of dimensions,
    then each dimension as a big-endian uint32; the payload must match exactly.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise corrupt(path, f"not a readable gzip file: {e}") from e
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] == 0:
        raise corrupt(path, f"bad idx magic 0x{raw[:4].hex()}, expected 0x000008xx")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise corrupt(path, "idx header is truncated")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    if len(raw) - header != int(np.prod(dims)):
        raise corrupt(path, f"idx dims {dims} need {int(np.prod(dims))} bytes, "
                            f"found {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()


def read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style images ``(N, 1, H, W)`` and labels ``(N,)`` from two idx files."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise corrupt(images_path, f"expected 3 idx dimensions, found {images.ndim}")
    if labels.shape != images.shape[:1]:
        raise corrupt(labels_path, f"labels shape {labels.shape} does not match "
                                   f"{images.shape[0]} images in {images_path.name}")
    return images[:, None], labels.astype(np.int64)


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle: images ``(N, 3, 32, 32)`` and ``labels[label_key]``.

    Each row of ``data`` holds 3072 bytes: the 32x32 red plane, then green, then blue.
    """
    try:
        with open(path, "rb") as f:
            batch = safe_load(f)
        batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data, labels = np.asarray(batch["data"]), np.asarray(batch[label_key])
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same
        raise corrupt(path, f"not a CIFAR batch pickle: {type(e).__name__}: {e}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise corrupt(path, f"'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != data.shape[:1] or labels.dtype.kind not in "iu":
        raise corrupt(path, f"'{label_key}' has shape {labels.shape}, expected ({len(data)},) ints")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An SVHN ``*_32x32.mat``: images ``(N, 3, 32, 32)``, labels with the file's 10 mapped to 0."""
    try:
        import scipy.io
    except ImportError as e:
        raise CstarError("SVHN needs scipy: pip install 'cstar[svhn]'") from e
    try:
        mat = scipy.io.loadmat(path)
        images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    except Exception as e:  # scipy raises many types for a damaged file
        raise corrupt(path, f"cannot read it as a .mat file: {type(e).__name__}: {e}") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != 3:
        raise corrupt(path, f"'X' is {images.dtype} {images.shape}, expected uint8 (32, 32, 3, N)")
    if labels.shape != images.shape[3:]:
        raise corrupt(path, f"'y' has {labels.size} labels for {images.shape[3]} images")
    labels = labels.astype(np.int64)
    labels[labels == 10] = 0
    return images.transpose(3, 2, 0, 1).copy(), labels


def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits as images ``(1797, 1, 8, 8)`` (0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise CstarError("the digits dataset needs scikit-learn: pip install 'cstar[digits]'") from e
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    return images[:, None], digits.target.astype(np.int64)
