"""VGG-16 with BatchNorm (Simonyan & Zisserman, 2015), CIFAR variant.

Thirteen 3x3 conv-BN-ReLU layers in five groups separated by 2x2 max-pooling,
then one linear layer ``fc`` on the flattened 512 x (s/32) x (s/32) features.
"""

import torch
from torch import nn

from .._core.errors import CstarError
from ._layers import Normalize, init_weights
from ._registry import register

_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class _ConvBNReLU(nn.Module):
    """3x3 conv (padding 1, no bias) + BN + ReLU: (N, C_in, H, W) -> (N, C_out, H, W)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class _VGG(nn.Module):
    """``features`` is a ModuleList of conv-BN-ReLU blocks and max-pools; ``fc`` the classifier."""

    def __init__(
        self, *, input_size: int, num_classes: int, in_channels: int, mean: list[float], std: list[float]
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = nn.ModuleList()
        planes = in_channels
        for item in _VGG16:
            if item == "M":
                self.features.append(nn.MaxPool2d(2))
            else:
                self.features.append(_ConvBNReLU(planes, item))
                planes = item
        side = input_size // 32
        self.fc = nn.Linear(planes * side * side, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for layer in self.features:
            x = layer(x)
        return self.fc(torch.flatten(x, 1))


@register("vgg16")
def vgg16(*, num_classes, in_channels, input_size, mean, std) -> nn.Module:
    """VGG-16-BN for inputs of side ``input_size`` >= 32 (14.7M params at 32 px, 10 classes)."""
    if input_size < 32:
        raise CstarError(
            f"vgg16 needs input_size >= 32 (it pools 5 times), got {input_size}; resize the images"
        )
    return _VGG(
        input_size=input_size, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std
    )
