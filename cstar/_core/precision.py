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


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), from its flags in ``cpuinfo``
    (Linux); False where the file cannot be read. oneDNN also runs bfloat16 on other AVX-512 CPUs, by
    emulation, more slowly than float32: those do not count."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
