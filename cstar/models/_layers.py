"""Layers and initialisation shared by every built-in architecture."""

from collections.abc import Sequence

import torch
from torch import nn

from .._errors import CstarError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the first layer of every built-in model.

    ``mean`` and ``std`` are sequences of C floats (``std`` > 0), stored as
    buffers of shape (1, C, 1, 1) so they travel with the ``state_dict``.
    Input (N, C, H, W) in [0, 1]; output has the same shape.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        if mean_t.dim() != 1 or std_t.shape != mean_t.shape:
            raise CstarError(
                f"Normalize needs mean and std as two lists of equal length, "
                f"got shapes {tuple(mean_t.shape)} and {tuple(std_t.shape)}; pass one value per channel"
            )
        if not bool((std_t > 0).all()):
            raise CstarError(f"Normalize std must be positive, got {std_t.tolist()}; pass std > 0")
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1))
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs with zero bias; BatchNorm weight 1, bias 0.

    Linear layers keep PyTorch's default initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
