"""Shared test helpers (imported by the test modules beside this file)."""

import torch
from torch import nn


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms (so a lost or mis-folded buffer changes outputs); eval mode."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()
