"""``cstar compare``: CSTAR beside robust structured pruning and post-hoc low rank, at equal ratios and budgets.

Every method starts from the same dense robust model and gets the same
adversarial training after it: a first phase of ``search.epochs`` epochs with
the ``search`` settings, then ``finetune.epochs`` epochs with the ``finetune``
settings (same attack, optimiser and schedules for all). What the first phase
trains is the method's own: each method is a function of
:mod:`cstar.pipeline.compressors` (``cstar``, ``hydra``, ``magnitude``,
``lowrank_global``, ``lowrank_uniform``, and any registered there).

``dense`` is the starting model itself (ratio 1). Each (method, ratio) cell
lives in ``<out>/cells/<method>-<ratio>x/`` and is done when its
``result.json`` exists, so a killed comparison resumes where it stopped (a
half-trained cell continues from its last epoch checkpoint). A finished cell
records the training settings and seed it was trained with, and a resume with
other ones is refused (it would mix budgets in one table); a resume with other
evaluation settings (attacks, ``eval_n``, ``eval_step``, ``autoattack_n``)
re-evaluates the cell's saved model and trains nothing; one with more methods
or ratios trains only the new cells. Beside the result, its
``per_example.json`` keeps which test examples the cell's model got right under
each attack, for paired comparisons (:func:`cstar.paired_difference`). The
outputs are ``results.json``, ``comparison.md`` (method x ratio: params, MACs,
clean, PGD, AutoAttack subset, batch-1 latency) and, with matplotlib,
``accuracy_vs_ratio.png`` (accuracy against parameters, MACs and latency).
With ``budget="latency"`` the ratios are speed-ups measured on a runtime, the
cells ``<method>-<S>x-faster``, every method held to a structure timed there
(:mod:`cstar.pipeline.speed`) and every trained model timed there at the end.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import attacks, distributed, lowrank
from .._core import log
from .._core.checks import check_fields, check_ratio, integer
from .._core.errors import CstarError
from .._core.io import atomic_write_text, write_json
from .._core.recorded import check_same
from .._core.renamed import renamed
from ..evaluation.counting import count_macs, count_params
from ..evaluation.evaluate import evaluate, subset_label
from ..files.serialize import load, record_trained_on, save
from ..lowrank._latency import check_runtime
from ..training.fit import TrainConfig
from . import compressors, speed
from .admm import ADMMConfig
from .compare_report import format_comparison, plot_pareto
from .phases import (EVALUATION_RULES, check_dense_not_distilled, check_run, check_sections, settings_from_dict,
                     split_held_out, train_phase, with_data_eps)

# the default methods (the equal-MACs variants and methods registered later are opt-in: compressors.names())
METHODS = ("dense", "cstar", "hydra", "magnitude", "lowrank_global", "lowrank_uniform")
BUDGETS = ("params", "latency")  # what a comparison's ratios are: parameter ratios, or measured speed-ups


@dataclass
class CompareConfig:
    """Settings of a comparison; every compressed method gets ``search`` then ``finetune``
    (with their ``distill``, every method learns alike from the dense model).

    ``dense`` trains the starting model when none is given (``pretrained=False``).

    ``ratios`` are whole-model parameter ratios (dense / compressed), each > 1; with ``budget="latency"``
    they are speed-ups measured on ``runtime`` (``"onnxruntime"``, the default, ``"openvino"`` or ``"eager"``;
    batches of ``latency_batch`` images at ``latency_threads`` threads, default torch's): every method is held
    to a structure that met the speed-up there before training (:mod:`cstar.pipeline.speed`), and every
    cell's trained model is timed there at the end (its row's ``speedup``). Only methods registered with a
    ``speed`` kind take that budget (:func:`cstar.compressors.register`).
    Evaluation: ``eval_attacks`` at radius ``eval_eps`` (None: the training eps, ``finetune.eps``), PGD
    step ``eval_step`` (default eps/4), on the first ``eval_n`` test images (all when None), AutoAttack on
    the first ``autoattack_n`` (0: off), batch-1 CPU latency as the median of ``latency_runs`` eager
    forward passes of every cell's model, measured together when the comparison ends
    (:func:`batch1_latencies_ms`; 0: off).
    """

    ratios: list[float] = field(default_factory=lambda: [4.0, 16.0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    dense: TrainConfig = field(default_factory=TrainConfig)
    search: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.01))
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.01))
    admm: ADMMConfig = field(default_factory=ADMMConfig)
    eval_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])
    eval_eps: float | None = None
    eval_step: float | None = None
    eval_n: int | None = None
    autoattack_n: int = 0
    latency_runs: int = 50
    budget: str = "params"
    runtime: str | None = None
    latency_batch: int = 1
    latency_threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.methods, (list, tuple)) or not self.methods:
            raise CstarError(f"no method to compare in methods={self.methods!r}: choose from dense, "
                             f"{', '.join(compressors.names())}")
        compressors.check_names(sorted(set(self.methods), key=str), allow_dense=True)
        check_sections(self, ("dense", "search", "finetune"))
        check_dense_not_distilled(self.dense, "search or finetune")
        if not isinstance(self.ratios, (list, tuple)) or not self.ratios:
            raise CstarError(f"ratios must be a list of numbers > 1 (dense / compressed), got {self.ratios!r}; "
                             "e.g. [4, 16]")
        self.ratios = [check_ratio(f"ratios[{i}]", r) for i, r in enumerate(self.ratios)]
        check_fields(self, {**EVALUATION_RULES, "latency_runs": integer(0, fix="timed forward passes (0: off)")})
        self._check_budget()

    def _check_budget(self) -> None:
        """A latency budget's settings only with it (RankSpec's checks, :class:`cstar.lowrank.RankSpec`), and
        every method able to meet a speed-up."""
        if self.budget not in BUDGETS:
            raise CstarError(f"unknown budget {self.budget!r} for a comparison; choose one of: {', '.join(BUDGETS)}")
        self.runtime = lowrank.RankSpec(self.ratios[0], **self.latency_budget()).runtime  # None -> onnxruntime
        if self.budget == "latency":
            unable = [m for m in self.methods if m != "dense" and compressors.speed_of(m) is None]
            if unable:
                raise CstarError(f"{', '.join(unable)} cannot be held to a measured speed-up (budget='latency'): drop "
                                 f"{'it' if len(unable) == 1 else 'them'}, or compare at parameter ratios; methods "
                                 f"that can: {', '.join(n for n in compressors.names() if compressors.speed_of(n))}")

    def latency_budget(self) -> dict:
        """``budget`` and its latency settings, as :class:`cstar.lowrank.RankSpec` and
        :class:`cstar.CompressConfig` take them."""
        return {"budget": self.budget, "runtime": self.runtime, "latency_batch": self.latency_batch,
                "latency_threads": self.latency_threads}

    def speed_kinds(self) -> set[str]:
        """How the compressed methods meet a speed-up (:data:`cstar.pipeline.speed.KINDS`); empty for a
        parameter budget."""
        if self.budget != "latency":
            return set()
        return {compressors.speed_of(m) for m in self.methods if m != "dense"}

    @classmethod
    def from_dict(cls, values: dict) -> "CompareConfig":
        """From a nested dict (a YAML preset); unknown keys are an error."""
        return settings_from_dict(cls, values, ("dense", "search", "finetune"), "compare")

    def to_dict(self) -> dict:
        return asdict(self)

    def budget_text(self) -> str:
        """The training budget every compressed model gets, in one line."""
        held = "" if self.budget != "latency" else (
            f"targets are speed-ups measured on {self.runtime} at batch {self.latency_batch}; ")
        return (f"{held}every compressed model: {self.search.summary()} for the method's first phase, then "
                f"{self.finetune.summary()} of fine-tuning, batch {self.finetune.batch_size}")


def check_reachable(dense: nn.Module, config: CompareConfig) -> None:
    """Refuse now a ratio that a rank-planned method of ``config`` cannot reach on ``dense``'s layers (the check
    :func:`cstar.compress` makes, :func:`cstar.lowrank.check_reachable`: from the layers' shapes alone); with a
    latency budget, a runtime that is not installed (whether a speed-up is reachable is known once timed)."""
    if config.budget == "latency":
        check_runtime(config.runtime)
        return
    if any(method in compressors.RANK_PLANNED for method in config.methods):
        for ratio in config.ratios:
            lowrank.check_reachable(dense, lowrank.RankSpec(ratio))


def cell_name(method: str, ratio: float, budget: str = "params") -> str:
    """The directory name of a cell: ``<method>-<ratio>x``, ``<method>-<speed-up>x-faster`` for a latency budget."""
    if method == "dense":
        return "dense"
    return f"{method}-{ratio:g}x" + ("-faster" if budget == "latency" else "")


def _load_cell(cell: Path, row: dict, dense: nn.Module) -> nn.Module:
    """The model that cell ``cell`` (its result ``row``) saved; a copy of ``dense`` is the fresh instance that a
    model of a class cstar cannot build is replayed on (see :func:`cstar.load`)."""
    return load(compressors.cell_model(cell, row), model=copy.deepcopy(dense))


@torch.inference_mode()
def batch1_latencies_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...], runs: int = 50,
                        rounds: int = 5, threads: int = 1) -> dict[str, float]:
    """Median wall time (ms) of an eager forward pass of one image on the CPU, per model.

    Each model gets ``runs`` timed passes (after 5 warm-up passes), taken in
    ``rounds`` interleaved rounds (every model in turn, ``runs / rounds`` passes
    each), so that a change in the machine's load shifts every model alike.
    ``threads`` torch threads (default 1: the least sensitive to other jobs).
    """
    models = {name: copy.deepcopy(m).cpu().eval() for name, m in models.items()}
    x = torch.rand(1, *input_shape)
    times: dict[str, list[float]] = {name: [] for name in models}
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for model in models.values():
            for _ in range(5):
                model(x)
        for r in range(rounds):
            for name, model in models.items():
                for _ in range(runs // rounds + (r < runs % rounds)):
                    t0 = time.perf_counter()
                    model(x)
                    times[name].append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _evaluation_settings(config: CompareConfig) -> dict:
    """What a cell's accuracy figures depend on besides its model (AutoAttack apart)."""
    return {"attacks": list(config.eval_attacks), "eps": config.eval_eps, "step": config.eval_step, "n": config.eval_n}


def _settings_record(settings: TrainConfig | ADMMConfig) -> dict:
    """A phase's settings as recorded in a cell, without the display-only ``progress``."""
    record = settings.to_dict()
    record.pop("progress", None)
    return record


def _training_settings(method: str, config: CompareConfig, seed: int) -> dict:
    """What a cell's model depends on besides the dense model: its phases' settings, the seed and, for a latency
    budget, where the speed-up is measured."""
    phases = {key: _settings_record(getattr(config, key)) for key in compressors.settings_of(method)}
    if config.budget == "latency":
        phases["speed"] = {k: v for k, v in config.latency_budget().items() if k != "budget"}
    return {**phases, "seed": seed}


def current_settings(recorded: dict) -> dict:
    """A cell's training record in today's terms: the settings added to ``cstar`` since it was written at their
    defaults, the renamed ones under their new names."""
    defaults = {"search": _settings_record(TrainConfig()), "finetune": _settings_record(TrainConfig()),
                "admm": _settings_record(ADMMConfig())}
    return {key: {**defaults[key], **renamed(value, "a cell's record", note=False)} if key in defaults else value
            for key, value in recorded.items()}


def _check_same_training(name: str, row: dict, training: dict) -> None:
    """Refuse to mix a finished cell trained otherwise into this comparison (rows from before the record pass)."""
    if "training" not in row:
        return
    check_same(current_settings(row["training"]), training, f"cell {name} was trained",
               "resume with the settings it was trained with, or give a new --out (or delete the cell's directory "
               "to retrain it)")


def _evaluate_attacks(model: nn.Module, test_set, config: CompareConfig, eps: float) -> tuple[dict, dict]:
    """``eval_attacks`` figures (``{"accuracy", "subset", "evaluation"}``) and the per-example results
    (``{"subset", "per_example": {label: str}}``, for paired comparisons between cells)."""
    result = evaluate(model, test_set, config.eval_attacks, eps=eps, step=config.eval_step, n=config.eval_n,
                      per_example=True)
    figures = {"accuracy": result["accuracy"], "subset": result["subset"], "attacks": result["attacks"],
               "evaluation": _evaluation_settings(config)}
    return figures, {"subset": result["subset"], "per_example": result["per_example"]}


def _autoattack(model: nn.Module, test_set, config: CompareConfig, eps: float) -> dict:
    aa = evaluate(model, test_set, ["autoattack"], eps=eps, n=config.autoattack_n, batch_size=100)
    return {"accuracy": next(iter(aa["accuracy"].values())), "subset": aa["subset"], "attacks": aa["attacks"]}


def _measure(model: nn.Module, dense_size: tuple[int, int], test_set, config: CompareConfig, eps: float,
             input_shape: tuple[int, ...]) -> tuple[dict, dict]:
    """A cell's figures and its per-example results; ``dense_size`` is the dense model's (parameters, MACs)."""
    t0 = time.perf_counter()
    figures, per_example = _evaluate_attacks(model, test_set, config, eps)
    row = {"params": count_params(model), "macs": count_macs(model, input_shape), **figures}
    row["params_ratio"] = dense_size[0] / row["params"]
    row["macs_ratio"] = dense_size[1] / row["macs"]
    if config.autoattack_n:
        row["autoattack"] = _autoattack(model, test_set, config, eps)
    row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return row, per_example


def _stale_evaluation(row: dict, config: CompareConfig, test_size: int) -> tuple[bool, bool]:
    """Whether a finished cell's (attack figures, AutoAttack figure) miss the current evaluation settings.

    Rows from before the ``evaluation`` record are judged by their accuracy labels and subset, those from before
    ``eval_eps`` as evaluated at the training eps."""
    if "evaluation" in row:
        attacks_stale = {"eps": config.finetune.eps, **row["evaluation"]} != _evaluation_settings(config)
    else:
        labels = {"clean" if a == "clean" else attacks.parse_attack(a, 1.0).label for a in config.eval_attacks}
        subset = subset_label(config.eval_n, min(config.eval_n or test_size, test_size))
        attacks_stale = set(row["accuracy"]) != labels or row["subset"] != subset
    aa = row.get("autoattack")
    aa_subset = subset_label(config.autoattack_n, min(config.autoattack_n, test_size))
    aa_eps = {s.get("eps", config.finetune.eps) for s in (aa or {}).get("attacks", {}).values()}
    aa_stale = bool(config.autoattack_n) and (aa is None or aa["subset"] != aa_subset
                                              or not aa_eps <= {config.eval_eps})
    return attacks_stale, aa_stale


def _reevaluate(row: dict, cell: Path, dense: nn.Module, test_set, config: CompareConfig, eps: float,
                device: torch.device, attacks_stale: bool, aa_stale: bool) -> dict:
    """A finished cell's row with its saved model evaluated again where the settings changed (nothing trained);
    ``eval_seconds`` adds up every evaluation of the cell."""
    model = _load_cell(cell, row, dense).to(device)
    t0 = time.perf_counter()
    row = dict(row)
    if attacks_stale:
        figures, per_example = _evaluate_attacks(model, test_set, config, eps)
        row.update(figures)
        if distributed.is_main():
            write_json(cell / "per_example.json", per_example)
    if aa_stale:
        row["autoattack"] = _autoattack(model, test_set, config, eps)
    row["eval_seconds"] = round(row.get("eval_seconds", 0.0) + time.perf_counter() - t0, 1)
    return row


def compare(dense: nn.Module, train_set, test_set, config: CompareConfig, out_dir: str | Path, *,
            pretrained: bool = True, val_size: int = 1000, seed: int = 0) -> dict:
    """Run every (method, ratio) cell from the dense robust model ``dense``; return the results.

    ``pretrained=False`` first trains ``dense`` in place with ``config.dense``
    (into ``<out>/dense_train``, resumable); otherwise it is left untouched.
    ``train_set``/``test_set`` are :mod:`cstar.data` datasets; the last
    ``val_size`` training images are held out for the per-epoch robustness check
    (of an image-folder dataset, the first ``val_size`` of its validation folder).
    Finished cells are read back, not rerun.
    """
    out = check_run(config, CompareConfig, train_set, test_set, out_dir, val_size, seed)
    check_reachable(dense, config)
    config = with_data_eps(config, train_set.spec, ("dense", "search", "finetune"))
    cells_dir = out / "cells"
    if distributed.is_main():
        cells_dir.mkdir(parents=True, exist_ok=True)
        write_json(out / "compare_config.json", config.to_dict())
    distributed.barrier()
    device = next(dense.parameters()).device
    eps = config.eval_eps
    input_shape = tuple(train_set.spec.image_shape)
    train_part, val = split_held_out(train_set, val_size, device, test_set)
    if not pretrained:
        train_phase(dense, train_part, val, config.dense, out / "dense_train", resume=True, seed=seed,
                    name=f"{out.name} dense_train")
        record_trained_on(dense, train_set.spec.name, config.dense.eps)
    dense_size = (count_params(dense), count_macs(dense, input_shape))
    # a latency budget's structures, chosen (timed) once before any cell trains, or read back on a resume
    targets = speed.speed_targets(dense, config, input_shape, out) if config.speed_kinds() else {}

    cells = {}
    for method in config.methods:
        for ratio in ([1.0] if method == "dense" else config.ratios):
            name = cell_name(method, ratio, config.budget)
            cell = cells_dir / name
            result_path = cell / "result.json"
            training = None if method == "dense" else _training_settings(method, config, seed)
            if result_path.exists():
                row = json.loads(result_path.read_text())
                if training is not None:
                    _check_same_training(name, row, training)
                stale = _stale_evaluation(row, config, len(test_set))
                if any(stale):
                    what = " and ".join(w for w, s in zip(("attacks", "AutoAttack"), stale) if s)
                    log.info(f"{name}: done earlier; evaluating its {what} under the new evaluation settings")
                    row = _reevaluate(row, cell, dense, test_set, config, eps, device, *stale)
                    if distributed.is_main():
                        write_json(result_path, row)
                    distributed.barrier()
                else:
                    log.info(f"{name}: done earlier")
                cells[name] = row
                continue
            if distributed.is_main():
                cell.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            log.info(f"{name}: running")
            if method == "dense":
                model, seconds, saved = copy.deepcopy(dense), {}, None
            else:
                job = compressors.Cell(dense, ratio, train_set, train_part, val, config.search, config.finetune,
                                       config.admm, cell, seed, speed=targets.get(ratio))
                model, seconds = compressors.get(method)(job)
                saved = job.model_dir  # where the method saved its model, if it did (cstar's compress does)
                record_trained_on(model, train_set.spec.name, eps)
            model_dir = compressors.recorded_model_dir(cell, saved)
            figures, per_example = _measure(model, dense_size, test_set, config, eps, input_shape)
            row = {"method": method, "target_ratio": ratio, "train_seconds": seconds, "model_dir": model_dir,
                   **({} if training is None else {"training": training}), **figures}
            for key in ("pruning", "conditioning"):  # what a method says of its model, e.g. HYDRA's moved channels
                if hasattr(model, f"cstar_{key}"):
                    row[key] = getattr(model, f"cstar_{key}")
            if method != "dense" and ratio in targets:
                row["speed_target"] = targets[ratio].record(compressors.speed_of(method))
            if distributed.is_main():
                if saved is None:  # saved once: a model its method saved is not saved again
                    save(model, cell / "model")
                write_json(cell / "per_example.json", per_example)
                write_json(result_path, row)  # last: its existence marks the cell done
            distributed.barrier()
            cells[name] = row
            log.info(f"{name}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in row["accuracy"].items())
                     + f", {row['params_ratio']:.2f}x params")

    measured = None
    if (config.latency_runs or config.budget == "latency") and distributed.is_main():
        # all cells at once, interleaved: comparable under drifting load
        saved = {name: _load_cell(cells_dir / name, row, dense) for name, row in cells.items()}
        if config.latency_runs:
            for name, ms in batch1_latencies_ms(saved, input_shape, config.latency_runs).items():
                cells[name]["latency_ms"] = round(ms, 3)
        if config.budget == "latency":  # the speed-up each trained model runs at, on the budget's runtime
            speedups, measured = speed.measured_speedups(dense, saved, input_shape, config)
            for name, figures in speedups.items():
                cells[name].update(figures)
    results = {"config": config.to_dict(), "budget": config.budget_text(), "eps": eps,
               "train_eps": config.finetune.eps, "cells": cells, **({"speed": measured} if measured else {})}
    if distributed.is_main():
        write_json(out / "results.json", results)
        atomic_write_text(out / "comparison.md", format_comparison(results))
        plot_pareto(results, out / "accuracy_vs_ratio.png")
    return results
