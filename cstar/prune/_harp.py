"""Learned keep rates and channel scores under the adversarial loss: structured HARP (Zhao and Wressnegger, ICLR 2023).

HYDRA (``_hydra.py``) learns which channels to keep at the per-group counts
of magnitude pruning; HARP learns how many as well. :class:`RatedModel` is a
:class:`ScoredModel` whose group g keeps ``k_g = round(rate_g * n_g)`` of its
``n_g`` channels (at least ``min_channels``), the rate a sigmoid of a
learnable logit that starts at HYDRA's allocation (``k_g / n_g`` of the
magnitude plan). The mask of a channel of rank r (0 = highest score) is the
hard top-k in the forward pass; its backward pass hands the gradient straight
through to the scores, as HYDRA's, and to the rate through
``sigmoid(rate_g * n_g - r - 0.5)`` (a step at the k-th channel smoothed over
about one channel), so the adversarial loss says whether one more or one
fewer channel in each group pays. :class:`SizePenalty` adds
``rate_weight * (size / budget - 1) ** 2`` to the loss, ``size`` the model's
parameters (or MACs) at the real-valued counts ``rate_g * n_g`` and
``budget`` the dense size / ratio, which pulls the total to the target while
the loss moves channels between layers. The weights stay frozen.

After training, :func:`cstar.prune._budget.fit_counts` rounds the learned
counts to whole ones that meet the budget exactly (at most the budget, with
no room for one more channel), the top-scored channels of each group at
those counts are kept and the rest removed physically.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .._core.checks import flag, number
from ..training.fit import TrainConfig, TrainHook, fit
from ._budget import CostModel, check_budget, fit_counts
from ._group import ChannelGroup, default_input_shape
from ._hydra import ScoredModel, record_pruning, start_scores

check_rate_weight = number(at_least=0, fix="the weight of the size regulariser, e.g. 10 (0: off)")


class RatedModel(ScoredModel):
    """A :class:`ScoredModel` whose channels kept per group follow learnable keep rates (see the module docstring).

    ``counts`` (group id -> channels) set the starting rates; ``rate_logits``
    (an ``nn.ParameterDict``, key ``str(group id)``, a scalar each, starting
    at 0) shift the starting logits (an optimiser's weight decay pulls them
    back to the start); with ``learn_rates=False`` they are frozen and the
    model keeps ``counts`` as a :class:`ScoredModel` does.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], counts: Mapping[int, int],
                 init: Mapping[int, torch.Tensor], *, min_channels: int = 1, learn_rates: bool = True) -> None:
        super().__init__(model, groups, counts, init)
        self.width = {int(key): len(score) for key, score in self.scores.items()}
        self.min_channels = {g: min(int(min_channels), n) for g, n in self.width.items()}
        # the starting rate k / n, kept a quarter channel inside (0, 1) so that its logit is finite and rounds to k
        start = {g: min(max(k / self.width[g], 0.25 / self.width[g]), 1 - 0.25 / self.width[g])
                 for g, k in self.counts.items()}
        self.start_logits = {g: math.log(r / (1 - r)) for g, r in start.items()}
        device = next(iter(self.scores.values())).device
        self.rate_logits = nn.ParameterDict({str(g): nn.Parameter(torch.zeros((), device=device),
                                                                  requires_grad=learn_rates)
                                             for g in self.counts})

    def rates(self) -> dict[int, torch.Tensor]:
        """Group id -> the keep rate in (0, 1), a differentiable scalar tensor."""
        return {g: torch.sigmoid(self.start_logits[g] + self.rate_logits[str(g)]) for g in self.counts}

    def wanted(self) -> dict[int, torch.Tensor]:
        """Group id -> the real-valued count ``rate * channels`` (differentiable)."""
        return {g: rate * self.width[g] for g, rate in self.rates().items()}

    def _counts_now(self) -> dict[int, torch.Tensor]:
        """Group id -> ``round(rate * channels)`` within [min_channels, channels], a tensor (no host sync)."""
        return {g: torch.floor(c.detach() + 0.5).clamp(self.min_channels[g], self.width[g])
                for g, c in self.wanted().items()}

    def kept_counts(self) -> dict[int, int]:
        """Group id -> how many channels the masks keep now."""
        return {g: int(k) for g, k in self._counts_now().items()}

    def masks(self) -> dict[int, torch.Tensor]:
        """Group id -> hard top-k mask forward; backward, straight through to the scores and smoothed to the rate."""
        out, counts, wanted = {}, self._counts_now(), self.wanted()
        for key, score in self.scores.items():
            g = int(key)
            order = torch.sort(score.detach(), descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
            mask = (rank < counts[g]).to(score.dtype) + (score - score.detach())
            if self.rate_logits[key].requires_grad:
                soft = torch.sigmoid(wanted[g] - rank.to(score.dtype) - 0.5)
                mask = mask + (soft - soft.detach())
            out[g] = mask
        return out


class SizePenalty(TrainHook):
    """``weight * (cost.size(model.wanted()) / limit - 1) ** 2``: a :func:`cstar.fit` hook on a :class:`RatedModel`.

    ``cost``: a :class:`cstar.prune._budget.CostModel` of the dense model;
    ``limit``: the size allowed (dense size / ratio). Each epoch's record gets
    ``ratio_at_rates``, the dense size over the size at the current rates.
    """

    def __init__(self, cost: CostModel, limit: float, weight: float) -> None:
        self.cost, self.limit, self.weight = cost, float(limit), float(weight)

    def value(self, model: RatedModel) -> torch.Tensor:
        """The penalty at ``model``'s current rates (differentiable in them)."""
        return self.weight * (self.cost.size(model.wanted()) / self.limit - 1) ** 2

    def penalty(self, model: nn.Module) -> torch.Tensor:
        return self.value(model)

    def after_epoch(self, model: nn.Module, record: dict) -> None:
        with torch.no_grad():
            record["ratio_at_rates"] = self.cost.dense / float(self.cost.size(model.wanted()))


def harp_prune(model: nn.Module, train_loader, ratio: float, config: TrainConfig | None = None, *,
               budget: str = "params", learn_rates: bool = True, rate_weight: float = 10.0,
               input_shape: tuple[int, ...] | None = None, norm: int = 2, fold_bn: bool = False,
               min_channels: int = 1, init_scale: float = 1.0, val: tuple[torch.Tensor, torch.Tensor] | None = None,
               out_dir: str | Path | None = None, resume: bool = False, graph: str = "fx",
               teacher: nn.Module | None = None) -> nn.Module:
    """A copy of ``model`` pruned by learned keep rates and channel scores, ``ratio`` times smaller in ``budget``.

    ``budget``: "params" (parameters) or "macs" (conv and linear MACs for one
    image of ``input_shape``, default from the model's ``cstar_config``): the
    result has at most dense / ``ratio`` of it, with no room for one more
    channel (within 2% of the budget on the built-in models). Rates start at
    the magnitude plan of that budget and scores as in
    :func:`cstar.prune.learn_channel_scores` (same ``norm``, ``fold_bn``,
    ``min_channels``, ``init_scale``, ``graph``); both train with
    :func:`cstar.fit` on ``config``'s adversarial loss (default
    ``TrainConfig()``) plus the size penalty weighted by ``rate_weight``
    (default 10), with ``val``, ``out_dir``, ``resume`` and ``teacher`` as
    there. ``learn_rates=False`` keeps the starting rates (HYDRA's
    allocation). Fine-tune the result with ``cstar.fit``; it carries
    ``cstar_pruning`` (method "harp", target and achieved ratios, the learned
    and the kept rate of each group, named by its first producer).
    """
    budget = check_budget("budget", budget)
    learn_rates = flag()("learn_rates", learn_rates)
    rate_weight = check_rate_weight("rate_weight", rate_weight)
    config, groups, plan, init = start_scores(model, ratio, config, input_shape=input_shape, norm=norm,
                                              fold_bn=fold_bn, min_channels=min_channels, init_scale=init_scale,
                                              graph=graph, budget=budget)
    shape = default_input_shape(model, input_shape) if budget == "macs" else None
    cost = CostModel(model, groups, shape)
    limit = cost.dense / plan.target
    rated = RatedModel(copy.deepcopy(model), groups, plan.counts, init, min_channels=min_channels,
                       learn_rates=learn_rates)
    hooks = [SizePenalty(cost, limit, rate_weight)] if learn_rates and rate_weight > 0 else []
    fit(rated, train_loader, config, val=val, out_dir=out_dir, resume=resume, teacher=teacher, hooks=hooks)
    with torch.no_grad():
        wanted = {g: float(c) for g, c in rated.wanted().items()}
    counts = fit_counts(cost, wanted, limit, min_channels)
    pruned = rated.pruned(rated.keep(counts))
    names = {g.id: g.producers[0] if g.producers else f"group {g.id}" for g in cost.groups}
    extra = {"budget": budget, "channels_kept": sum(counts.values()),
             "learned_rates": {names[g]: round(c / rated.width[g], 4) for g, c in wanted.items()},
             "kept_rates": {names[g]: round(k / rated.width[g], 4) for g, k in counts.items()}}
    if budget == "macs":
        macs = cost.size(counts)
        extra.update(macs=macs, dense_macs=cost.dense, macs_ratio=cost.dense / macs)
    record_pruning(pruned, "harp", ratio, model, **extra)
    return pruned
