"""``CSTAR_SMOKE=1``: every run on a token budget, so that documentation examples run as tests.

With the variable set, every training phase (:class:`cstar.TrainConfig`) lasts
at most :data:`EPOCHS` epoch with a per-epoch check on at most
:data:`CHECK_IMAGES` images, and every in-memory dataset keeps its first
:data:`TRAIN_IMAGES` training or :data:`TEST_IMAGES` test images; a warning says
so once. The code paths are the real ones; the figures mean nothing. The README
test (``tests/test_readme.py``) runs every README example this way.
"""

from __future__ import annotations

import os
import warnings

EPOCHS = 1
TRAIN_IMAGES = 2048
TEST_IMAGES = 64
CHECK_IMAGES = 64
_warned = False


def active() -> bool:
    """True when ``CSTAR_SMOKE=1``: runs are cut to a token budget."""
    global _warned
    on = os.environ.get("CSTAR_SMOKE", "") == "1"
    if on and not _warned:
        _warned = True
        warnings.warn(f"CSTAR_SMOKE=1: training phases capped at {EPOCHS} epoch and datasets at their first "
                      f"{TRAIN_IMAGES} training / {TEST_IMAGES} test images; the figures are meaningless",
                      stacklevel=3)
    return on


def images(split: str) -> int:
    """How many images of ``split`` a smoke run keeps."""
    return TRAIN_IMAGES if split == "train" else TEST_IMAGES
