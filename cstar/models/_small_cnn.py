"""The small CNN of Madry et al. (2018) for MNIST-like data."""

import torch
from torch import nn

from .._core.errors import CstarError
from ._layers import Normalize, init_weights
from ._registry import register


class _SmallCNN(nn.Module):
    """conv5x5(32)-ReLU-maxpool2, conv5x5(64)-ReLU-maxpool2, Linear(64 (s/4)^2, 1024)-ReLU, Linear(1024, C).

    Input (N, in_channels, s, s) with s = ``input_size``; output (N, C) logits.
    """

    def __init__(
        self, *, input_size: int, num_classes: int, in_channels: int, mean: list[float], std: list[float]
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = input_size // 4
        self.fc1 = nn.Linear(64 * side * side, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(self.normalize(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(torch.flatten(x, 1))))


@register("small_cnn")
def small_cnn(*, num_classes, in_channels, input_size, mean, std) -> nn.Module:
    """Madry-style small CNN for inputs of side ``input_size`` >= 4.

    28 for MNIST (3.27M params), 8 for sklearn digits.
    """
    if input_size < 4:
        raise CstarError(
            f"small_cnn needs input_size >= 4 (it pools twice), got {input_size}; resize the images"
        )
    return _SmallCNN(
        input_size=input_size, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std
    )
