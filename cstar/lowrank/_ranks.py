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
the output resolution; MAC multipliers come from one traced forward pass;
:mod:`cstar.lowrank._allocate` holds the costs and the two allocations).
A latency budget's costs are measured instead (:mod:`cstar.lowrank._latency`):
each layer's time alone on the runtime weighs it, the greedy may also jump a
layer back to dense, and every plan made is timed whole against the dense
model, the limit refined until a plan's measured speed-up meets the target.

Only the spectra need the weights: :func:`check_reachable` refuses an
unreachable target from the layers' shapes alone, before any training.
:func:`allocation` sets up the whole problem (layers, costs, budget, spectra)
once; learned ranks (``_learned.py``) run the same greedy on shares of learned
scores in place of the energy shares (``Layer.objective``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

from .._core.checks import check_finite
from .._core.errors import CstarError
from .._core.renamed import MACS, accepting_old_names
from ..evaluation.counting import LayerStats, count_params, layer_table
from ..models import input_shape as input_shape_of
from ._allocate import Allocator, Layer
from ._latency import PLAN_ROUNDS, PROBES, PlanTimer, check_runtime, measure_layers
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ._plan import LayerPlan, RankPlan
from ._spec import RankSpec
from ._tucker import core_energies, energy_table, singular_energies

MEASURE_NAMES = {"params": "parameters", "macs": "MACs", "latency": "latency"}
_FAR = 1.25  # a plan of coarse rank steps this much smaller than its target is refused (_check_near_target)
_MISS_MARGIN = 0.03  # after each plan that missed a latency target, the next aims this much faster (timing noise)


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


def _describe(name: str, module: nn.Module, positions: tuple[int, int] | None) -> Layer:
    """The layer's shape and costs (no spectra: see :func:`_add_spectra`)."""
    shape = tuple(module.weight.shape)
    bias = 0 if module.bias is None else module.bias.numel()
    in_pos, out_pos = (None, None) if positions is None else positions
    if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
        return Layer(name, "tucker2", shape, shape[:2], bias, in_pos, out_pos)
    return Layer(name, "svd", shape, (min(shape[:2]),), bias, in_pos, out_pos)


def _add_spectra(layer: Layer, module: nn.Module) -> None:
    """``layer``'s component energies (``blocks``: the HOSVD core's, or the squared singular values) and its
    retained energy share at every rank: the one spectral computation of rank selection."""
    weight = module.weight.detach()
    if layer.kind == "tucker2":
        layer.blocks = core_energies(weight).cpu()
        layer.retained = energy_table(layer.blocks).numpy()
    else:
        layer.blocks = singular_energies(weight.reshape(weight.shape[0], weight.shape[1])).double().cpu()
        layer.retained = retained_svd(layer.blocks)


@dataclass
class Allocation:
    """A model's compressible layers under a :class:`RankSpec`, with the costs and limits of its target (and,
    from :func:`allocation`, the layers' spectra): the problem a rank plan solves."""

    spec: RankSpec
    modules: list[nn.Module]  # the compressible layers, in the order of ``allocator.layers``
    excluded: list[str]
    skipped: dict[str, str]
    input_shape: tuple[int, ...] | None
    dense: dict[str, int | None]  # whole-model "params" and "macs" (None without an input shape)
    fixed: dict[str, int]  # the cost of everything but the compressible layers, per budget measure
    targets: tuple[float, ...]  # per budget measure
    allocator: Allocator
    timer: PlanTimer | None = None  # a latency budget's: times plans on its runtime, keeps their LatencyCurve
    latency_ms: tuple[float, float] | None = None  # (dense, plan) times of the plan chosen, measured together

    def achieved(self, spent: list[float]) -> dict[str, float]:
        """The whole model's dense / planned ratio per budget measure when the layers cost ``spent`` (a total
        per measure, e.g. :meth:`Allocator.totals`; latency: the layers' times alone, mapped to the model's
        time through the measured :class:`LatencyCurve`)."""
        return {m: 1 / self.timer.curve.model_ms(cost) if m == "latency" else self.dense[m] / (self.fixed[m] + cost)
                for m, cost in zip(self.allocator.measures, spent)}

    @property
    def layers(self) -> list[Layer]:
        return self.allocator.layers

    def plan(self, states: list, method: str) -> RankPlan:
        """The :class:`RankPlan` of the layers' ``states`` (ranks, or None for dense), recorded as ``method``;
        coarse rank steps far from the target are refused (:func:`_check_near_target`)."""
        _check_near_target(self, self.achieved(self.allocator.totals(states)), self.spec)
        plans = {layer.name: LayerPlan(kind="dense" if state is None else layer.kind,
                                       ranks=layer.dims if state is None else state,
                                       dense_params=layer.dense_params, params=layer.params(state),
                                       dense_macs=layer.dense_macs, macs=layer.macs(state),
                                       energy=layer.energy(state), shape=layer.shape,
                                       **({} if layer.timing is None else
                                          {"dense_latency_alone_ms": layer.latency(None),
                                           "latency_alone_ms": layer.latency(state)}))
                 for layer, state in zip(self.layers, states)}
        dense = self.dense
        params = dense["params"] - sum(p.dense_params - p.params for p in plans.values())
        macs = None if dense["macs"] is None else dense["macs"] - sum(p.dense_macs - p.macs for p in plans.values())
        return RankPlan(layers=plans, target_ratio=self.spec.ratio, budget=self.spec.budget, method=method,
                        input_shape=self.input_shape, excluded=self.excluded, skipped=self.skipped,
                        dense_params=dense["params"], params=params, dense_macs=dense["macs"], macs=macs,
                        target_macs_ratio=self.spec.macs_ratio, **self._latency_record(plans))

    def _latency_record(self, plans: dict[str, LayerPlan]) -> dict:
        if self.timer is None:
            return {}
        return {"runtime": self.spec.runtime, "measured_on": self.timer.measured_on,
                "dense_latency_ms": self.latency_ms[0], "latency_ms": self.latency_ms[1]}


def _problem(model: nn.Module, spec: RankSpec, macs: bool = True, timed: bool = True) -> Allocation:
    """The :class:`Allocation` of ``spec`` (without spectra) on ``model``, refused in one line when nothing can be compressed;
    ``macs=False`` skips the traced forward pass that counts MACs when the budget is on parameters alone;
    ``timed=False`` skips timing the layers of a latency budget (its limit is then NaN: for checks only)."""
    budget = spec.budget
    shape = spec.input_shape or input_shape_of(model)
    if shape is None and budget != "params":
        what = "times the layers on their inputs" if budget == "latency" else "counts MACs"
        raise CstarError(f"budget={budget!r} {what}, which needs input_shape=(C, H, W); the model has no "
                         "cstar_config to take it from: pass input_shape")
    candidates, excluded, skipped = _survey(model, spec.exclude)
    if not candidates:
        hint = "; the first conv and the classifier are excluded by default: pass exclude=[]" \
            if spec.exclude is None else ""
        raise CstarError(f"nothing to compress: the model has no plain Conv2d (groups=1) or Linear layer "
                         f"outside the exclusions {excluded}{hint}")
    counted = shape is not None and (macs or budget != "params")
    rows = {r.name: r for r in layer_table(model, shape)} if counted else None
    layers = [_describe(n, m, None if rows is None else _positions(m, rows.get(n))) for n, m in candidates]
    weights = dict(spec.layer_weights or ())  # entries of excluded or skipped layers have nothing to weigh
    unknown = sorted(set(weights) - {n for n, _ in candidates} - set(excluded) - set(skipped))
    if unknown:
        raise CstarError(f"layer_weights name {', '.join(map(repr, unknown))}, which are not Conv2d or Linear "
                         f"layers of the model; the compressible ones are: {', '.join(n for n, _ in candidates)}")
    for layer in layers:
        layer.weight = weights.get(layer.name, 1.0)

    dense = {"params": count_params(model), "macs": None if rows is None else sum(r.macs for r in rows.values())}
    measures = {"params": ("params",), "macs": ("macs",), "joint": ("params", "macs"), "latency": ("latency",)}[budget]
    targets = (spec.ratio,) if budget != "joint" else (spec.ratio, spec.macs_ratio)
    fixed = {m: dense[m] - sum(getattr(layer, f"dense_{m}") for layer in layers) for m in measures if m != "latency"}
    # a latency limit is a sum of layer times, set by _time_layers once measured (NaN: a check that times nothing)
    limits = tuple(math.nan if m == "latency" else dense[m] / t - fixed[m] for m, t in zip(measures, targets))
    problem = Allocation(spec, [m for _, m in candidates], excluded, skipped, shape, dense, fixed, targets,
                         Allocator(layers, measures, limits, spec.min_rank, spec.multiple_of))
    if budget == "latency" and timed:
        _time_layers(problem, model, rows)
    return problem


def _time_layers(problem: Allocation, model: nn.Module, rows: dict[str, LayerStats]) -> None:
    """Time every layer of ``problem`` alone on its spec's runtime (``layer.timing``), then the whole model dense
    and at the :data:`PROBES` rank fractions (its :class:`LatencyCurve`), and set the budget's limit: the sum
    of layer times whose model time meets the target speed-up."""
    spec, layers, allocator = problem.spec, problem.layers, problem.allocator
    check_runtime(spec.runtime)
    threads = spec.latency_threads or torch.get_num_threads()
    in_shapes, calls = [], []
    for layer, module in zip(layers, problem.modules):
        row = rows.get(layer.name)
        ran = row is not None and row.in_shape is not None and row.macs > 0
        in_shapes.append(tuple(row.in_shape) if ran else None)
        first_call = math.prod(row.out_shape[2:] if isinstance(module, nn.Conv2d) else row.out_shape[1:-1]) \
            if ran else 1
        calls.append(0 if not ran else max(1, round(layer.out_pos / first_call)))
    grids = measure_layers(layers, problem.modules, in_shapes, calls, spec.runtime, spec.latency_batch, threads,
                           spec.min_rank, spec.multiple_of)
    for layer, grid in zip(layers, grids):
        layer.timing = grid
    timer = PlanTimer(model, problem.input_shape, [layer.name for layer in layers], problem.modules, spec.runtime,
                      spec.latency_batch, threads)
    timer.curve.add(sum(grid.dense_ms for grid in grids), 1.0)
    for fraction in PROBES:
        states = allocator.at_fraction(fraction)
        timer.time(states, allocator.totals(states)[0])
    problem.timer = timer
    allocator.limits = (timer.curve.layer_sum(1 / spec.ratio),)


def _meet_latency(problem: Allocation, choose) -> list:
    """Plan with ``choose`` (the allocation), time the plan's structure against the dense model, and plan again
    under a new limit on the layers' summed time, until a plan's measured speed-up meets the target within 5%
    above it or :data:`PLAN_ROUNDS` plans were timed; returns the plan with the most layer time among those
    that met it (its times in ``problem.latency_ms``). Each new limit is the refined curve's, kept inside the
    bracket of the plans timed so far (below any that missed, above any that met; else their midpoint), aimed
    3% faster than the target per plan that missed (a plan aimed at the target itself missed it by noise)."""
    allocator, timer, goal = problem.allocator, problem.timer, 1 / problem.spec.ratio
    met, missed, best = [], [], 0.0
    for _ in range(PLAN_ROUNDS):
        states = choose()
        spent = allocator.totals(states)[0]
        dense_ms, plan_ms = timer.time(states, spent)
        best = max(best, dense_ms / plan_ms)
        if plan_ms <= goal * dense_ms:
            met.append((spent, (dense_ms, plan_ms), states))
            if plan_ms >= goal * dense_ms / 1.05:
                break
        else:
            missed.append(spent)
        low = max((m[0] for m in met), default=0.0)
        high = min(missed, default=math.inf)
        limit = timer.curve.layer_sum(goal / (1 + _MISS_MARGIN * len(missed)))  # each miss asks a little more
        if not low < limit < high:
            limit = (low + high) / 2 if high < math.inf else low * 1.05
        if math.isclose(limit, allocator.limits[0], rel_tol=1e-3):
            break
        allocator.limits = (limit,)
    if not met:
        raise CstarError(f"no plan met the {problem.spec.ratio:g}x speed-up on {problem.spec.runtime}: the fastest "
                         f"plan timed ran {best:.2f}x ({timer.measured_on}); lower the speed-up, or retry on an "
                         "idle machine")
    _, problem.latency_ms, states = max(met, key=lambda item: item[0])
    return states


def select_ranks(model: nn.Module, ratio: float | RankSpec, *, budget: str = "params",
                 macs_ratio: float | None = None, input_shape: tuple[int, int, int] | None = None,
                 method: str = "global", exclude: list[str] | None = None, min_rank: int = 1,
                 multiple_of: int | None = None, layer_weights: dict[str, float] | None = None,
                 runtime: str | None = None, latency_batch: int = 1, latency_threads: int | None = None) -> RankPlan:
    """Choose the ranks of every compressible layer so that the whole model is ``ratio`` times smaller.

    ``ratio`` is a number or a whole :class:`RankSpec` (then pass no other
    setting); the keywords are the spec's fields. ``budget``: ``"params"``
    (ratio on parameters), ``"macs"`` (ratio on MACs, multiply-accumulates) or
    ``"joint"`` (``ratio`` on parameters and ``macs_ratio`` on MACs at once)
    or ``"latency"`` (``ratio`` is the speed-up on ``runtime``, from layer
    latencies measured there and cached: :mod:`cstar.lowrank._latency`).
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
                "exclude": exclude, "min_rank": min_rank, "multiple_of": multiple_of, "layer_weights": layer_weights,
                "runtime": runtime, "latency_batch": latency_batch, "latency_threads": latency_threads}
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


def allocation(model: nn.Module, spec: RankSpec) -> Allocation:
    """The allocation problem of ``model`` under ``spec``, spectra included; raises :class:`CstarError` when the
    target is unreachable (every layer at ``min_rank`` still over budget) or names unknown layers."""
    problem = _problem(model, spec)
    smallest = problem.allocator.at_fraction(0.0)
    if not problem.allocator.fits(smallest):
        _raise_unreachable(problem, smallest, spec)
    for layer, module in zip(problem.layers, problem.modules):
        _add_spectra(layer, module)
    return problem


def _plan(model: nn.Module, spec: RankSpec) -> RankPlan:
    problem = allocation(model, spec)
    choose = problem.allocator.greedy if spec.method == "global" else problem.allocator.uniform
    return problem.plan(choose() if problem.timer is None else _meet_latency(problem, choose), spec.method)


def check_reachable(model: nn.Module, spec: RankSpec) -> None:
    """Refuse in one line, from the layers' shapes alone, a target that no rank plan of ``model`` meets.

    Cheap (no SVD or HOSVD; a traced forward pass only for a MACs budget), so
    callers run it before any training or file. Refused: ``spec``'s ratio
    unreachable with every layer at ``min_rank``, and coarse rank steps
    (``multiple_of``, ``min_rank``) whose plan is sure to end far beyond its
    target (:func:`select_ranks` refuses the same with the same messages; for
    ``method="global"`` it may still refuse a plan whose steps only the spectra
    leave far off).
    """
    if not isinstance(model, nn.Module):
        raise CstarError(f"check_reachable needs an nn.Module, got {type(model).__name__}")
    if not isinstance(spec, RankSpec):
        raise CstarError(f"check_reachable needs a RankSpec, got {type(spec).__name__}: pass RankSpec(ratio, ...)")
    if spec.budget == "latency":  # reachable or not is known only once the layers are timed (select_ranks)
        check_runtime(spec.runtime)
        _problem(model, spec, timed=False)
        return
    problem = _problem(model, spec, macs=False)
    allocator = problem.allocator
    smallest = allocator.at_fraction(0.0)
    if not allocator.fits(smallest):
        _raise_unreachable(problem, smallest, spec)
    if spec.method == "uniform":  # the uniform plan depends on the shapes alone
        _check_near_target(problem, problem.achieved(allocator.totals(allocator.uniform())), spec)
    else:  # the global plan costs at most this much, whatever the spectra
        _check_near_target(problem, problem.achieved(allocator.most_spent(smallest)), spec)


def _check_near_target(problem: Allocation, achieved: dict[str, float], spec: RankSpec) -> None:
    """Refuse a plan of coarse rank steps (``multiple_of`` or ``min_rank`` > 1) that is more than :data:`_FAR`
    times smaller than its target on every budget measure (``achieved``: the plan's ratios, or lower bounds of
    them): the steps cannot get near the target."""
    if (spec.multiple_of == 1 and spec.min_rank == 1) or spec.budget == "latency":
        return  # steps of one rank: the plan ends within one step of its target; a latency plan is measured
    measures = problem.allocator.measures
    misses = [(m, t) for m, t in zip(measures, problem.targets) if achieved[m] > _FAR * t]
    if len(misses) < len(measures):
        return
    what = " and ".join(f"{achieved[m]:.2f}x on {MEASURE_NAMES[m]} for a {t:g}x target" for m, t in misses)
    step = max(spec.multiple_of, spec.min_rank)
    narrow = [layer.name for layer in problem.allocator.layers if min(layer.dims) < step]
    cause = f" ({', '.join(narrow[:3])} cannot take a rank between {spec.min_rank} and full)" if narrow else ""
    raise CstarError(f"the closest rank plan with multiple_of={spec.multiple_of}, min_rank={spec.min_rank} is "
                     f"{what}{cause}: lower multiple_of or min_rank" + (", or exclude those layers" if narrow else ""))


def _raise_unreachable(problem: Allocation, smallest: list, spec: RankSpec) -> None:
    parts, reached = [], problem.achieved(problem.allocator.totals(smallest))
    for m, target in zip(problem.allocator.measures, problem.targets):
        if reached[m] >= target:
            continue
        measured = ", measured" if m == "latency" else ""
        parts.append(f"{target:g}x on {MEASURE_NAMES[m]} is unreachable (at most {reached[m]:.2f}x{measured})")
    if spec.exclude is None and problem.excluded:
        fix = (f"the first conv and the classifier ({', '.join(problem.excluded)}) are excluded by default and kept "
               "dense: pass exclude=[] to compress them too, or lower the ratio")
    else:
        fix = "lower the ratio or min_rank, or exclude fewer layers"
    raise CstarError(f"target {' and '.join(parts)} with every layer at min_rank={spec.min_rank}; {fix}")
