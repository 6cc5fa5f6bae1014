"""Batched, vectorised augmentation of image tensors ``(N, C, H, W)`` on their own device.

Random numbers are drawn on the CPU from the given generator, so the result
is the same on every device.
"""

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each side with ``padding`` zeros, then cut an ``H x W`` window at a random offset per image.

    The offsets (row and column, each uniform in ``0..2 * padding``) are
    applied with one gather: no Python loop over the images.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(device)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=device)  # (N, W)
    return padded[torch.arange(n, device=device)[:, None, None, None],
                  torch.arange(c, device=device)[None, :, None, None],
                  rows[:, None, :, None],
                  cols[:, None, None, :]]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 0.5."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(-1), images)
