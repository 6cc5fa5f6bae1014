"""Layers and initialisation shared by every built-in architecture."""

from collections.abc import Sequence

import torch
from torch import nn

from .._core.errors import CstarError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``; the first layer of every built-in model.

    ``mean`` and ``std`` are sequences of C floats (``std`` > 0), stored as
    buffers of shape (1, C, 1, 1) so they travel with the ``state_dict``.
    Input (N, C, H, W) in [0, 1]; output has the same shape.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        try:
            mean_l, std_l = [float(v) for v in mean], [float(v) for v in std]
        except (TypeError, ValueError):
            raise CstarError(
                f"Normalize needs lists of numbers for mean and std, got {mean!r} and {std!r}"
            ) from None
        if not mean_l or len(mean_l) != len(std_l):
            raise CstarError(
                f"Normalize needs mean and std of equal, non-zero length, "
                f"got {len(mean_l)} and {len(std_l)}; pass one value per channel"
            )
        if min(std_l) <= 0:
            raise CstarError(f"Normalize std must be positive, got {std_l}; pass std > 0")
        self.register_buffer("mean", torch.tensor(mean_l).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_l).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


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


def normalization_of(model: nn.Module) -> str:
    """What the model does to its [0, 1] inputs before its first layer, in words: the choice recorded by the
    CLI (``cstar_normalize``), else its :class:`Normalize` front's mean and std, else that it has none of cstar's."""
    chosen = getattr(model, "cstar_normalize", None)
    if isinstance(chosen, str):
        return chosen
    front = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if front is None:
        return "none of cstar's (any normalisation is inside the model)"
    mean, std = front.mean.flatten().tolist(), front.std.flatten().tolist()
    if all(v == 0 for v in mean) and all(v == 1 for v in std):
        return "none (inputs in [0, 1])"
    return f"mean {','.join(f'{v:.4g}' for v in mean)}, std {','.join(f'{v:.4g}' for v in std)}"
