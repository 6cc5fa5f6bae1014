"""What a rank plan must meet: one typed, validated specification (:class:`RankSpec`).

Taken by :func:`cstar.lowrank.select_ranks`, built once from
:class:`cstar.CompressConfig` or the command line, and kept by ADMM for rank
re-selection, so the path of a target ratio can be followed from the user to
the plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .._core.checks import check_positive_int, check_ratio
from .._core.errors import CstarError
from .._core.renamed import MACS, accepting_old_names, old_attribute, renamed_value

RUNTIMES = ("onnxruntime", "openvino", "eager")  # where a latency budget is measured
BUDGETS = ("params", "macs", "joint", "latency")
ALLOCATIONS = ("global", "uniform")


@dataclass(frozen=True)
class RankSpec:
    """The target of a rank plan; validated when built.

    ``ratio``: the target whole-model dense / compressed size, > 1, on parameters
    (``budget="params"``), MACs (multiply-accumulates, ``"macs"``), parameters with
    ``macs_ratio`` on MACs at once (``"joint"``), or the speed-up, dense / compressed
    latency measured on ``runtime`` (``"latency"``: ``"onnxruntime"``, the default,
    ``"openvino"`` or ``"eager"``; batches of ``latency_batch`` images, default 1,
    at ``latency_threads`` threads, default torch's; see :mod:`cstar.lowrank._latency`). ``method``: ``"global"``
    (energy-optimal allocation) or ``"uniform"`` (the same rank fraction
    everywhere). ``exclude``: module names kept dense (None: the first conv and
    the classifier). Ranks are at least ``min_rank`` and multiples of
    ``multiple_of`` (CPU kernels like multiples of 8 or 16 channels; None, the
    default: 8 for a latency budget, else 1).
    ``input_shape`` (C, H, W) for counting MACs; None: the model's own.
    ``layer_weights`` ({module name: weight > 0}, for ``"global"`` only): each
    layer's log-energy counts that many times in the objective (unnamed layers
    1), e.g. :func:`cstar.lowrank.layer_sensitivity`'s estimate of how much the
    adversarial loss depends on each layer; None (default): all layers alike.
    """

    ratio: float
    budget: str = "params"
    macs_ratio: float | None = None
    method: str = "global"
    exclude: tuple[str, ...] | None = None
    min_rank: int = 1
    multiple_of: int | None = None
    input_shape: tuple[int, ...] | None = None
    layer_weights: tuple[tuple[str, float], ...] | None = None
    runtime: str | None = None
    latency_batch: int = 1
    latency_threads: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise the fields once, here
        set_(self, "ratio", check_ratio("ratio", self.ratio))
        set_(self, "budget", renamed_value(self.budget, "budget", "RankSpec()"))
        if self.budget not in BUDGETS:
            raise CstarError(f"unknown budget {self.budget!r}; choose one of: {', '.join(BUDGETS)}")
        if self.method not in ALLOCATIONS:
            raise CstarError(f"unknown method {self.method!r}; choose one of: {', '.join(ALLOCATIONS)}")
        if self.budget == "joint":
            if self.macs_ratio is None:
                raise CstarError("budget='joint' needs macs_ratio (the MACs ratio to meet beside ratio); pass it")
            set_(self, "macs_ratio", check_ratio("macs_ratio", self.macs_ratio))
        elif self.macs_ratio is not None:
            raise CstarError(f"macs_ratio is only used with budget='joint' (got budget={self.budget!r}); drop it "
                             "or pass budget='joint'")
        if self.multiple_of is None:  # runtimes' CPU kernels run channel counts off multiples of 8 slowly
            set_(self, "multiple_of", 8 if self.budget == "latency" else 1)
        set_(self, "multiple_of", check_positive_int("multiple_of", self.multiple_of))
        set_(self, "min_rank", check_positive_int("min_rank", self.min_rank))
        if self.exclude is not None:
            if not isinstance(self.exclude, (list, tuple)) or not all(isinstance(n, str) for n in self.exclude):
                raise CstarError(f"exclude must be a list of module names, got {self.exclude!r}; "
                                 "e.g. exclude=['conv1', 'fc']")
            set_(self, "exclude", tuple(self.exclude))
        if self.input_shape is not None:
            shape = self.input_shape
            if not isinstance(shape, (tuple, list)) or len(shape) != 3:
                raise CstarError(f"input_shape must be a tuple (C, H, W), got {shape!r}; e.g. (3, 32, 32)")
            set_(self, "input_shape", tuple(check_positive_int(f"input_shape[{i}]", d) for i, d in enumerate(shape)))
        if self.layer_weights is not None:
            set_(self, "layer_weights", _checked_weights(self.layer_weights, self.method))
        self._check_latency(set_)

    def _check_latency(self, set_) -> None:
        if self.budget != "latency":
            given = [k for k, v in (("runtime", self.runtime), ("latency_batch", self.latency_batch != 1),
                                    ("latency_threads", self.latency_threads)) if v]
            if given:
                raise CstarError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to "
                                 f"budget='latency' (got budget={self.budget!r}): drop "
                                 f"{'it' if len(given) == 1 else 'them'} or pass budget='latency'")
            return
        if self.runtime is None:
            set_(self, "runtime", "onnxruntime")
        if self.runtime not in RUNTIMES:
            raise CstarError(f"unknown runtime {self.runtime!r}; choose one of: {', '.join(RUNTIMES)}")
        set_(self, "latency_batch", check_positive_int("latency_batch", self.latency_batch))
        if self.latency_threads is not None:
            set_(self, "latency_threads", check_positive_int("latency_threads", self.latency_threads))

    flops_ratio = old_attribute("RankSpec", "flops_ratio", "macs_ratio")

    def to_dict(self) -> dict:
        """Plain JSON values (lists for tuples)."""
        out = asdict(self)
        for key in ("exclude", "input_shape"):
            if out[key] is not None:
                out[key] = list(out[key])
        if out["layer_weights"] is not None:
            out["layer_weights"] = dict(out["layer_weights"])
        return out


RankSpec.__init__ = accepting_old_names(RankSpec.__init__, MACS, "RankSpec()")


def _checked_weights(weights, method: str) -> tuple[tuple[str, float], ...]:
    """``weights`` (a mapping or pairs) as sorted (name, weight) pairs, each weight a positive finite number."""
    if method != "global":
        raise CstarError(f"layer_weights weigh the global allocation's objective; method={method!r} has none: "
                         "drop layer_weights or use method='global'")
    try:
        pairs = sorted((weights.items() if hasattr(weights, "items") else weights))
    except (TypeError, ValueError):
        raise CstarError(f"layer_weights must map module names to numbers, got {weights!r}") from None
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)
                and math.isfinite(item[1]) and item[1] > 0):
            raise CstarError(f"layer_weights: {item!r} is not a module name with a positive finite weight, "
                             "e.g. {'layer1.0.conv1': 1.5}")
    return tuple((name, float(w)) for name, w in pairs)
