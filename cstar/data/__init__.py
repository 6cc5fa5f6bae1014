"""Datasets, loaders and downloads.

``load(name, root, split)`` reads a dataset from its official files (see
``DATASETS``); ``make_loader(data, batch_size, train=...)`` yields batches
``(x, y)``: x float32 in [0, 1] ``(N, C, H, W)``, y int64 ``(N,)``.
"""

from ._download import download
from ._folder import FolderData
from ._load import MIRRORS, default_root, load
from ._loader import BatchLoader, FolderLoader, make_loader
from ._spec import DATASETS, DatasetSpec
from ._tensor import TensorData

__all__ = [
    "DATASETS", "MIRRORS", "BatchLoader", "DatasetSpec", "FolderData", "FolderLoader",
    "TensorData", "default_root", "download", "load", "make_loader",
]
