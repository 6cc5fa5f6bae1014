"""A group of coupled channels (:class:`ChannelGroup`), what every channel analysis returns, and the
input shape it traces with."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .._core.errors import CstarError
from ..models import input_shape as models_input_shape


@dataclass
class ChannelGroup:
    """One group of coupled channels (see the module docstring).

    ``channels``: the group's size. ``producers``/``norms``/``consumers``:
    dotted module names (``model.get_submodule``), in forward order.
    ``expand[name]``: features per channel of a consumer or norm behind a
    flatten of (C, H, W) (H*W; absent means 1). ``bn_after[producer]``: the
    BatchNorm that reads that producer's output directly, if any.
    ``prunable`` is False when the group must keep all its channels, with the
    ``reason``.
    """

    id: int
    channels: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[str, ...]
    prunable: bool
    reason: str = ""
    expand: dict[str, int] = field(default_factory=dict)
    bn_after: dict[str, str] = field(default_factory=dict)


def default_input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """``input_shape`` as a tuple, else (in_channels, input_size, input_size) from ``cstar_config``."""
    if input_shape is not None:
        if not isinstance(input_shape, (tuple, list)):
            raise CstarError(f"input_shape must be a tuple (C, H, W), got {input_shape!r}")
        return tuple(input_shape)
    shape = models_input_shape(model)
    if shape is not None:
        return shape
    raise CstarError(f"{type(model).__name__} has no cstar_config to take its input shape from: pass "
                     "input_shape=(C, H, W)")
