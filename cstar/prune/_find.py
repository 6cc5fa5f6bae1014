"""Channel groups by either analysis: cstar's torch.fx walk (``_graph``) or Torch-Pruning's graph."""

from __future__ import annotations

from torch import nn

from .._core.errors import CstarError
from ._graph import fx_groups
from ._group import ChannelGroup, default_input_shape
from ._torch_pruning import find_groups_tp

GRAPHS = ("fx", "torch_pruning")


def find_groups(model: nn.Module, input_shape: tuple[int, ...] | None = None, graph: str = "fx"
                ) -> list[ChannelGroup]:
    """The channel groups of ``model`` (prunable or not), ids 0, 1, ... in forward order.

    ``input_shape`` (C, H, W) defaults to the model's ``cstar_config``.
    ``graph="fx"`` uses cstar's torch.fx analysis (``_graph``); ``"torch_pruning"``
    uses Torch-Pruning's dependency graph (optional extra ``cstar[pruning]``).
    The model is not changed. Raises :class:`CstarError` for a model that
    cannot be traced.
    """
    if not isinstance(model, nn.Module):
        raise CstarError(f"channel pruning needs an nn.Module, got {type(model).__name__}")
    if graph not in GRAPHS:
        raise CstarError(f"unknown graph {graph!r}: choose one of {', '.join(GRAPHS)}")
    shape = default_input_shape(model, input_shape)
    return find_groups_tp(model, shape) if graph == "torch_pruning" else fx_groups(model, shape)
