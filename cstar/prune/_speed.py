"""The parameter ratio at which channel pruning meets a speed-up measured on a runtime.

Channel pruning is set by a parameter ratio; what a deployment asks is a
speed-up on its runtime. :func:`ratio_for_speedup` times the pruned structure
(:func:`magnitude_prune` of the model, or any ``prune(model, ratio)``) against
the dense model on the runtime, interleaved (:func:`cstar.lowrank.model_latencies_ms`),
and searches the ratio: doubled until the structure meets the speed-up, then
halved geometrically until the bracket is within ``tolerance``. The result
records the measured times of the structure it returns: a measured figure,
never a prediction.

Given a ``reference`` structure that met the speed-up already (a latency
rank plan's), the pruned structure is instead held to run at least as fast as
the reference, timed side by side with it: on a shared machine the dense
model's time (memory-bound layers) swung by half between timings a second
apart here while compressed structures held theirs, so two structures each
timed against the dense model alone can end far apart in speed; timed
against each other they end level.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .._core.checks import check_ratio, number
from .._core.errors import CstarError
from ..lowrank._latency import check_runtime, model_latencies_ms, where_timed
from ._magnitude import magnitude_prune

MAX_TIMINGS = 10  # at most this many pruned structures are timed


@dataclass(frozen=True)
class PruningSpeed:
    """The parameter ratio at which the pruned structure met ``target_speedup``: ``params_ratio`` (dense /
    pruned parameters), the measured ``dense_ms`` and ``pruned_ms`` (median ms per batch) and where
    (``measured_on``); ``reference_ms``: the time of the structure it was held to, timed beside it (None:
    held to the dense model's time over the speed-up)."""

    target_speedup: float
    params_ratio: float
    dense_ms: float
    pruned_ms: float
    measured_on: str
    reference_ms: float | None = None

    @property
    def speedup(self) -> float:
        """The measured speed-up of the structure, dense / pruned time."""
        return self.dense_ms / self.pruned_ms

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: object, source: str) -> "PruningSpeed":
        """From :meth:`to_dict`'s values, read from ``source`` (a file's name, for the message); refused in one
        line unless every field is there with a value of its type (finite, positive times; a ratio > 1)."""
        names = {"target_speedup", "params_ratio", "dense_ms", "pruned_ms", "measured_on", "reference_ms"}
        numbers = names - {"measured_on", "reference_ms"}

        positive = number(above=0).holds  # a finite time or ratio > 0, not a bool or text
        ok = (isinstance(values, dict) and set(values) == names and isinstance(values["measured_on"], str)
              and all(positive(values[k]) for k in numbers)
              and (values["reference_ms"] is None or positive(values["reference_ms"]))
              and values["params_ratio"] > 1 and values["target_speedup"] > 1)
        if not ok:
            raise CstarError(f"{source} is not a pruning speed record cstar wrote (fields {', '.join(sorted(names))}):"
                             " delete it to measure again")
        reference = values["reference_ms"]
        return cls(**{k: float(values[k]) for k in numbers}, measured_on=values["measured_on"],
                   reference_ms=None if reference is None else float(reference))


def ratio_for_speedup(model: nn.Module, speedup: float, input_shape: tuple[int, ...], *,
                      runtime: str = "onnxruntime", batch: int = 1, threads: int | None = None,
                      prune: Callable[[nn.Module, float], nn.Module] | None = None,
                      reference: nn.Module | None = None, tolerance: float = 0.03) -> PruningSpeed:
    """The smallest parameter ratio (within ``tolerance``, relative) at which ``prune(model, ratio)`` runs at least
    ``speedup`` times faster than ``model`` on ``runtime``, batches of ``batch`` images of ``input_shape``
    (C, H, W) at ``threads`` threads (default torch's).

    ``prune`` defaults to :func:`magnitude_prune` at ``input_shape`` (the structure of a learned pruning, such
    as HYDRA's, is known only after its scores train: this ratio is where filter-norm channels meet the
    speed-up). ``reference``: a structure that met the speed-up already (e.g. the factorised model of a latency
    rank plan); the pruned structure must then run at least as fast as it, timed beside it and the dense model.
    At most :data:`MAX_TIMINGS` structures are timed; refused in one line, with the fastest measured, when no
    ratio that ``prune`` reaches meets the speed-up."""
    speedup = check_ratio("speedup", speedup)
    check_runtime(runtime)
    threads = threads or torch.get_num_threads()
    dense = copy.deepcopy(model).cpu().eval()
    prune = prune or (lambda m, r: magnitude_prune(m, r, input_shape))
    others = {"dense": dense} if reference is None else {"dense": dense, "reference": reference}
    timed: dict[float, dict[str, float]] = {}

    def meets(ratio: float) -> bool | None:
        """Whether the structure at ``ratio`` meets the speed-up (None: ``prune`` cannot reach the ratio)."""
        try:
            pruned = prune(dense, ratio)
        except CstarError:
            return None
        times = model_latencies_ms({**others, "pruned": pruned}, input_shape, runtime, batch, threads)
        timed[ratio] = times
        if reference is not None:
            return times["pruned"] <= times["reference"]
        return times["pruned"] * speedup <= times["dense"]

    low, high, ratio = 1.0, None, speedup
    while high is None and len(timed) < MAX_TIMINGS:
        met = meets(ratio)
        if met is None:
            break
        low, high = (low, ratio) if met else (ratio, None)
        ratio *= 2
    if high is None:
        best = max((t["dense"] / t["pruned"] for t in timed.values()), default=float("nan"))
        raise CstarError(f"no channel pruning of the model met the {speedup:g}x speed-up on {runtime}: the fastest "
                         f"structure timed ran {best:.2f}x ({where_timed(runtime, threads, batch)}); lower the "
                         "speed-up")
    while high / low > 1 + tolerance and len(timed) < MAX_TIMINGS:
        middle = math.sqrt(low * high)
        if meets(middle):
            high = middle
        else:
            low = middle
    times = timed[high]
    return PruningSpeed(speedup, high, times["dense"], times["pruned"], where_timed(runtime, threads, batch),
                        times.get("reference"))
