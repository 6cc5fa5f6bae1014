"""Removing channels: physically (:func:`prune_channels`) or by masks (:class:`ChannelMask`).

Both take ``keep``: group id -> the channel indices to keep (a 1-D integer
tensor or sequence, any order, no repeats, at least one index). Groups not in
``keep`` keep all their channels.

The mask of a group multiplies the *input* of each of its consumers, so a
removed channel contributes nothing downstream whatever the activations in
between do (a sigmoid of a zeroed channel is not zero); the masked model then
computes what the physically pruned one computes, in train mode too (a kept
channel's BatchNorm batch statistics are the same in both).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from .._core.errors import CstarError
from ._find import find_groups
from ._group import ChannelGroup

Keep = Mapping[int, "torch.Tensor | Sequence[int]"]


def _expanded(index: torch.Tensor, expand: int) -> torch.Tensor:
    """Feature indices of channels ``index`` when each channel is ``expand`` consecutive features."""
    if expand == 1:
        return index
    return (index[:, None] * expand + torch.arange(expand)).flatten()


def check_keep(groups: Sequence[ChannelGroup], keep: Keep) -> dict[int, torch.Tensor]:
    """``keep`` as group id -> sorted int64 CPU tensor, after checking every id and index."""
    if not isinstance(keep, Mapping):
        raise CstarError(f"keep must be a dict group id -> channel indices, got {type(keep).__name__}")
    by_id = {g.id: g for g in groups}
    out = {}
    for gid, index in keep.items():
        group = by_id.get(gid)
        if group is None:
            raise CstarError(f"keep names group {gid!r}, which does not exist: ids are 0..{len(groups) - 1}")
        if not group.prunable:
            raise CstarError(f"group {gid} ({', '.join(group.producers) or 'no producer'}) is not prunable: "
                             f"{group.reason}; leave it out of keep")
        tensor = torch.as_tensor(index).flatten()
        if tensor.is_floating_point() or tensor.dtype == torch.bool:
            raise CstarError(f"keep[{gid}] must hold integer channel indices, got dtype {tensor.dtype}")
        tensor = tensor.to(torch.int64).cpu()
        if (tensor.numel() == 0 or tensor.unique().numel() != tensor.numel() or int(tensor.min()) < 0
                or int(tensor.max()) >= group.channels):
            raise CstarError(f"keep[{gid}] must be 1 to {group.channels} distinct indices in [0, {group.channels}), "
                             f"got {tensor.numel()} indices")
        out[gid] = tensor.sort().values
    return out


def _slices(groups: Sequence[ChannelGroup], keep: dict[int, torch.Tensor]
            ) -> dict[str, dict[str, torch.Tensor]]:
    """Module name -> {"out": rows to keep, "in": input columns to keep} (each present only if sliced)."""
    plan: dict[str, dict[str, torch.Tensor]] = {}
    for group in groups:
        if group.id not in keep:
            continue
        index = keep[group.id]
        for name in group.producers:
            plan.setdefault(name, {})["out"] = index
        for name in group.norms:
            plan.setdefault(name, {})["out"] = _expanded(index, group.expand.get(name, 1))
        for name in group.consumers:
            plan.setdefault(name, {})["in"] = _expanded(index, group.expand.get(name, 1))
    return plan


def _copy_parameter(new: nn.Parameter, value: torch.Tensor, old: nn.Parameter) -> None:
    new.data = value.detach().clone()
    new.requires_grad_(old.requires_grad)


def _sliced(module: nn.Module, out: torch.Tensor | None, inp: torch.Tensor | None) -> nn.Module:
    """A new plain Conv2d / Linear / BatchNorm with rows ``out`` and input columns ``inp`` of ``module``."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        tensors = [t for t in (module.weight, module.running_mean) if t is not None]
        device, dtype = (tensors[0].device, tensors[0].dtype) if tensors else (None, None)
        index = out.to(device or "cpu")
        new = type(module)(len(index), eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats, device=device, dtype=dtype)
        if module.affine:
            _copy_parameter(new.weight, module.weight[index], module.weight)
            _copy_parameter(new.bias, module.bias[index], module.bias)
        if module.track_running_stats:
            new.running_mean = module.running_mean[index].clone()
            new.running_var = module.running_var[index].clone()
            new.num_batches_tracked = module.num_batches_tracked.clone()
        return new.train(module.training)
    weight = module.weight
    rows = torch.arange(weight.shape[0]) if out is None else out
    cols = torch.arange(weight.shape[1]) if inp is None else inp
    value = weight[rows.to(weight.device)][:, cols.to(weight.device)]
    bias = None if module.bias is None else module.bias[rows.to(weight.device)]
    if isinstance(module, nn.Conv2d):
        new = nn.Conv2d(len(cols), len(rows), module.kernel_size, stride=module.stride, padding=module.padding,
                        dilation=module.dilation, groups=1, bias=bias is not None, padding_mode=module.padding_mode,
                        device=weight.device, dtype=weight.dtype)
    else:
        new = nn.Linear(len(cols), len(rows), bias=bias is not None, device=weight.device, dtype=weight.dtype)
    _copy_parameter(new.weight, value, weight)
    if bias is not None:
        _copy_parameter(new.bias, bias, module.bias)
    return new.train(module.training)


def prune_channels(model: nn.Module, keep: Keep, groups: Sequence[ChannelGroup] | None = None, *,
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A copy of ``model`` keeping only the channels ``keep`` (group id -> indices) of each listed group.

    Every producer, BatchNorm and consumer of a listed group is replaced in the
    copy by a plain ``nn.Conv2d`` / ``nn.Linear`` / ``nn.BatchNorm{1,2}d`` of the
    reduced size holding the kept slices of its weight, bias and running
    statistics (in the indices' ascending order); everything else, including the
    model's class and forward, is unchanged. ``groups`` defaults to
    ``find_groups(model, input_shape)``. ``model`` itself is not modified.
    """
    groups = find_groups(model, input_shape) if groups is None else groups
    keep = check_keep(groups, keep)
    pruned = copy.deepcopy(model)
    for name, cut in _slices(groups, keep).items():
        module = pruned.get_submodule(name)
        pruned.set_submodule(name, _sliced(module, cut.get("out"), cut.get("in")))
    return pruned


def keep_masks(groups: Sequence[ChannelGroup], keep: Keep) -> dict[int, torch.Tensor]:
    """Group id -> float 0/1 mask of shape (channels,) with ones at the kept indices (listed groups only)."""
    keep = check_keep(groups, keep)
    by_id = {g.id: g for g in groups}
    masks = {}
    for gid, index in keep.items():
        mask = torch.zeros(by_id[gid].channels)
        mask[index] = 1.0
        masks[gid] = mask
    return masks


class ChannelMask:
    """Forward pre-hooks on ``model`` multiplying each group's consumer inputs by the group's channel mask.

    ``masks`` maps group id -> a (channels,) tensor (0/1 for pruning; any
    differentiable function of scores for learning them, see
    :class:`cstar.prune.ScoredModel`); ``masks`` may be replaced or updated at
    any time, a group without a mask is left alone. Only prunable groups can be
    masked. Use as a context manager or call :meth:`remove`.
    """

    def __init__(self, model: nn.Module, groups: Sequence[ChannelGroup],
                 masks: Mapping[int, torch.Tensor] | None = None) -> None:
        self.masks: dict[int, torch.Tensor] = dict(masks or {})
        blocked = [g.id for g in groups if g.id in self.masks and not g.prunable]
        if blocked:
            raise CstarError(f"groups {blocked} are not prunable and cannot be masked: leave them out of masks")
        self._handles = []
        for group in groups:
            if not group.prunable:
                continue
            for name in group.consumers:
                hook = self._hook(group.id, group.expand.get(name, 1))
                self._handles.append(model.get_submodule(name).register_forward_pre_hook(hook))

    def _hook(self, gid: int, expand: int) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> tuple | None:
            mask = self.masks.get(gid)
            if mask is None:
                return None
            x = args[0]
            if expand != 1:
                mask = mask.repeat_interleave(expand)
            mask = mask.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
            return (x * mask, *args[1:])

        return pre_hook

    def remove(self) -> None:
        """Remove the hooks (the model computes as before)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "ChannelMask":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
