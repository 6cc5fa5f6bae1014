"""The README examples' token budget, applied from outside the package.

``tests/test_readme.py`` runs every README block as a subprocess with this
folder first on ``PYTHONPATH``, so Python imports this file at startup (the
:mod:`site` module's ``sitecustomize`` hook). Once cstar is imported, every
training phase (:class:`cstar.TrainConfig`) lasts at most :data:`EPOCHS` epoch
with a per-epoch check on at most :data:`CHECK_IMAGES` images, and every
in-memory dataset that ``cstar.data.load`` returns keeps its first
:data:`TRAIN_IMAGES` training or :data:`TEST_IMAGES` test images; a warning says
so once. The code paths are the real ones; the figures mean nothing.
"""

from __future__ import annotations

import functools
import importlib.abc
import inspect
import sys
import warnings

EPOCHS = 1
TRAIN_IMAGES = 1256  # the CLI holds out 1000 for its per-epoch check (64 of them used): 256 to train on
TEST_IMAGES = 64
CHECK_IMAGES = 64


def _cap_training(module) -> None:
    """TrainConfig's settings cut to the budget once they are checked."""
    checked = module.TrainConfig.__post_init__

    def capped(self) -> None:
        checked(self)
        self.epochs = min(self.epochs, EPOCHS)
        self.check_size = min(self.check_size, CHECK_IMAGES)

    module.TrainConfig.__post_init__ = capped
    warnings.warn(f"README budget: training phases capped at {EPOCHS} epoch and datasets at their first "
                  f"{TRAIN_IMAGES} training / {TEST_IMAGES} test images; the figures are meaningless")


def _cap_data(module) -> None:
    """``load`` keeping the first images of an in-memory dataset (before ``cstar.data`` binds the name)."""
    load = module.load
    split_of = inspect.signature(load)

    @functools.wraps(load)
    def capped(*args, **kwargs):
        loaded = load(*args, **kwargs)
        split = split_of.bind(*args, **kwargs).arguments.get("split", "train")
        if isinstance(loaded, module.TensorData):
            return loaded.take(TRAIN_IMAGES if split == "train" else TEST_IMAGES)
        return loaded

    module.load = capped


PATCHES = {"cstar.training.config": _cap_training, "cstar.data._load": _cap_data}


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`PATCHES` with the other finders and patches each right after it runs."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self or not hasattr(finder, "find_spec") else finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def run_then_patch(module) -> None:
            run(module)
            PATCHES[name](module)

        spec.loader.exec_module = run_then_patch
        return spec


sys.meta_path.insert(0, _PatchAfterImport())
