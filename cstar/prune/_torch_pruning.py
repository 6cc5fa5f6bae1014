"""Channel groups from Torch-Pruning's dependency graph (optional: ``pip install "cstar[pruning]"``).

Each Torch-Pruning group rooted at a conv or linear layer's output channels
becomes a :class:`ChannelGroup`: the layers whose output channels it prunes
are producers (convs/linears) or norms (BatchNorms), those whose input
channels it prunes are consumers, with ``expand`` = the consumer's indices per
channel (a flatten). A group is not prunable when it prunes the layer that
returns the model output, or touches anything other than plain
Conv2d (groups=1) / Linear / BatchNorm layers and Torch-Pruning's elementwise
and reshape nodes (a concatenation, a split, a grouped conv...). ``bn_after``
is left empty (``fold_bn`` needs ``graph="fx"``).
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from .._core.errors import CstarError
from ..evaluation.counting import _dummy_input, eval_mode
from ._group import ChannelGroup

_LAYERS = (nn.Conv2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASSIVE_OPS = ("_ElementWiseOp", "_ReshapeOp")


def _import() -> object:
    try:
        return importlib.import_module("torch_pruning")
    except ImportError:
        raise CstarError('graph="torch_pruning" needs the torch-pruning package: pip install "cstar[pruning]" '
                         "(or use the built-in graph=\"fx\")") from None


def _output_layers(model: nn.Module, x: torch.Tensor) -> set[nn.Module]:
    """The modules whose returned tensor is the model's output (or one of its tuple items)."""
    seen: list[tuple[nn.Module, object]] = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append((m, o))) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    outputs = [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]
    return {m for m, o in seen if m is not model and any(o is t for t in outputs)}


def find_groups_tp(model: nn.Module, input_shape: tuple[int, ...]) -> list[ChannelGroup]:
    """:func:`cstar.prune.find_groups` through Torch-Pruning (see the module docstring)."""
    tp = _import()
    names = {m: n for n, m in model.named_modules()}
    x = _dummy_input(model, input_shape)
    try:
        with eval_mode(model):
            final = _output_layers(model, x)
            if not final:
                raise CstarError(f"graph='torch_pruning' cannot tell which layer of {type(model).__name__} returns "
                                 "the model output (the output is computed outside a module): use graph='fx'")
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=x, verbose=False)
            raw = list(graph.get_all_groups(ignored_layers=[]))
    except CstarError:
        raise
    except Exception as exc:
        raise CstarError(f"Torch-Pruning could not build the dependency graph of {type(model).__name__} "
                         f"({str(exc).strip()[:200]}): use graph='fx'") from None
    groups = []
    for gid, group in enumerate(raw):
        producers, norms, consumers, expand, problems = [], [], [], {}, []
        channels = None
        for dep, idxs in group:
            module, fn = dep.target.module, dep.handler
            name = names.get(module)
            kind = type(module)
            if kind in _LAYERS and not (kind is nn.Conv2d and module.groups != 1):
                if graph.is_out_channel_pruning_fn(fn):
                    producers.append(name)
                    channels = channels or len(idxs)
                    if module in final:
                        problems.append("it reaches the model output")
                else:
                    consumers.append((name, len(idxs)))
            elif kind in _NORMS:
                norms.append((name, len(idxs)))
            elif type(module).__name__ not in _PASSIVE_OPS:
                problems.append(f"it passes {type(module).__name__} {name or ''}".rstrip()
                                + ", which channel pruning does not follow")
        for name, n in consumers + norms:
            if n != channels:
                expand[name] = n // channels
        groups.append(ChannelGroup(
            id=gid, channels=channels, producers=tuple(dict.fromkeys(producers)),
            norms=tuple(dict.fromkeys(n for n, _ in norms)), consumers=tuple(dict.fromkeys(n for n, _ in consumers)),
            prunable=not problems, reason=problems[0] if problems else "", expand=expand,
        ))
    return groups
