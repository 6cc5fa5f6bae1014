"""Inference optimisations that keep the outputs (within float rounding).

- :func:`fold_batchnorm`: every BatchNorm2d fed only by a conv is folded into
  that conv's weight and bias and replaced by ``nn.Identity``. The conv -> BN
  pairs are found by tracing the model with ``torch.fx``, so it works for any
  traceable model (the built-in ResNets call ``self.bn1(self.conv1(x))``); a
  factorised layer in the conv's place is traced through, so BN folds into its
  ``last`` conv. The module tree keeps its names, so the result can still be
  saved with :func:`cstar.files.serialize.save`.
- :func:`optimize_for_inference`: BN folding, channels-last memory format and
  ``torch.compile``, each optional.
- :func:`folded_or_same`: BN folded where it can be, else the model itself
  (what evaluation and export use).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import fx, nn


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, BN name) for each BatchNorm2d whose only input is a Conv2d used nowhere else."""
    graph = fx.symbolic_trace(model).graph
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            isinstance(source, fx.Node) and source.op == "call_module"
            and isinstance(modules[source.target], nn.Conv2d)
            and len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1
            and modules[node.target].running_mean is not None
        ):
            pairs.append((source.target, node.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` into ``conv`` in place: w' = w * s, b' = (b - mean) * s + beta, s = gamma / std."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.affine:
        bias = bias + bn.bias
    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every conv -> BatchNorm2d pair folded into the conv.

    Module names are unchanged: each folded BN becomes ``nn.Identity`` and its
    conv gains a bias. A model that ``torch.fx`` cannot trace is returned as an
    unchanged eval copy, with a warning. Outputs equal the eval-mode original
    within float rounding (about 1e-5 relative in float32; on a GPU with TF32
    convolutions, the default on recent NVIDIA GPUs, about 1e-3: compare inside
    :func:`cstar.full_float32`).
    """
    folded = copy.deepcopy(model).eval()
    try:
        pairs = _conv_bn_pairs(folded)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        warnings.warn(f"fold_batchnorm: torch.fx cannot trace the model ({type(exc).__name__}: {exc}); "
                      "BatchNorm left unfolded", stacklevel=2)
        return folded
    for conv_name, bn_name in pairs:
        _fold(folded.get_submodule(conv_name), folded.get_submodule(bn_name))
        parent, _, key = bn_name.rpartition(".")
        folded.get_submodule(parent)._modules[key] = nn.Identity()
    return folded


def folded_or_same(model: nn.Module) -> nn.Module:
    """An eval copy of ``model`` with BatchNorm folded, or ``model`` itself when it has no BatchNorm or cannot be
    traced or copied (quietly: the caller gets the same outputs, only slower)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fold_batchnorm(model)
    except Exception:  # noqa: BLE001  (deepcopy and fx raise many types)
        return model


def optimize_for_inference(
    model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False, compile: bool = False
) -> nn.Module:
    """An eval-mode copy of ``model`` for inference; the original is untouched.

    ``fold_bn`` (default True): :func:`fold_batchnorm`. ``channels_last``
    (default False): 4-D weights in ``torch.channels_last`` layout; feed inputs
    as ``x.contiguous(memory_format=torch.channels_last)`` for the speed-up.
    ``compile`` (default False): wrap in ``torch.compile`` (compiles on the
    first call, which takes seconds to minutes; needs a C++ compiler on CPU).
    """
    out = fold_batchnorm(model) if fold_bn else copy.deepcopy(model).eval()
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if compile:
        out = torch.compile(out)
    return out
