"""Rank selection: the ranks of every compressible layer for a target compression ratio.

Compressible layers are plain ``nn.Conv2d`` with ``groups=1`` and a kernel larger
than 1x1 (Tucker-2, ranks ``(r_out, r_in)``) and plain 1x1 ``nn.Conv2d`` and
``nn.Linear`` (SVD, ranks ``(r,)``). Every other parameter is a fixed cost.

A layer's *energy* at given ranks is the share of its squared Frobenius norm
that the truncated factorisation keeps: for Tucker-2 exactly
``||core[:r_out, :r_in]||^2 / ||W||^2`` in the full HOSVD bases (a table over
all rank pairs, :func:`hosvd_energy`), for SVD the cumulative share of the
squared singular values. Shares are normalised per layer, so layers of any size
are comparable; a dense layer has energy 1.

``method="global"`` maximises the sum over layers of log(energy), i.e. the
product of the layers' retained shares (each layer's term multiplied by its
``layer_weights`` entry when given, e.g. by its sensitivity of the adversarial
loss), under the budget: every layer starts at
``min_rank`` and, with a heap, the rank (one mode, grown by ``multiple_of``)
whose log-energy gain per unit of added cost is largest is grown, as long as
the budget allows; the plan's cost then ends within one smallest step of the
budget. (The plain sum of energies would trade a big layer down to rank 1 for a
few dense small ones; the log makes a near-zero share prohibitively costly.) A
layer whose factorised cost would reach its dense cost on a budget measure is
kept dense (kind ``"dense"``). ``method="uniform"`` keeps the same rank
fraction in every mode of every layer, the largest that fits (bisection), as a
baseline.

Costs are exact: parameters as :func:`cstar.evaluation.counting.count_params` counts the
factorised model, MACs as :func:`cstar.evaluation.counting.count_macs` does (a Tucker-2
layer's first 1x1 conv runs at the input resolution, its core and last conv at
the output resolution; MAC multipliers come from one traced forward pass).

:func:`allocation` sets up the problem (layers, costs, budget) once; learned
ranks (``_learned.py``) run the same greedy on shares of learned scores in place
of the energy shares (``_Layer.objective``).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from torch import nn

from .._core.checks import check_finite
from .._core.errors import CstarError
from ..evaluation.counting import LayerStats, count_params, layer_table
from ..models import input_shape as input_shape_of
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ._plan import LayerPlan, RankPlan
from ._spec import RankSpec
from .._core.renamed import MACS, accepting_old_names
from ._tucker import core_energies, energy_table, singular_energies

_BISECTION_STEPS = 60
_ENERGY_FLOOR = 1e-12  # log(0) guard for a layer whose leading components carry no energy
_FAR = 1.25  # a plan of coarse rank steps this much smaller than its target is refused (_check_near_target)


@dataclass
class _Layer:
    """A compressible layer: shape, exact cost formulas and retained-energy table."""

    name: str
    kind: str  # "tucker2" or "svd"
    shape: tuple[int, ...]
    dims: tuple[int, ...]  # the mode sizes: (C_out, C_in), or (min(out, in),)
    blocks: torch.Tensor  # energies of the rank components, float64 on the CPU: (n,) singular, (C_out, C_in) core
    retained: np.ndarray  # retained energy share, indexed by ranks: shape (dims[0] + 1, ...)
    bias: int
    in_pos: int | None  # spatial positions the first factor runs at, summed over calls (None: no input shape)
    out_pos: int | None  # positions (rows, for a linear) of the output, summed over calls
    weight: float = 1.0  # how many times the layer's log-energy counts in the global objective
    objective: np.ndarray | None = None  # the share the greedy maximises, like retained (None: retained itself)
    dense_params: int = field(init=False)
    dense_macs: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.dense_params = math.prod(self.shape) + self.bias
        self.dense_macs = None if self.out_pos is None else self.out_pos * math.prod(self.shape)

    def params(self, ranks: tuple[int, ...] | None) -> int:
        if ranks is None:
            return self.dense_params
        if self.kind == "svd":
            return ranks[0] * (self.shape[0] + self.shape[1]) + self.bias
        c_out, c_in, kh, kw = self.shape
        r_out, r_in = ranks
        return c_in * r_in + r_out * r_in * kh * kw + r_out * c_out + self.bias

    def macs(self, ranks: tuple[int, ...] | None) -> int | None:
        if ranks is None or self.out_pos is None:
            return self.dense_macs
        if self.kind == "svd":
            return self.out_pos * ranks[0] * (self.shape[0] + self.shape[1])
        c_out, c_in, kh, kw = self.shape
        r_out, r_in = ranks
        return self.in_pos * c_in * r_in + self.out_pos * r_out * (r_in * kh * kw + c_out)

    def energy(self, ranks: tuple[int, ...] | None) -> float:
        return 1.0 if ranks is None else float(self.retained[ranks])


def retained_svd(spectrum: torch.Tensor) -> np.ndarray:
    """[0, s_1, s_1 + s_2, ..., 1]: the share of ``spectrum.sum()`` (squared singular values, descending, float64)
    kept at each rank (all 1 for zero)."""
    total = float(spectrum.sum())
    if total <= 0:
        return np.ones(len(spectrum) + 1)
    return np.concatenate([[0.0], torch.cumsum(spectrum / total, 0).numpy()])


def _decline_reason(module: nn.Module) -> str | None:
    """Why a Conv2d/Linear cannot be factorised, or None."""
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    if type(module) is not base:
        return f"{type(module).__name__} subclasses {base.__name__}: its forward may differ from a plain layer's"
    if base is nn.Linear:
        return None
    if module.groups != 1:
        return f"grouped conv (groups={module.groups}): Tucker-2 needs groups=1"
    return None


def _survey(model: nn.Module, exclude: tuple[str, ...] | None
            ) -> tuple[list[tuple[str, nn.Module]], list[str], dict[str, str]]:
    """Split the model's Conv2d/Linear layers into candidates, excluded names and skipped (name -> reason);
    ``exclude`` as :class:`RankSpec` checked it (None: the first conv and the last linear)."""
    modules = dict(model.named_modules())
    layers = [(n, m) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if exclude is None:
        convs = [n for n, m in layers if isinstance(m, nn.Conv2d)]
        linears = [n for n, m in layers if isinstance(m, nn.Linear)]
        exclude = convs[:1] + linears[-1:]
    else:
        unknown = [e for e in exclude if e not in modules]
        if unknown:
            known = ", ".join(n for n, _ in layers[:8])
            raise CstarError(
                f"exclude names unknown module(s) {', '.join(map(repr, unknown))}; layers include: {known}"
            )
    factorised = [n for n, m in modules.items() if isinstance(m, (Tucker2Conv2d, LowRankConv1x1, LowRankLinear))]
    candidates, excluded, skipped = [], [], {}
    for name, module in layers:
        if any(name.startswith(f + ".") for f in factorised):
            skipped[name] = "part of an already factorised layer"
        elif any(name == e or name.startswith(e + ".") for e in exclude):
            excluded.append(name)
        elif (reason := _decline_reason(module)) is not None:
            skipped[name] = reason
        else:
            candidates.append((name, module))
    return candidates, excluded, skipped


def _positions(module: nn.Module, row: LayerStats | None) -> tuple[int, int]:
    """(input positions, output positions) summed over calls, from a ``layer_table`` row (None: never ran).

    Input positions assume every call has the first call's shapes.
    """
    out_pos = 0 if row is None else row.macs // math.prod(module.weight.shape)
    if out_pos == 0 or isinstance(module, nn.Linear):
        return out_pos, out_pos
    in_hw, out_hw = math.prod(row.in_shape[2:]), math.prod(row.out_shape[2:])
    return round(out_pos * in_hw / out_hw), out_pos


def _describe(name: str, module: nn.Module, positions: tuple[int, int] | None) -> _Layer:
    weight = module.weight.detach()
    bias = 0 if module.bias is None else module.bias.numel()
    in_pos, out_pos = (None, None) if positions is None else positions
    if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
        blocks = core_energies(weight).cpu()
        return _Layer(name, "tucker2", tuple(weight.shape), tuple(weight.shape[:2]), blocks,
                      energy_table(blocks).numpy(), bias, in_pos, out_pos)
    spectrum = singular_energies(weight.reshape(weight.shape[0], weight.shape[1])).double().cpu()
    return _Layer(name, "svd", tuple(weight.shape), (len(spectrum),), spectrum, retained_svd(spectrum), bias,
                  in_pos, out_pos)


def _log_energy(layer: _Layer, ranks: tuple[int, ...] | None) -> float:
    """The log of the share the greedy maximises (the retained energy, or ``layer.objective``) at ``ranks``."""
    share = 1.0 if ranks is None else float((layer.retained if layer.objective is None else layer.objective)[ranks])
    return math.log(max(share, _ENERGY_FLOOR))


class _Allocator:
    """Budget bookkeeping shared by the two methods; a layer's state is its ranks, or None for dense."""

    def __init__(self, layers: list[_Layer], measures: tuple[str, ...], limits: tuple[float, ...],
                 min_rank: int, multiple_of: int) -> None:
        self.layers, self.measures, self.limits = layers, measures, limits
        self.min_rank, self.multiple_of = min_rank, multiple_of

    def cost(self, layer: _Layer, ranks: tuple[int, ...] | None) -> tuple[int, ...]:
        return tuple(getattr(layer, m)(ranks) for m in self.measures)

    def settle(self, layer: _Layer, ranks: tuple[int, ...]) -> tuple[int, ...] | None:
        """``ranks``, or None (dense) when that would cost as much as the dense layer on a budget measure."""
        dense = self.cost(layer, None)
        return None if any(c >= d for c, d in zip(self.cost(layer, ranks), dense)) else ranks

    def fits(self, states: list) -> bool:
        totals = [sum(c) for c in zip(*(self.cost(layer, s) for layer, s in zip(self.layers, states)))]
        return all(t <= limit for t, limit in zip(totals, self.limits))

    def at_fraction(self, fraction: float) -> list:
        """Every mode at ``fraction`` of its size (rounded up to ``multiple_of``, at least ``min_rank``)."""
        m = self.multiple_of
        return [self.settle(layer, tuple(min(d, max(self.min_rank, m * math.ceil(fraction * d / m)))
                                         for d in layer.dims))
                for layer in self.layers]

    def uniform(self) -> list:
        low, high = 0.0, 1.0
        if self.fits(self.at_fraction(high)):
            return self.at_fraction(high)
        for _ in range(_BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if self.fits(self.at_fraction(middle)) else (low, middle)
        return self.at_fraction(low)

    def _step(self, index: int, ranks: tuple[int, ...], mode: int) -> tuple[tuple[int, ...] | None, float] | None:
        """The state after growing ``mode`` by one step, and its energy gain; None at full rank."""
        layer, m = self.layers[index], self.multiple_of
        if ranks[mode] >= layer.dims[mode]:
            return None
        grown = list(ranks)
        grown[mode] = min(layer.dims[mode], (ranks[mode] // m + 1) * m)
        state = self.settle(layer, tuple(grown))
        return state, layer.weight * (_log_energy(layer, state) - _log_energy(layer, ranks))

    def greedy(self) -> list:
        states = self.at_fraction(0.0)
        used = [sum(c) for c in zip(*(self.cost(layer, s) for layer, s in zip(self.layers, states)))]
        version = [0] * len(states)
        heap: list = []

        def push(i: int) -> None:
            if states[i] is None:
                return
            current = self.cost(self.layers[i], states[i])
            for mode in range(len(states[i])):
                step = self._step(i, states[i], mode)
                if step is None:
                    continue
                delta = [n - c for n, c in zip(self.cost(self.layers[i], step[0]), current)]
                weighted = sum(d / max(limit, 1.0) for d, limit in zip(delta, self.limits))
                score = step[1] / weighted if weighted > 0 else math.inf
                heapq.heappush(heap, (-score, i, mode, version[i]))

        for i in range(len(states)):
            push(i)
        while heap:
            _, i, mode, seen = heapq.heappop(heap)
            if seen != version[i]:
                continue
            state, _ = self._step(i, states[i], mode)
            new_used = [u + n - c for u, n, c in zip(used, self.cost(self.layers[i], state),
                                                     self.cost(self.layers[i], states[i]))]
            if any(u > limit for u, limit in zip(new_used, self.limits)):
                continue
            states[i], used = state, new_used
            version[i] += 1
            push(i)
        return states


def select_ranks(model: nn.Module, ratio: float | RankSpec, *, budget: str = "params",
                 macs_ratio: float | None = None, input_shape: tuple[int, int, int] | None = None,
                 method: str = "global", exclude: list[str] | None = None, min_rank: int = 1,
                 multiple_of: int = 1, layer_weights: dict[str, float] | None = None) -> RankPlan:
    """Choose the ranks of every compressible layer so that the whole model is ``ratio`` times smaller.

    ``ratio`` is a number or a whole :class:`RankSpec` (then pass no other
    setting); the keywords are the spec's fields. ``budget``: ``"params"``
    (ratio on parameters), ``"macs"`` (ratio on MACs, multiply-accumulates) or
    ``"joint"`` (``ratio`` on parameters and ``macs_ratio`` on MACs at once).
    ``input_shape`` (C, H, W) defaults to the model's own
    (:func:`cstar.models.input_shape`); it is required for the MACs budgets and
    otherwise only fills the MACs columns. ``exclude`` names modules kept dense,
    with everything inside them (default: the first conv and the last linear,
    the classifier). ``method``: ``"global"`` (maximal product of retained
    energy shares, see the module docstring; ``layer_weights`` weigh each
    layer's share, e.g. by :func:`cstar.lowrank.layer_sensitivity`) or ``"uniform"``. Ranks are
    multiples of ``multiple_of`` (or ``min_rank``, or a full mode size). The
    achieved ratio is >= the target and, for ``"global"``, as close to it as
    the smallest rank step allows.
    """
    if not isinstance(model, nn.Module):
        raise CstarError(f"select_ranks needs an nn.Module, got {type(model).__name__}")
    check_finite(model, "select_ranks: the model")
    keywords = {"budget": budget, "macs_ratio": macs_ratio, "input_shape": input_shape, "method": method,
                "exclude": exclude, "min_rank": min_rank, "multiple_of": multiple_of, "layer_weights": layer_weights}
    if isinstance(ratio, RankSpec):
        defaults = {f.name: f.default for f in fields(RankSpec) if f.name in keywords}
        given = [k for k, v in keywords.items() if v != defaults[k]]
        if given:
            raise CstarError(f"select_ranks got a RankSpec and {', '.join(given)}: put every setting in the "
                             "RankSpec (dataclasses.replace(spec, ...))")
        spec = ratio
    else:
        spec = RankSpec(ratio, **keywords)
    return _plan(model, spec)


select_ranks = accepting_old_names(select_ranks, MACS, "select_ranks()")


@dataclass
class Allocation:
    """A model's rank-allocation problem for one :class:`RankSpec`: its compressible layers, the budget
    bookkeeping (``allocator``) and what the plan records besides the ranks."""

    spec: RankSpec
    shape: tuple[int, ...] | None
    layers: list[_Layer]
    allocator: _Allocator
    excluded: list[str]
    skipped: dict[str, str]
    dense: dict[str, int | None]  # whole-model "params" and "macs" (None without an input shape)
    targets: tuple[float, ...]  # the ratio of each budget measure

    def plan(self, states: list, method: str) -> RankPlan:
        """The :class:`RankPlan` of the layers' ``states`` (ranks, or None for dense), recorded as ``method``."""
        plans = {}
        for layer, state in zip(self.layers, states):
            plans[layer.name] = LayerPlan(
                kind="dense" if state is None else layer.kind,
                ranks=layer.dims if state is None else state,
                dense_params=layer.dense_params, params=layer.params(state),
                dense_macs=layer.dense_macs, macs=layer.macs(state),
                energy=layer.energy(state), shape=layer.shape,
            )
        dense = self.dense
        params = dense["params"] - sum(p.dense_params - p.params for p in plans.values())
        macs = None if dense["macs"] is None else dense["macs"] - sum(p.dense_macs - p.macs for p in plans.values())
        _check_near_target({"params": dense["params"] / params, "macs": None if macs is None else dense["macs"] / macs},
                           self.allocator.measures, self.targets, self.layers, self.spec)
        return RankPlan(
            layers=plans, target_ratio=self.spec.ratio, budget=self.spec.budget, method=method, input_shape=self.shape,
            excluded=self.excluded, skipped=self.skipped, dense_params=dense["params"], params=params,
            dense_macs=dense["macs"], macs=macs, target_macs_ratio=self.spec.macs_ratio,
        )


def allocation(model: nn.Module, spec: RankSpec) -> Allocation:
    """The allocation problem of ``model`` under ``spec``; raises :class:`CstarError` when the target is
    unreachable (every layer at ``min_rank`` is still over budget) or names unknown layers."""
    ratio, budget, macs_ratio = spec.ratio, spec.budget, spec.macs_ratio
    exclude = spec.exclude
    shape = spec.input_shape or input_shape_of(model)
    if shape is None and budget != "params":
        raise CstarError(f"budget={budget!r} counts MACs, which needs input_shape=(C, H, W); the model has no "
                         "cstar_config to take it from: pass input_shape")

    candidates, excluded, skipped = _survey(model, exclude)
    if not candidates:
        hint = "; the first conv and the classifier are excluded by default: pass exclude=[]" if exclude is None else ""
        raise CstarError(f"nothing to compress: the model has no plain Conv2d (groups=1) or Linear layer "
                         f"outside the exclusions {excluded}{hint}")
    rows = {r.name: r for r in layer_table(model, shape)} if shape is not None else None
    layers = [_describe(n, m, None if rows is None else _positions(m, rows.get(n))) for n, m in candidates]
    weights = dict(spec.layer_weights or ())  # entries of excluded or skipped layers have nothing to weigh
    unknown = sorted(set(weights) - {n for n, _ in candidates} - set(excluded) - set(skipped))
    if unknown:
        raise CstarError(f"layer_weights name {', '.join(map(repr, unknown))}, which are not Conv2d or Linear "
                         f"layers of the model; the compressible ones are: {', '.join(n for n, _ in candidates)}")
    for layer in layers:
        layer.weight = weights.get(layer.name, 1.0)

    dense = {"params": count_params(model),
             "macs": None if rows is None else sum(r.macs for r in rows.values())}
    measures = {"params": ("params",), "macs": ("macs",), "joint": ("params", "macs")}[budget]
    targets = {"params": (ratio,), "macs": (ratio,), "joint": (ratio, macs_ratio)}[budget]
    fixed = {m: dense[m] - sum(getattr(layer, f"dense_{m}") for layer in layers) for m in measures}
    limits = tuple(dense[m] / t - fixed[m] for m, t in zip(measures, targets))
    allocator = _Allocator(layers, measures, limits, spec.min_rank, spec.multiple_of)

    smallest = allocator.at_fraction(0.0)
    if not allocator.fits(smallest):
        _raise_unreachable(allocator, smallest, dense, fixed, targets, excluded, exclude is None, spec.min_rank)
    return Allocation(spec, shape, layers, allocator, excluded, skipped, dense, targets)


def _plan(model: nn.Module, spec: RankSpec) -> RankPlan:
    problem = allocation(model, spec)
    allocator = problem.allocator
    return problem.plan(allocator.greedy() if spec.method == "global" else allocator.uniform(), spec.method)


def _check_near_target(achieved: dict, measures: tuple[str, ...], targets: tuple[float, ...], layers: list[_Layer],
                       spec: RankSpec) -> None:
    """Refuse a plan of coarse rank steps (``multiple_of`` or ``min_rank`` > 1) that is more than :data:`_FAR`
    times smaller than its target on every budget measure: the steps cannot get near the target."""
    if spec.multiple_of == 1 and spec.min_rank == 1:
        return  # steps of one rank: the plan ends within one step of its target
    misses = [(m, t) for m, t in zip(measures, targets) if achieved[m] > _FAR * t]
    if len(misses) < len(measures):
        return
    what = " and ".join(f"{achieved[m]:.2f}x on {'parameters' if m == 'params' else 'MACs'} for a {t:g}x target"
                        for m, t in misses)
    step = max(spec.multiple_of, spec.min_rank)
    narrow = [layer.name for layer in layers if min(layer.dims) < step]
    cause = f" ({', '.join(narrow[:3])} cannot take a rank between {spec.min_rank} and full)" if narrow else ""
    raise CstarError(f"the closest rank plan with multiple_of={spec.multiple_of}, min_rank={spec.min_rank} is "
                     f"{what}{cause}: lower multiple_of or min_rank" + (", or exclude those layers" if narrow else ""))


def _raise_unreachable(allocator: _Allocator, smallest: list, dense: dict, fixed: dict, targets: tuple[float, ...],
                       excluded: list[str], default_exclusions: bool, min_rank: int) -> None:
    parts = []
    for m, target in zip(allocator.measures, targets):
        least = fixed[m] + sum(getattr(layer, m)(s) for layer, s in zip(allocator.layers, smallest))
        if dense[m] / least >= target:
            continue
        what = "parameters" if m == "params" else "MACs"
        parts.append(f"{target:g}x on {what} is unreachable (at most {dense[m] / least:.2f}x)")
    if default_exclusions and excluded:
        fix = (f"the first conv and the classifier ({', '.join(excluded)}) are excluded by default and kept dense: "
               "pass exclude=[] to compress them too, or lower the ratio")
    else:
        fix = "lower the ratio or min_rank, or exclude fewer layers"
    raise CstarError(f"target {' and '.join(parts)} with every layer at min_rank={min_rank}; {fix}")
