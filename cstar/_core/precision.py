"""Float32 that means float32 on GPUs: TF32 off for a block.

On recent NVIDIA GPUs cuDNN convolutions (and, where the user allowed it,
matrix products) run in TF32 by default: a 10-bit mantissa, so outputs that
agree to 1e-6 on a CPU differ by about 1e-3. Checks that compare two
computations of the same function (a decomposition against its dense weight,
a folded BatchNorm against the original) run inside :func:`full_float32`, so
that their tolerances hold on every device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Turn TF32 off for convolutions and matrix products in the block; restore the settings after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
