"""ResNets (He et al., 2016, "Deep Residual Learning for Image Recognition").

CIFAR-style models use a 3x3 stride-1 stem without max-pooling; ImageNet-style
models use a 7x7 stride-2 stem followed by 3x3 stride-2 max-pooling. All end in
global average pooling and one linear layer ``fc``; shortcuts that change shape
are 1x1 conv + BN projections (option B).
"""

from collections.abc import Sequence

import torch
from torch import nn

from ._layers import Normalize, init_weights
from ._registry import check_int, register


class _Projection(nn.Module):
    """1x1 conv (given stride) + BN shortcut: (N, C_in, H, W) -> (N, C_out, H/stride, W/stride)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return _Projection(in_planes, out_planes, stride)


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus shortcut; output has ``planes`` channels."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, as in "ResNet v1.5"), 1x1 expand to 4 * ``planes``."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)
        self.relu3 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class _ResNet(nn.Module):
    """Stem, stages of residual blocks (first block of each later stage has stride 2), pool, ``fc``.

    ``stages`` is a ModuleList of stages, each a ModuleList of blocks.
    """

    def __init__(
        self,
        block: type[_BasicBlock] | type[_Bottleneck],
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        imagenet_stem: bool,
        num_classes: int,
        in_channels: int,
        mean: list[float],
        std: list[float],
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
            self.pool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        self.stages = nn.ModuleList()
        for i, (depth, planes) in enumerate(zip(depths, widths)):
            blocks = nn.ModuleList()
            for j in range(depth):
                blocks.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes * block.expansion
            self.stages.append(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages:
            for block in stage:
                x = block(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register("resnet18")
def resnet18(*, num_classes, in_channels, input_size, mean, std, width: int = 64) -> nn.Module:
    """CIFAR ResNet-18: 4 stages x 2 BasicBlocks, widths w, 2w, 4w, 8w (``width`` w, default 64).

    11,173,962 parameters at width 64 with 10 classes; any input size.
    """
    w = check_int("width", width, 1)
    return _ResNet(
        _BasicBlock, (2, 2, 2, 2), (w, 2 * w, 4 * w, 8 * w),
        imagenet_stem=False, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )


@register("resnet20")
def resnet20(*, num_classes, in_channels, input_size, mean, std) -> nn.Module:
    """CIFAR ResNet-20: 3 stages x 3 BasicBlocks, 16/32/64 channels, projection shortcuts (~0.27M params)."""
    return _ResNet(
        _BasicBlock, (3, 3, 3), (16, 32, 64),
        imagenet_stem=False, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )


@register("resnet18_imagenet")
def resnet18_imagenet(*, num_classes, in_channels, input_size, mean, std) -> nn.Module:
    """ImageNet ResNet-18 (BasicBlocks 2-2-2-2, widths 64-512).

    Made for 224 px; any size >= 32 works.
    """
    return _ResNet(
        _BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512),
        imagenet_stem=True, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )


@register("resnet50_imagenet")
def resnet50_imagenet(*, num_classes, in_channels, input_size, mean, std) -> nn.Module:
    """ImageNet ResNet-50 (Bottlenecks 3-4-6-3, output widths 256-2048).

    Made for 224 px; any size >= 32 works.
    """
    return _ResNet(
        _Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512),
        imagenet_stem=True, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
    )
