"""Factorised layers built only from plain ``nn.Conv2d`` / ``nn.Linear``.

Each is a small container, so ``state_dict``, TorchScript, ``torch.compile`` and
ONNX export need no custom operator, and the speed-up is that of the smaller
dense layers it holds.

- :class:`Tucker2Conv2d`: a k x k conv with kernel ``core x0 u_out x1 u_in``
  becomes ``first`` (1x1, C_in -> r_in) -> ``core`` (k x k, r_in -> r_out, the
  original stride, padding, padding mode and dilation) -> ``last`` (1x1, r_out -> C_out, bias).
- :class:`LowRankConv1x1`: a 1x1 conv ``W = U @ V`` becomes ``first`` (1x1,
  C_in -> r, original stride, padding and padding mode) -> ``last`` (1x1, r -> C_out, bias).
- :class:`LowRankLinear`: ``W = U @ V`` becomes ``first`` (in -> r) -> ``last``
  (r -> out, bias).
"""

from __future__ import annotations

import torch
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _padding(value: int | tuple[int, int] | str) -> tuple[int, int] | str:
    """A conv's padding: a pair, or ``"same"`` / ``"valid"`` as given."""
    return value if isinstance(value, str) else _pair(value)


class Tucker2Conv2d(nn.Module):
    """Tucker-2 factorised conv; ``ranks = (r_out, r_in)``.

    Input (N, C_in, H, W) -> output (N, C_out, H', W') as the dense conv it replaces.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 ranks: tuple[int, int], stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, bias: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__()
        r_out, r_in = ranks
        self.ranks = (int(r_out), int(r_in))
        self.first = nn.Conv2d(in_channels, r_in, 1, bias=False)
        # the 1x1 projection is pointwise, so padding the projected input (any mode) equals projecting the padded one
        self.core = nn.Conv2d(r_in, r_out, _pair(kernel_size), stride=_pair(stride), padding=_padding(padding),
                              dilation=_pair(dilation), bias=False, padding_mode=padding_mode)
        self.last = nn.Conv2d(r_out, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor, bias: torch.Tensor | None,
                     conv: nn.Conv2d) -> "Tucker2Conv2d":
        """Build from Tucker-2 factors of ``conv.weight``: core (r_out, r_in, kh, kw),
        u_out (C_out, r_out), u_in (C_in, r_in); other settings copied from ``conv``."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, (core.shape[0], core.shape[1]),
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=bias is not None,
                    padding_mode=conv.padding_mode)
        dtype, device = conv.weight.dtype, conv.weight.device
        with torch.no_grad():
            layer.first.weight.copy_(u_in.t()[:, :, None, None])
            layer.core.weight.copy_(core)
            layer.last.weight.copy_(u_out[:, :, None, None])
            if bias is not None:
                layer.last.bias.copy_(bias)
        return layer.to(device=device, dtype=dtype)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel (C_out, C_in, kh, kw)."""
        u_in = self.first.weight[:, :, 0, 0]  # (r_in, C_in)
        u_out = self.last.weight[:, :, 0, 0]  # (C_out, r_out)
        return torch.einsum("oa,abhw,bi->oihw", u_out, self.core.weight, u_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.core(self.first(x)))


class LowRankConv1x1(nn.Module):
    """A 1x1 conv factorised by SVD into two 1x1 convs of inner width ``rank``."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] | str = 0, bias: bool = True, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.rank = int(rank)
        self.first = nn.Conv2d(in_channels, rank, 1, stride=_pair(stride), padding=_padding(padding), bias=False,
                               padding_mode=padding_mode)
        self.last = nn.Conv2d(rank, out_channels, 1, bias=bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     conv: nn.Conv2d) -> "LowRankConv1x1":
        """Build from ``conv.weight[:, :, 0, 0] ~= u @ v``: u (C_out, r), v (r, C_in)."""
        layer = cls(conv.in_channels, conv.out_channels, u.shape[1], stride=conv.stride, padding=conv.padding,
                    bias=bias is not None, padding_mode=conv.padding_mode)
        with torch.no_grad():
            layer.first.weight.copy_(v[:, :, None, None])
            layer.last.weight.copy_(u[:, :, None, None])
            if bias is not None:
                layer.last.bias.copy_(bias)
        return layer.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense kernel (C_out, C_in, 1, 1)."""
        return (self.last.weight[:, :, 0, 0] @ self.first.weight[:, :, 0, 0])[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))


class LowRankLinear(nn.Module):
    """A linear layer factorised by SVD into two linears of inner width ``rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.rank = int(rank)
        self.first = nn.Linear(in_features, rank, bias=False)
        self.last = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                     linear: nn.Linear) -> "LowRankLinear":
        """Build from ``linear.weight ~= u @ v``: u (out, r), v (r, in)."""
        layer = cls(linear.in_features, linear.out_features, u.shape[1], bias=bias is not None)
        with torch.no_grad():
            layer.first.weight.copy_(v)
            layer.last.weight.copy_(u)
            if bias is not None:
                layer.last.bias.copy_(bias)
        return layer.to(device=linear.weight.device, dtype=linear.weight.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight (out, in)."""
        return self.last.weight @ self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.first(x))
