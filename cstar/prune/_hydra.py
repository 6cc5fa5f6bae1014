"""Learned channel scores under the adversarial loss: structured HYDRA (Sehwag et al., NeurIPS 2020).

Every prunable group gets a real-valued score per channel, initialised from
the magnitude scores (normalised per group to mean 1, times ``init_scale``).
:class:`ScoredModel` runs the model with each group's consumers' inputs
multiplied by the hard top-k mask of its scores (k: the channels the
magnitude budget gives the group, so the parameter count is that of magnitude
pruning at the same ratio); the backward pass hands the mask's gradient
straight through to the scores. The model's weights are frozen
(``requires_grad=False``), so :func:`cstar.fit` trains the scores only, on
its adversarial loss. BatchNorm running statistics do update (fit trains in
train mode), which recalibrates them to the masked network. The final top-k
channels are then removed physically.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .._core.errors import CstarError, check_options
from ..evaluation.counting import count_params
from ..training.fit import TrainConfig, fit
from ._budget import ChannelPlan, normalise_scores
from ._group import ChannelGroup
from ._magnitude import channel_scores, magnitude_plan, magnitude_prune
from ._surgery import ChannelMask, prune_channels

METHODS = ("magnitude", "hydra")


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest scores (ties: lower index first), unsorted."""
    return torch.sort(scores.detach(), descending=True, stable=True).indices[:k]


class ScoredModel(nn.Module):
    """``model`` with its weights frozen and each prunable group masked by the top-``counts[g]`` of ``scores``.

    ``scores`` (an ``nn.ParameterDict``, key ``str(group id)``, shape
    (channels,)) are this module's only trainable parameters; ``forward(x)``
    is ``model(x)`` under the straight-through top-k masks. ``model`` is used
    in place (pass a copy to keep the original).
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup], counts: Mapping[int, int],
                 init: Mapping[int, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.groups = list(groups)
        self.counts = {int(g): int(k) for g, k in counts.items()}
        self.trainable = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
        device = next(model.parameters()).device
        self.scores = nn.ParameterDict({str(g): nn.Parameter(torch.as_tensor(init[g]).detach().float().to(device))
                                        for g in self.counts})
        self.initial_keep = self.keep(self.counts)  # the channels the initial scores keep
        self._mask = ChannelMask(model, self.groups)
        self.cstar_config = getattr(model, "cstar_config", None)

    def kept_counts(self) -> dict[int, int]:
        """Group id -> how many channels the masks keep now (``counts``)."""
        return self.counts

    def masks(self) -> dict[int, torch.Tensor]:
        """Group id -> hard 0/1 top-k mask in the forward pass, identity gradient to the scores in the backward."""
        out, counts = {}, self.kept_counts()
        for key, score in self.scores.items():
            hard = torch.zeros_like(score).index_fill_(0, _top(score, counts[int(key)]), 1.0)
            out[int(key)] = hard + (score - score.detach())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._mask.masks = self.masks()
        return self.model(x)

    def keep(self, counts: Mapping[int, int] | None = None) -> dict[int, torch.Tensor]:
        """Group id -> sorted indices of the top-``counts[g]`` channels by the current scores (default: the
        current top-k, :meth:`kept_counts`)."""
        counts = self.kept_counts() if counts is None else counts
        return {int(key): _top(score, counts[int(key)]).sort().values.cpu() for key, score in self.scores.items()}

    def moved(self) -> int:
        """How many kept channels the training of the scores swapped in (0: the initial selection stands)."""
        return sum(len(set(k.tolist()) - set(self.initial_keep[g].tolist())) for g, k in self.keep().items())

    def pruned(self, keep: Mapping[int, torch.Tensor] | None = None) -> nn.Module:
        """A physically pruned copy of ``model`` keeping ``keep`` (default :meth:`keep`), its weights trainable as
        before."""
        self._mask.remove()
        try:
            result = prune_channels(self.model, self.keep() if keep is None else keep, self.groups)
        finally:
            self._mask = ChannelMask(self.model, self.groups)
        for name, p in result.named_parameters():
            p.requires_grad_(self.trainable.get(name, True))
        return result


def learn_channel_scores(model: nn.Module, train_loader, ratio: float, config: TrainConfig | None = None, *,
                         input_shape: tuple[int, ...] | None = None, norm: int = 2, fold_bn: bool = False,
                         min_channels: int = 1, init_scale: float = 1.0,
                         val: tuple[torch.Tensor, torch.Tensor] | None = None, out_dir: str | Path | None = None,
                         resume: bool = False, graph: str = "fx", teacher: nn.Module | None = None) -> ScoredModel:
    """Train channel scores of a copy of ``model`` on ``config``'s adversarial loss; return the :class:`ScoredModel`.

    The budget (channels kept per group) is that of
    :func:`cstar.prune.magnitude_prune` at ``ratio`` (with ``norm``,
    ``fold_bn``, ``min_channels``); scores start at the per-group
    mean-normalised magnitude scores times ``init_scale``. ``config``
    (default ``TrainConfig()``: PGD-10 at the data's eps, 10 epochs, SGD lr 0.1
    cosine) drives :func:`cstar.fit` with ``val`` and ``out_dir`` (its
    metrics and checkpoints; ``resume=True`` continues from its checkpoint;
    ``teacher`` for ``config.distill``). ``model`` is not modified.
    """
    config, groups, plan, init = start_scores(model, ratio, config, input_shape=input_shape, norm=norm,
                                              fold_bn=fold_bn, min_channels=min_channels, init_scale=init_scale,
                                              graph=graph)
    scored = ScoredModel(copy.deepcopy(model), groups, plan.counts, init)
    fit(scored, train_loader, config, val=val, out_dir=out_dir, resume=resume, teacher=teacher)
    return scored


def start_scores(model: nn.Module, ratio: float, config: TrainConfig | None, *, input_shape: tuple[int, ...] | None,
                 norm: int, fold_bn: bool, min_channels: int, init_scale: float, graph: str, budget: str = "params"
                 ) -> tuple[TrainConfig, list[ChannelGroup], ChannelPlan, dict[int, torch.Tensor]]:
    """(config, groups, magnitude plan at ``ratio`` of the ``budget`` measure, initial scores) of learned channel
    scores, after checking ``config`` (None: ``TrainConfig()``) and ``init_scale`` (see
    :func:`learn_channel_scores`)."""
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise CstarError(f"config must be a cstar.TrainConfig, got {type(config).__name__}")
    if isinstance(init_scale, bool) or not isinstance(init_scale, (int, float)) or not init_scale > 0:
        raise CstarError(f"init_scale must be a positive number, got {init_scale!r}")
    groups, plan = magnitude_plan(model, ratio, input_shape, norm, fold_bn=fold_bn, min_channels=min_channels,
                                  graph=graph, budget=budget)
    magnitude = channel_scores(model, groups, norm=norm, fold_bn=fold_bn)
    init = {g: normalise_scores(s).float() * float(init_scale) for g, s in magnitude.items()}
    return config, groups, plan, init


def hydra_prune(model: nn.Module, train_loader, ratio: float, config: TrainConfig | None = None,
                **options) -> nn.Module:
    """A copy of ``model`` pruned to the channels of learned scores (:func:`learn_channel_scores`, same options)."""
    scored = learn_channel_scores(model, train_loader, ratio, config, **options)
    pruned = scored.pruned()
    record_pruning(pruned, "hydra", ratio, model, channels_moved_by_scores=scored.moved(),
                   channels_kept=sum(scored.counts.values()))
    return pruned


def record_pruning(pruned: nn.Module, method: str, ratio: float, dense: nn.Module, **extra) -> None:
    """Set ``pruned.cstar_pruning``: the method, target and achieved parameter ratio, parameters, and ``extra``."""
    params, dense_params = count_params(pruned), count_params(dense)
    pruned.cstar_pruning = {"method": method, "target_ratio": float(ratio), "ratio": dense_params / params,
                            "params": params, "dense_params": dense_params, **extra}


def robust_prune(model: nn.Module, train_loader, ratio: float, method: str = "magnitude",
                 score_config: TrainConfig | None = None, **options) -> nn.Module:
    """A channel-pruned copy of ``model`` with ``ratio`` times fewer parameters, ready for adversarial fine-tuning.

    ``method="magnitude"``: :func:`cstar.prune.magnitude_prune` (``train_loader``
    is not used and may be None); ``"hydra"``: :func:`hydra_prune`, scores
    trained with ``score_config``. ``options``: ``input_shape``, ``norm``,
    ``fold_bn``, ``min_channels``, ``graph``, and for hydra ``init_scale``,
    ``val``, ``out_dir``, ``resume``, ``teacher``. Fine-tune the result with ``cstar.fit``.
    """
    if method not in METHODS:
        raise CstarError(f"unknown pruning method {method!r}: choose one of {', '.join(METHODS)}")
    common = ("input_shape", "norm", "fold_bn", "min_channels", "graph")
    if method == "magnitude":
        if score_config is not None:
            raise CstarError("score_config is only used by method='hydra': drop it or pass method='hydra'")
        check_options(options, common, "magnitude pruning")
        return magnitude_prune(model, ratio, **options)
    check_options(options, (*common, "init_scale", "val", "out_dir", "resume", "teacher"), "hydra pruning")
    if train_loader is None:
        raise CstarError("method='hydra' trains scores on adversarial examples: pass a train_loader")
    if score_config is not None and not isinstance(score_config, TrainConfig):
        raise CstarError(f"score_config must be a cstar.TrainConfig, got {type(score_config).__name__}")
    return hydra_prune(model, train_loader, ratio, score_config, **options)
