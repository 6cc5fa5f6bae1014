"""Replace the planned layers of a model by their factorised forms."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .._core.checks import check_finite
from .._core.errors import CstarError
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ._plan import LayerPlan, RankPlan
from ._ranks import _decline_reason, _survey
from ._spec import RankSpec
from ._tucker import _check_n_iter, svd_factors, tucker2


def _check_layer(name: str, module: nn.Module | None, layer: LayerPlan) -> None:
    """Raise CstarError unless ``module`` is the plain layer that ``layer`` was planned for."""
    fix = "the plan was made for another model: run select_ranks on this one"
    if module is None:
        raise CstarError(f"plan layer {name!r} is not a module of the model; {fix}")
    if not isinstance(module, (nn.Conv2d, nn.Linear)) or _decline_reason(module) is not None:
        raise CstarError(f"plan layer {name!r} is a {type(module).__name__}, not a plain Conv2d/Linear; {fix}")
    if layer.shape and tuple(module.weight.shape) != tuple(layer.shape):
        raise CstarError(f"plan layer {name!r} has weight shape {tuple(layer.shape)} but the model's is "
                         f"{tuple(module.weight.shape)}; {fix}")
    if layer.kind == "dense":
        return
    pointwise = isinstance(module, nn.Linear) or module.kernel_size == (1, 1)
    expected = "svd" if pointwise else "tucker2"
    if layer.kind != expected:
        raise CstarError(f"plan layer {name!r} has kind {layer.kind!r} but the model's layer needs {expected!r}; {fix}")
    sizes = (min(module.weight.shape[:2]),) if pointwise else tuple(module.weight.shape[:2])
    if len(layer.ranks) != len(sizes) or min(layer.ranks) < 1 or any(r > s for r, s in zip(layer.ranks, sizes)):
        raise CstarError(f"plan layer {name!r} has invalid {layer.kind} ranks {tuple(layer.ranks)} (mode sizes "
                         f"{sizes}); {fix}")


def check_plan(model: nn.Module, plan: RankPlan, spec: RankSpec) -> None:
    """Refuse in one line a plan chosen beforehand (e.g. learned ranks) that does not fit ``model`` and ``spec``.

    Its layers must be exactly ``model``'s compressible layers under
    ``spec.exclude``, each with the model's weight shape, a kind the layer
    takes and ranks within its mode sizes; its target ratio, budget and MACs
    target must be ``spec``'s. The ranks themselves are the plan's own.
    """
    if not isinstance(plan, RankPlan):
        raise CstarError(f"plan must be a RankPlan (select_ranks, RankPlan.load), got {type(plan).__name__}")
    asked = (spec.budget, spec.ratio, spec.macs_ratio)
    planned = (plan.budget, plan.target_ratio, plan.target_macs_ratio)
    if asked[0] != planned[0] or any((a is None) != (b is None) or (a is not None and not math.isclose(a, b))
                                     for a, b in zip(asked[1:], planned[1:])):
        def text(budget, ratio, macs_ratio):
            return f"{ratio:g}x on {budget}" + ("" if macs_ratio is None else f" and {macs_ratio:g}x on MACs")
        raise CstarError(f"the plan was made for {text(*planned)} but the settings ask {text(*asked)}: pass a plan "
                         "for this target, or set ratio, budget and macs_ratio to the plan's")
    if plan.budget == "latency" and plan.runtime != spec.runtime:
        raise CstarError(f"the plan was timed on {plan.runtime} but the settings ask {spec.runtime}: pass a plan "
                         "timed on that runtime, or set runtime to the plan's")
    modules = dict(model.named_modules())
    for name, layer in plan.layers.items():
        _check_layer(name, modules.get(name), layer)
    compressible = [name for name, _ in _survey(model, spec.exclude)[0]]
    missing = [n for n in compressible if n not in plan.layers]
    extra = [n for n in plan.layers if n not in compressible]
    if missing or extra:
        what = "; ".join(part for part in (missing and f"it lacks {', '.join(missing[:3])}",
                                          extra and f"{', '.join(extra[:3])} are excluded or skipped here") if part)
        raise CstarError(f"the plan's layers are not the model's compressible ones ({what}): make the plan for this "
                         "model with the same exclude")


def _factorise(module: nn.Conv2d | nn.Linear, kind: str, ranks: tuple[int, ...], n_iter: int) -> nn.Module:
    weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
    if kind == "tucker2":
        core, u_out, u_in = tucker2(weight, ranks, n_iter)
        return Tucker2Conv2d.from_factors(core, u_out, u_in, bias, module)
    if isinstance(module, nn.Linear):
        return LowRankLinear.from_factors(*svd_factors(weight, ranks[0]), bias, module)
    return LowRankConv1x1.from_factors(*svd_factors(weight[:, :, 0, 0], ranks[0]), bias, module)


def decompose(model: nn.Module, plan: RankPlan, n_iter: int = 0) -> nn.Module:
    """A copy of ``model`` with every planned layer factorised at its planned ranks.

    k x k convs become :class:`Tucker2Conv2d` (factors from :func:`tucker2` with
    ``n_iter`` HOOI sweeps), 1x1 convs :class:`LowRankConv1x1` and linears
    :class:`LowRankLinear` (factors from :func:`svd_factors`); layers planned
    ``"dense"`` are kept. ``model`` is not modified. The copy keeps the model's
    attributes (``cstar_config``) and gets ``cstar_lowrank``, a
    ``{name: {"kind": "tucker2" | "svd", "ranks": [...]}}`` map of all its
    factorised layers, from which the structure can be rebuilt. ``plan`` may also
    be a dict from :meth:`RankPlan.to_dict`.
    """
    check_finite(model, "decompose: the model")
    if isinstance(plan, dict):
        plan = RankPlan.from_dict(plan)
    if not isinstance(plan, RankPlan):
        raise CstarError(f"decompose needs a RankPlan from select_ranks, got {type(plan).__name__}")
    n_iter = _check_n_iter(n_iter)
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for name, layer in plan.layers.items():
        _check_layer(name, modules.get(name), layer)
    structure = dict(getattr(model, "cstar_lowrank", {}))
    with torch.no_grad():
        for name, layer in plan.layers.items():
            if layer.kind == "dense":
                continue
            old = modules[name]
            new = _factorise(old, layer.kind, tuple(layer.ranks), n_iter)
            new.train(old.training)
            if name:
                parent, _, child = name.rpartition(".")
                setattr(modules[parent], child, new)
            else:
                result = new
            ranks = new.ranks if layer.kind == "tucker2" else (new.rank,)
            structure[name] = {"kind": layer.kind, "ranks": list(ranks)}
    result.cstar_lowrank = structure
    return result
