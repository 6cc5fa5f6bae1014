"""The budget arithmetic of rank selection: a compressible layer's exact costs (:class:`Layer`) and the two
allocations of ranks under a budget (:class:`Allocator`: ``greedy`` for ``method="global"``, ``uniform``).

A layer's state is its ranks, or None when it is kept dense. Costs depend on
the shapes alone; only the greedy allocation reads the layers' retained-energy
tables (see :mod:`cstar.lowrank._ranks` for the method).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

BISECTION_STEPS = 60
_ENERGY_FLOOR = 1e-12  # log(0) guard for a layer whose leading components carry no energy


@dataclass
class Layer:
    """A compressible layer: shape, exact cost formulas and (once computed) retained-energy table."""

    name: str
    kind: str  # "tucker2" or "svd"
    shape: tuple[int, ...]
    dims: tuple[int, ...]  # the mode sizes: (C_out, C_in), or (min(out, in),)
    bias: int
    in_pos: int | None  # spatial positions the first factor runs at, summed over calls (None: no input shape)
    out_pos: int | None  # positions (rows, for a linear) of the output, summed over calls
    retained: np.ndarray | None = None  # retained energy share, indexed by ranks: shape (dims[0] + 1, ...)
    weight: float = 1.0  # how many times the layer's log-energy counts in the global objective
    blocks: object = None  # energies of the rank components (float64 tensor: (n,) singular, (C_out, C_in) core)
    objective: np.ndarray | None = None  # the share the greedy maximises, like retained (None: retained itself)
    timing: object = None  # a measured LatencyGrid (``budget="latency"`` only; see _latency.py)
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

    def latency(self, ranks: tuple[int, ...] | None) -> float:
        """Measured milliseconds per batch on the plan's runtime (needs ``timing``)."""
        return self.timing.dense_ms if ranks is None else self.timing.at(ranks)

    def energy(self, ranks: tuple[int, ...] | None) -> float:
        return 1.0 if ranks is None else float(self.retained[ranks])


def _log_energy(layer: Layer, ranks: tuple[int, ...] | None) -> float:
    """The log of the share the greedy maximises (the retained energy, or ``layer.objective``) at ``ranks``."""
    share = 1.0 if ranks is None else float((layer.retained if layer.objective is None else layer.objective)[ranks])
    return math.log(max(share, _ENERGY_FLOOR))


class Allocator:
    """Budget bookkeeping shared by the two methods: ``limits`` on the layers' total cost per measure
    (``"params"``, ``"macs"``, ``"latency"``), ranks at least ``min_rank`` and grown in steps of ``multiple_of``."""

    def __init__(self, layers: list[Layer], measures: tuple[str, ...], limits: tuple[float, ...],
                 min_rank: int, multiple_of: int) -> None:
        self.layers, self.measures, self.limits = layers, measures, limits
        self.min_rank, self.multiple_of = min_rank, multiple_of

    def cost(self, layer: Layer, ranks: tuple[int, ...] | None) -> tuple[int, ...]:
        return tuple(getattr(layer, m)(ranks) for m in self.measures)

    def settle(self, layer: Layer, ranks: tuple[int, ...]) -> tuple[int, ...] | None:
        """``ranks``, or None (dense) when that would cost as much as the dense layer on a budget measure."""
        dense = self.cost(layer, None)
        return None if any(c >= d for c, d in zip(self.cost(layer, ranks), dense)) else ranks

    def totals(self, states: list) -> list[int]:
        """The layers' total cost per measure in ``states``."""
        return [sum(c) for c in zip(*(self.cost(layer, s) for layer, s in zip(self.layers, states)))]

    def fits(self, states: list) -> bool:
        return all(t <= limit for t, limit in zip(self.totals(states), self.limits))

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
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            low, high = (middle, high) if self.fits(self.at_fraction(middle)) else (low, middle)
        return self.at_fraction(low)

    def steps(self, layer: Layer, ranks: tuple[int, ...]) -> dict[int, tuple[int, ...] | None]:
        """{mode: the state after growing that mode by one step} for every mode of ``ranks`` below full size;
        on a latency budget also {number of modes: None}, the jump back to the dense layer (measured times
        are not proportional to the ranks: a small factorisation may pay where a bigger one costs more than
        the dense layer, so the greedy may weigh keeping it dense against any step)."""
        grown = {}
        for mode, (rank, size) in enumerate(zip(ranks, layer.dims)):
            if rank < size:
                bigger = list(ranks)
                bigger[mode] = min(size, (rank // self.multiple_of + 1) * self.multiple_of)
                grown[mode] = self.settle(layer, tuple(bigger))
        if "latency" in self.measures:
            grown[len(ranks)] = None
        return grown

    def most_spent(self, states: list) -> list[float]:
        """Per measure, an upper bound on the layers' total cost wherever a greedy allocation from ``states``
        ends, whatever the energies: each layer at its costliest state of rank steps that fits beside the
        others at ``states`` (costs grow with the ranks, so no layer ends beyond it)."""
        used, bound = self.totals(states), [0.0] * len(self.measures)
        for layer, state in zip(self.layers, states):
            current = self.cost(layer, state)
            if state is None:  # dense already: it stays
                bound = [b + c for b, c in zip(bound, current)]
                continue
            m = self.multiple_of
            grid = np.meshgrid(*(np.array(sorted({r, d, *range((r // m + 1) * m, d, m)}), dtype=np.int64)
                                 for r, d in zip(state, layer.dims)), indexing="ij")
            costs = [getattr(layer, measure)(tuple(grid)).astype(float) for measure in self.measures]
            dense = self.cost(layer, None)
            settled = np.any([c >= d for c, d in zip(costs, dense)], axis=0)  # such states are kept dense
            costs = [np.where(settled, d, c) for c, d in zip(costs, dense)]
            fits = np.all([c <= limit - u + now for c, limit, u, now in zip(costs, self.limits, used, current)],
                          axis=0)
            bound = [b + c[fits].max() for b, c in zip(bound, costs)]  # ``state`` itself fits
        return bound

    def greedy(self) -> list:
        """From every layer at ``min_rank``, grow the step of largest weighted log-energy gain per unit of
        added cost while the budget allows (needs every layer's ``retained``)."""
        states = self.at_fraction(0.0)
        used = self.totals(states)
        version = [0] * len(states)
        heap: list = []

        def push(i: int) -> None:
            if states[i] is None:
                return
            layer, current = self.layers[i], self.cost(self.layers[i], states[i])
            for mode, state in self.steps(layer, states[i]).items():
                gain = layer.weight * (_log_energy(layer, state) - _log_energy(layer, states[i]))
                delta = [n - c for n, c in zip(self.cost(layer, state), current)]
                weighted = sum(d / max(limit, 1.0) for d, limit in zip(delta, self.limits))
                score = gain / weighted if weighted > 0 else math.inf
                heapq.heappush(heap, (-score, i, mode, version[i]))

        for i in range(len(states)):
            push(i)
        while heap:
            _, i, mode, seen = heapq.heappop(heap)
            if seen != version[i]:
                continue
            state = self.steps(self.layers[i], states[i])[mode]
            new_used = [u + n - c for u, n, c in zip(used, self.cost(self.layers[i], state),
                                                     self.cost(self.layers[i], states[i]))]
            if any(u > limit for u, limit in zip(new_used, self.limits)):
                continue
            states[i], used = state, new_used
            version[i] += 1
            push(i)
        return states
