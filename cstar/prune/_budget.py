"""How many and which channels to keep so that the pruned model meets a parameter (or MACs) ratio.

:func:`select_channels` ranks the channels of all prunable groups together.
Scores are first normalised per group by dividing by the group's mean score
(a channel of average importance in its group scores 1 whatever the layer's
width or weight scale; a group whose scores are all zero or not finite counts
every channel as 1). Starting from the ``min_channels`` best channels of every
group, it then walks all other channels in descending normalised score (ties:
lower group id, then lower channel index) and keeps each one whose cost still
fits the budget ``count_params(model) / ratio``. Costs are the exact parameter
counts of the pruned layers: a conv costs ``out * in * kh * kw (+ out bias)``
with ``out`` and ``in`` the kept channels of its two groups, so adding a
channel to one group costs more the more channels its neighbours keep. The
walk is the global threshold descent, continued past the first channel that
does not fit so that cheaper channels fill what is left of the budget (the
result lands within a fraction of a percent of the budget on the built-in
models). Deterministic. With ``budget="macs"`` the same walk holds the model's
conv and linear MACs for one image (as :func:`cstar.count_macs` counts them)
to ``dense MACs / ratio`` instead.

:func:`fit_counts` turns real-valued channel counts per group (HARP's learned
keep rates) into whole ones under a budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._core.checks import check_positive_int, check_ratio, one_of
from .._core.errors import CstarError
from ..evaluation.counting import count_params, layer_table
from ._group import ChannelGroup, default_input_shape

BUDGETS = ("params", "macs")
check_budget = one_of(BUDGETS)


@dataclass
class ChannelPlan:
    """The channels to keep: ``keep`` (group id -> sorted int64 indices) for every prunable group.

    ``params`` is the exact parameter count of the pruned model,
    ``dense_params`` that of the input model, ``target`` the requested ratio
    of the ``budget`` measure ("params", or "macs": then ``macs`` and
    ``dense_macs`` are the MACs per image of the two).
    """

    keep: dict[int, torch.Tensor]
    params: int
    dense_params: int
    target: float
    counts: dict[int, int] = field(default_factory=dict)
    budget: str = "params"
    macs: int | None = None
    dense_macs: int | None = None

    @property
    def ratio(self) -> float:
        """Dense parameters / pruned parameters (whole model)."""
        return self.dense_params / self.params


@dataclass
class _Sliced:
    """A layer or BatchNorm whose size depends on kept channels: its parameters (or MACs) as a function of them."""

    out_group: int | None
    in_group: int | None
    out_full: int
    in_full: int
    area: int  # weight elements (or MACs) per (out, in) pair; 0 for a BatchNorm
    per_out: int  # parameters per output channel besides the weight: 1 for a bias, 2 for BN affine
    out_expand: int = 1
    in_expand: int = 1

    def size(self, counts: Mapping[int, int]) -> int:
        out = self.out_full if self.out_group is None else counts[self.out_group] * self.out_expand
        inp = self.in_full if self.in_group is None else counts[self.in_group] * self.in_expand
        return out * inp * self.area + out * self.per_out


class CostModel:
    """Exact whole-model size of a pruned model as a function of kept channels per group.

    The size is the parameter count, or with ``macs_shape`` (C, H, W) the conv
    and linear MACs for one image of that shape. :meth:`size` also takes
    real-valued counts (tensors: the size is then differentiable in them).
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup],
                 macs_shape: tuple[int, ...] | None = None) -> None:
        self.groups = [g for g in groups if g.prunable]
        self.full = {g.id: g.channels for g in self.groups}
        macs = None if macs_shape is None else {row.name: row.macs for row in layer_table(model, macs_shape)}
        items: dict[str, _Sliced] = {}
        for group in self.groups:
            for name in group.producers + group.norms + group.consumers:
                if name not in items:
                    items[name] = _describe(model.get_submodule(name), None if macs is None else macs.get(name, 0))
            for name in group.producers:
                items[name].out_group = group.id
            for name in group.norms:
                items[name].out_group, items[name].out_expand = group.id, group.expand.get(name, 1)
            for name in group.consumers:
                items[name].in_group, items[name].in_expand = group.id, group.expand.get(name, 1)
        self.items = list(items.values())
        self.touch: dict[int, list[_Sliced]] = {g.id: [] for g in self.groups}
        for item in self.items:
            for gid in {item.out_group, item.in_group} - {None}:
                self.touch[gid].append(item)
        self.dense = count_params(model) if macs is None else sum(macs.values())
        self.fixed = self.dense - sum(item.size(self.full) for item in self.items)

    def size(self, counts: Mapping[int, "int | torch.Tensor"]) -> "int | torch.Tensor":
        """Size of the model pruned to ``counts[g]`` channels in each prunable group g."""
        return self.fixed + sum(item.size(counts) for item in self.items)

    def growth(self, counts: dict[int, int], gid: int) -> int:
        """Size added by keeping one more channel in group ``gid``."""
        before = sum(item.size(counts) for item in self.touch[gid])
        counts[gid] += 1
        after = sum(item.size(counts) for item in self.touch[gid])
        counts[gid] -= 1
        return after - before


def _describe(module: nn.Module, macs: int | None = None) -> _Sliced:
    """The module's size as a function of its kept rows and columns: parameters, or its ``macs`` (measured at
    full width) scaled by the rows and columns kept."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):  # no MACs; 2 parameters a channel when affine
        return _Sliced(None, None, module.num_features, 0, 0, 2 if macs is None and module.affine else 0)
    out, inp = module.weight.shape[:2]
    if macs is not None:  # a conv's MACs are out * in * k * k * H * W: the "area" of a pair is k * k * H * W
        return _Sliced(None, None, out, inp, macs // (out * inp), 0)
    bias = int(module.bias is not None)
    area = math.prod(module.kernel_size) if isinstance(module, nn.Conv2d) else 1
    return _Sliced(None, None, out, inp, area, bias)


def normalise_scores(scores: torch.Tensor) -> torch.Tensor:
    """``scores / scores.mean()`` in float64 (all ones when the mean is not a positive finite number)."""
    scores = scores.detach().double().cpu().flatten()
    mean = scores.mean()
    if not (torch.isfinite(scores).all() and mean > 0):
        return torch.ones_like(scores)
    return scores / mean


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices by descending score, ties by ascending index."""
    return torch.from_numpy(np.lexsort((np.arange(len(scores)), -scores.numpy())))


def select_channels(model: nn.Module, groups: Sequence[ChannelGroup], scores: Mapping[int, torch.Tensor],
                    ratio: float, *, min_channels: int = 1, budget: str = "params",
                    input_shape: tuple[int, ...] | None = None) -> ChannelPlan:
    """The channels to keep so that ``count_params`` of the pruned model is at most ``count_params(model) / ratio``.

    ``scores``: group id -> (channels,) importance of each channel (higher is
    kept first) for every prunable group. See the module docstring for the
    ranking. ``budget="macs"`` holds the MACs per image of shape
    ``input_shape`` (C, H, W; default from the model's ``cstar_config``) to
    the ratio instead. Raises :class:`CstarError` for ``ratio <= 1``, a model
    with nothing prunable, or a ratio that even ``min_channels`` per group misses.
    """
    ratio = check_ratio("ratio", ratio)
    min_channels = check_positive_int("min_channels", min_channels)
    budget = check_budget("budget", budget)
    macs_shape = default_input_shape(model, input_shape) if budget == "macs" else None
    cost = CostModel(model, groups, macs_shape)
    if not cost.groups:
        reasons = sorted({g.reason for g in groups if not g.prunable})
        raise CstarError(f"nothing to prune in {type(model).__name__}: no channel group is prunable "
                         f"({'; '.join(reasons)[:300] or 'no conv or linear layer'}); use a model with conv layers "
                         "whose channels do not reach the output directly")
    missing = [g.id for g in cost.groups if g.id not in scores or torch.as_tensor(scores[g.id]).numel() != g.channels]
    if missing:
        raise CstarError(f"scores must give one value per channel of every prunable group; groups {missing} "
                         "lack them: pass scores from channel_scores(model, groups)")
    limit = cost.dense / ratio
    normalised = {g.id: normalise_scores(torch.as_tensor(scores[g.id])) for g in cost.groups}
    order = {gid: _ranked(s) for gid, s in normalised.items()}
    counts = {g.id: min(min_channels, g.channels) for g in cost.groups}
    used = cost.size(counts)
    if used > limit:
        unit = "parameters" if budget == "params" else "MACs"
        raise CstarError(f"ratio {ratio:g}x is unreachable by channel pruning: with min_channels={min_channels} "
                         f"in every prunable group {type(model).__name__} keeps {used:,} {unit} "
                         f"({cost.dense / used:.2f}x at most); lower the ratio or min_channels")
    # the walk: remaining channels of all groups, by descending normalised score
    gids = np.concatenate([np.full(g.channels - counts[g.id], g.id) for g in cost.groups])
    ranks = np.concatenate([np.arange(counts[g.id], g.channels) for g in cost.groups])
    values = np.concatenate([normalised[g.id][order[g.id][counts[g.id]:]].numpy() for g in cost.groups])
    for k in np.lexsort((ranks, gids, -values)):
        gid = int(gids[k])
        if counts[gid] != ranks[k]:  # an earlier, better channel of this group did not fit: neither does this one
            continue
        extra = cost.growth(counts, gid)
        if used + extra <= limit:
            counts[gid] += 1
            used += extra
    keep = {gid: order[gid][:n].sort().values for gid, n in counts.items()}
    if budget == "params":
        return ChannelPlan(keep=keep, params=used, dense_params=cost.dense, target=ratio, counts=counts)
    by_params = CostModel(model, groups)
    return ChannelPlan(keep=keep, params=by_params.size(counts), dense_params=by_params.dense, target=ratio,
                       counts=counts, budget=budget, macs=used, dense_macs=cost.dense)


def fit_counts(cost: CostModel, wanted: Mapping[int, float], limit: float, min_channels: int = 1) -> dict[int, int]:
    """Whole channel counts per group near ``wanted`` (group id -> a real count) of ``cost.size`` at most ``limit``,
    with no room left for one more channel.

    The wanted counts are all scaled by the largest factor whose rounded
    counts (between ``min_channels`` and the group's width) fit (bisection;
    the size grows with the factor); then channels are added one at a time,
    each to the group furthest below its wanted count (lowest
    ``(count + 1) / wanted``, ties to the lower id) that one more channel
    still fits in, until none fits. ``min_channels`` per group must fit (as
    :func:`select_channels` checks).
    """
    floor = {g.id: min(min_channels, g.channels) for g in cost.groups}
    wanted = {g.id: max(float(wanted[g.id]), 1e-9) for g in cost.groups}

    def rounded(scale: float) -> dict[int, int]:
        return {g.id: min(g.channels, max(floor[g.id], math.floor(scale * wanted[g.id] + 0.5))) for g in cost.groups}

    low, high = 0.0, max(g.channels / wanted[g.id] for g in cost.groups) + 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if cost.size(rounded(middle)) <= limit else (low, middle)
    counts = rounded(low)
    used = cost.size(counts)
    while True:
        growable = sorted((g.id for g in cost.groups if counts[g.id] < g.channels),
                          key=lambda gid: ((counts[gid] + 1) / wanted[gid], gid))
        added = next((gid for gid in growable if used + cost.growth(counts, gid) <= limit), None)
        if added is None:
            return counts
        used += cost.growth(counts, added)
        counts[added] += 1
