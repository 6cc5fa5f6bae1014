"""Magnitude channel pruning (filter norms, as in Li et al. 2017, ranked globally across layers)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._core.errors import CstarError
from ._budget import ChannelPlan, select_channels
from ._find import find_groups
from ._group import ChannelGroup
from ._surgery import prune_channels


def _check_norm(norm: object) -> int:
    if norm not in (1, 2) or isinstance(norm, bool):
        raise CstarError(f"norm must be 1 (L1) or 2 (L2), got {norm!r}")
    return int(norm)


@torch.no_grad()
def channel_scores(model: nn.Module, groups: Sequence[ChannelGroup], norm: int = 2,
                   fold_bn: bool = False) -> dict[int, torch.Tensor]:
    """Group id -> (channels,) float32 CPU magnitude score of each channel, for every prunable group.

    A channel's score is the sum over the group's producers of the L1 or L2
    (``norm``) norm of the producer's filter for that channel (its row of the
    weight, bias excluded). With ``fold_bn=True`` each filter norm is first
    multiplied by ``|gamma| / sqrt(running_var + eps)`` of the BatchNorm that
    reads the producer directly (the norm of the BN-folded filter).
    """
    norm = _check_norm(norm)
    scores = {}
    for group in groups:
        if not group.prunable:
            continue
        total = torch.zeros(group.channels, dtype=torch.float64)
        for name in group.producers:
            weight = model.get_submodule(name).weight.detach()
            row_norm = weight.flatten(1).double().norm(p=norm, dim=1).cpu()
            bn_name = group.bn_after.get(name)
            if fold_bn and bn_name is not None:
                bn = model.get_submodule(bn_name)
                gamma = bn.weight.detach().double().cpu().abs() if bn.affine else torch.ones(group.channels)
                var = bn.running_var.double().cpu() if bn.running_var is not None else torch.ones(group.channels)
                row_norm = row_norm * gamma / torch.sqrt(var + bn.eps)
            total += row_norm
        scores[group.id] = total.float()
    return scores


def magnitude_plan(model: nn.Module, ratio: float, input_shape: tuple[int, ...] | None = None, norm: int = 2, *,
                   fold_bn: bool = False, min_channels: int = 1, groups: Sequence[ChannelGroup] | None = None,
                   graph: str = "fx", budget: str = "params") -> tuple[list[ChannelGroup], ChannelPlan]:
    """(groups, :class:`ChannelPlan`) of magnitude pruning, without pruning (see :func:`magnitude_prune`);
    ``budget="macs"`` holds the MACs to the ratio instead of the parameters (:func:`select_channels`)."""
    groups = find_groups(model, input_shape, graph=graph) if groups is None else list(groups)
    scores = channel_scores(model, groups, norm=norm, fold_bn=fold_bn)
    return groups, select_channels(model, groups, scores, ratio, min_channels=min_channels, budget=budget,
                                   input_shape=input_shape)


def magnitude_prune(model: nn.Module, ratio: float, input_shape: tuple[int, ...] | None = None, norm: int = 2, *,
                    fold_bn: bool = False, min_channels: int = 1, graph: str = "fx") -> nn.Module:
    """A copy of ``model`` with the lowest-magnitude channels removed, ``ratio`` times fewer parameters.

    Scores: :func:`channel_scores` (L1 or L2 filter norms summed over each
    group's producers); channels are ranked globally across layers after
    per-group mean normalisation, under the exact parameter budget
    (:func:`cstar.prune.select_channels`): ``count_params`` of the result is at
    most ``count_params(model) / ratio`` and typically within 1% of it.
    ``input_shape`` (C, H, W) defaults to the model's ``cstar_config``. The
    result carries ``cstar_pruning`` (method, target and achieved ratio).
    """
    groups, plan = magnitude_plan(model, ratio, input_shape, norm, fold_bn=fold_bn, min_channels=min_channels,
                                  graph=graph)
    pruned = prune_channels(model, plan.keep, groups)
    pruned.cstar_pruning = {"method": "magnitude", "norm": norm, "fold_bn": fold_bn, "target_ratio": plan.target,
                            "ratio": plan.ratio, "params": plan.params, "dense_params": plan.dense_params}
    return pruned
