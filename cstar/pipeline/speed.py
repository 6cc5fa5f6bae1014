"""A comparison at measured speed-ups (``CompareConfig(budget="latency")``): the structure each method is held to.

Every method meets the same speed-up on the same runtime, each in its own way
(its ``speed`` kind, :func:`cstar.compressors.register`):

- ``"global"`` / ``"uniform"``: the rank plan of ``select_ranks(dense, S,
  budget="latency", method=...)`` (ranks timed on the runtime, the plan timed
  whole; :mod:`cstar.lowrank._latency`), shared by every low-rank method of
  that allocation, so CSTAR and post-hoc low rank train the same ranks;
- ``"pruning"``: the parameter ratio at which filter-norm channel pruning's
  structure meets the speed-up (:func:`cstar.prune.ratio_for_speedup`); a
  learned pruning (HYDRA, HARP) prunes to that ratio, its own channels. When
  a rank plan is chosen too, the pruned structure is held to run at least as
  fast as the plan's factorised structure, timed side by side with it: the
  dense model's own time swings most on a shared machine, so structures each
  timed against it alone ended 1.7x apart in speed here.

They are chosen once per speed-up, before any training, and written to
``<out>/speed_targets/`` (``<S>x-global.json``, ``<S>x-uniform.json``: rank
plans; ``<S>x-pruning.json``), so a resumed comparison trains the structures it
started with instead of timing afresh (timings move by several percent from
run to run). The files are read back as data and checked against the dense
model and the settings. When the comparison ends, every cell's model is timed
on the runtime in a pair with the dense model (:func:`measured_speedups`,
three times over): the speed-up each row reports is measured on the trained
model, with its range.
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed, lowrank, prune
from .._core.errors import CstarError
from .._core.io import write_json
from ..lowrank import RankPlan, RankSpec
from ..lowrank._latency import where_timed

KINDS = ("global", "uniform", "pruning")  # the ways a method meets a speed-up (compressors.register(speed=...))
SPEED_REPEATS = 3  # interleaved timings of every trained model at the end; the row gives their median and range


@dataclass
class SpeedTarget:
    """What the methods of a comparison are held to at one measured speed-up: ``budget`` (where it is measured:
    the latency settings of :class:`cstar.CompressConfig` and :class:`cstar.lowrank.RankSpec`, ``ratio``
    apart), ``plans`` (rank plans by allocation, ``"global"`` / ``"uniform"``) and ``pruning`` (the parameter
    ratio of channel pruning)."""

    speedup: float
    budget: dict
    plans: dict[str, RankPlan] = field(default_factory=dict)
    pruning: prune.PruningSpeed | None = None

    def record(self, kind: str) -> dict:
        """What a cell of method kind ``kind`` records of its target: the structure's measured speed-up when it
        was chosen, and (pruning) the parameter ratio."""
        if kind == "pruning":
            return {"kind": kind, "params_ratio": self.pruning.params_ratio,
                    "speedup_when_chosen": self.pruning.speedup, "measured_on": self.pruning.measured_on,
                    "held_to": "dense" if self.pruning.reference_ms is None else "the rank plan's structure"}
        plan = self.plans[kind]
        return {"kind": kind, "params_ratio": plan.achieved_ratio, "speedup_when_chosen": plan.achieved_speedup,
                "measured_on": plan.measured_on}


def _file(folder: Path, speedup: float, kind: str) -> Path:
    return folder / f"{speedup:g}x-{kind}.json"


def _read_or_choose(dense: nn.Module, config, speedup: float, kind: str, input_shape: tuple[int, ...],
                    folder: Path, reference: RankPlan | None = None):
    """The ``kind`` structure for ``speedup``: read from ``folder`` where an earlier run chose it, else chosen
    (timed; a pruning held to ``reference``'s factorised structure when given) and written there."""
    path = _file(folder, speedup, kind)
    if kind == "pruning":
        if path.exists():
            try:
                values = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                values = None
            target = prune.PruningSpeed.from_dict(values, str(path))
            _check_recorded(path, target.target_speedup, target.measured_on, speedup, config)
            return target
        target = prune.ratio_for_speedup(dense, speedup, input_shape, runtime=config.runtime,
                                         batch=config.latency_batch, threads=config.latency_threads,
                                         reference=None if reference is None else lowrank.decompose(dense, reference))
        write_json(path, target.to_dict())
        return target
    spec = RankSpec(speedup, method=kind, **config.latency_budget())
    if path.exists():
        plan = RankPlan.load(path)
        lowrank.check_plan(dense, plan, spec)
        _check_recorded(path, plan.target_ratio, plan.measured_on, speedup, config)
        return plan
    plan = lowrank.select_ranks(dense, spec)
    plan.save(path)
    return plan


def _where(config) -> str:
    """Where ``config``'s timings are taken, in words (runtime and version, CPU, threads, batch)."""
    return where_timed(config.runtime, config.latency_threads or torch.get_num_threads(), config.latency_batch)


def _check_recorded(path: Path, target: float, measured_on: str, speedup: float, config) -> None:
    """Refuse a structure chosen for another speed-up, or timed elsewhere than ``config``'s timings would be (another
    runtime, version, CPU, thread count or batch: its speed-up does not carry over)."""
    if abs(target - speedup) > 1e-9 * speedup or measured_on != _where(config):
        raise CstarError(f"{path} was chosen for {target:g}x measured with {measured_on}, not for this comparison's "
                         f"{speedup:g}x with {_where(config)}: resume where and as it was made, or give a new --out")


def speed_targets(dense: nn.Module, config, input_shape: tuple[int, ...], out: Path) -> dict[float, SpeedTarget]:
    """The :class:`SpeedTarget` of every speed-up of ``config.ratios`` for the ways its methods meet one
    (``config.speed_kinds()``), chosen on the main process (read back from ``out/speed_targets`` where chosen
    before) and shared with the others."""
    targets, kinds = None, config.speed_kinds()
    if distributed.is_main():
        folder = out / "speed_targets"
        folder.mkdir(parents=True, exist_ok=True)
        dense_cpu = copy.deepcopy(dense).cpu().eval()
        targets = {}
        for speedup in config.ratios:
            target = SpeedTarget(speedup, config.latency_budget())
            for kind in sorted(kinds - {"pruning"}):  # "global", "uniform": the rank plans first
                target.plans[kind] = _read_or_choose(dense_cpu, config, speedup, kind, input_shape, folder)
            if "pruning" in kinds:
                reference = target.plans.get("global") or target.plans.get("uniform")
                target.pruning = _read_or_choose(dense_cpu, config, speedup, "pruning", input_shape, folder,
                                                 reference)
            targets[speedup] = target
    return distributed.broadcast_object(targets)


def measured_speedups(dense: nn.Module, models: dict[str, nn.Module], input_shape: tuple[int, ...],
                      config, repeats: int = SPEED_REPEATS) -> tuple[dict[str, dict], dict]:
    """Every model of ``models`` timed on the comparison's runtime beside ``dense``, in a pair with it (as the
    structures were chosen), ``repeats`` times over: per name, ``{"runtime_ms", "speedup", "speedup_range"}``
    (medians over the repeats of the model's time and of dense / model time; the lowest and highest of those
    ratios), and the dense model's time and where it was taken. The range is the figure's spread on this
    machine: a sub-millisecond graph's speed-up moved by a third between timings a second apart here, and more
    with other large models timed in between (the dense model's memory-bound layers swing most)."""
    figures, dense_times = {}, []
    for name, model in models.items():
        runs = [lowrank.model_latencies_ms({"__dense__": dense, name: model}, input_shape, config.runtime,
                                           config.latency_batch, config.latency_threads) for _ in range(repeats)]
        dense_times += [run["__dense__"] for run in runs]
        ratios = sorted(run["__dense__"] / run[name] for run in runs)
        figures[name] = {"runtime_ms": round(statistics.median(run[name] for run in runs), 4),
                         "speedup": round(statistics.median(ratios), 4),
                         "speedup_range": [round(ratios[0], 4), round(ratios[-1], 4)]}
    return figures, {"runtime": config.runtime, "dense_ms": round(statistics.median(dense_times), 4),
                     "measured_on": _where(config), "repeats": repeats}
