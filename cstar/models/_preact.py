"""Pre-activation ResNets (He et al., 2016, "Identity Mappings in Deep Residual Networks")
and Wide ResNets (Zagoruyko & Komodakis, 2016), CIFAR-style.

Blocks are BN-ReLU-conv3x3-(dropout)-BN-ReLU-conv3x3; a shape-changing
shortcut is a 1x1 conv applied to the pre-activated input. The network ends
with BN-ReLU, global average pooling and one linear layer ``fc``.
"""

from collections.abc import Sequence

import torch
from torch import nn

from .._core.errors import CstarError
from ._layers import Normalize, init_weights
from ._registry import check_int, register


class _PreActBlock(nn.Module):
    """Pre-activation basic block: (N, in_planes, H, W) -> (N, planes, H/stride, W/stride)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.projects = stride != 1 or in_planes != planes
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if self.projects else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        residual = self.shortcut(act) if self.projects else x
        out = self.dropout(self.conv1(act))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


class _PreActResNet(nn.Module):
    """3x3 stem conv, stages of pre-activation blocks (first block of each later stage has stride 2),
    BN-ReLU, pool, ``fc``. ``stages`` is a ModuleList of stages, each a ModuleList of blocks.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        *,
        dropout: float,
        num_classes: int,
        in_channels: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, stem_width, 3, padding=1, bias=False)
        in_planes = stem_width
        self.stages = nn.ModuleList()
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = nn.ModuleList()
            for j in range(depth):
                blocks.append(_PreActBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, dropout))
                in_planes = planes
            self.stages.append(blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("preact_resnet18")
def preact_resnet18(*, num_classes, in_channels, input_size, mean, std, width: int = 64) -> nn.Module:
    """Pre-activation ResNet-18: 4 stages x 2 blocks, widths w, 2w, 4w, 8w (``width`` w, default 64)."""
    w = check_int("width", width, 1)
    return _PreActResNet(
        (2, 2, 2, 2), (w, 2 * w, 4 * w, 8 * w), w,
        dropout=0.0, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )


@register("wide_resnet28")
def wide_resnet28(
    *, num_classes, in_channels, input_size, mean, std, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """WRN-28-k: 16-channel stem, 3 stages x 4 blocks of widths 16k, 32k, 64k (``widen_factor`` k,
    default 10: 36.5M params), ``dropout`` between the convs of each block (default 0).
    """
    k = check_int("widen_factor", widen_factor, 1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise CstarError(f"dropout must be a number in [0, 1), got {dropout!r}; pass e.g. dropout=0.3")
    return _PreActResNet(
        (4, 4, 4), (16 * k, 32 * k, 64 * k), 16,
        dropout=float(dropout), num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )
