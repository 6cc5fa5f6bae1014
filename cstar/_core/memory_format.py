"""Channels-last (NHWC) on the CPU: when the attacks use it, and the convs oneDNN gets wrong in it.

oneDNN's convolutions are faster in NHWC than in NCHW on the CPU: PGD on a
CIFAR ResNet-18 of width 16 runs 1.2-1.3x faster with its input in channels-last
(``benchmarks/bench_attack_throughput.py``), with the same arithmetic up to the
order of float32 sums. Handing a conv a channels-last input is enough: its
output is channels-last, and so is every layer's after it.
"""

from __future__ import annotations

import torch
from torch import nn

ONEDNN_IC_BLOCK = 16  # the input-channel block of oneDNN's 1x1 conv kernels on AVX-512 (8 on AVX2)


def channels_last_unsafe_convs(model: nn.Module) -> list[str]:
    """Names of ``model``'s convs whose weight gradient oneDNN gets wrong in channels-last on the CPU.

    oneDNN's 1x1 kernel reduces a strided 1x1 conv to a unit-stride one through
    a workspace, and its NHWC weight-gradient pass writes past that workspace
    when the conv has fewer input channels (per group) than the kernel's block:
    silently wrong gradients, a hang or a crash (uxlfoundation/oneDNN#6035;
    pruned ResNet shortcuts such as a 5 -> 9 channel 1x1 stride-2 conv hit it).
    """
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1)
            and m.in_channels // m.groups < ONEDNN_IC_BLOCK]


def attack_in_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """True when an attack on ``x`` should run with ``x`` in channels-last.

    That is: images (N, C, H, W) on the CPU, in either layout, for a
    model with a 2-D conv and none of :func:`channels_last_unsafe_convs` (an
    attack takes no weight gradient, but such a model stays in the layout it
    is trained in). GPUs keep the caller's layout: there the faster one depends
    on the GPU and the precision.
    """
    if x.device.type != "cpu" or x.dim() != 4:
        return False
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.modules())
    return has_conv and not channels_last_unsafe_convs(model)


def is_channels_last(x: torch.Tensor) -> bool:
    """True when ``x`` (N, C, H, W) has channels-last strides, the layout the convs then use.

    With one channel both layouts are contiguous (``is_contiguous`` says yes to
    both) and the convs follow the strides: channels-last only once
    :func:`to_channels_last` has set them (the channel stride 1).
    """
    return x.is_contiguous(memory_format=torch.channels_last) and (x.shape[1] > 1 or x.stride(1) == 1)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) with channels-last strides, even with one channel (``x`` itself when it has them)."""
    return x if is_channels_last(x) else torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
