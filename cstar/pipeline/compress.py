"""The CSTAR pipeline (Algorithm 2): a dense robust model in, a compact robust one out.

Phases, each recorded in ``<out>/phases.json`` when it completes, so that
``resume=True`` skips what is done and continues a half-done training phase from
its last epoch checkpoint:

1. ``dense``: adversarial training of the dense model (skipped for a pretrained one);
2. ``ranks``: global rank selection for the target ratio (``plan.json``);
3. ``search``: ADMM adversarial training under the rank constraints (the ``search`` settings);
4. ``decompose``: final projection, then exact decomposition into factorised layers;
5. ``finetune``: adversarial fine-tuning of the factorised model;
6. ``evaluate``: clean and robust accuracy of every phase's model, at ``eval_eps``.

The outputs are a saved model (``<out>/model``, :func:`cstar.save` format),
``results.json`` and ``report.md`` (with PNG plots when matplotlib is installed).

Under torchrun (:mod:`cstar.distributed`) every rank runs every phase on its
shard of the training set; rank 0 alone writes files and its rank plan is
broadcast, so all ranks build the same factorised model. ``resume`` then needs
``out_dir`` on a filesystem every rank can read.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import distributed
from .._core import log
from .._core.errors import CstarError
from .._core.io import load_checkpoint, save_checkpoint, write_json
from .._core.checks import check_fields
from .phases import (EVALUATION_RULES, PhaseLedger, check_dense_not_distilled, check_run, check_sections, settings_from_dict, split_held_out, train_phase, training_loader, with_data_eps)
from .._core.renamed import COMPRESS, accepting_old_names, old_attribute, renamed_value
from .._core.precision import full_float32
from .admm import ADMM, ADMMConfig
from ..evaluation.counting import count_macs, count_params
from ..evaluation.evaluate import attack_specs, evaluate
from ..lowrank import RankPlan, RankSpec, check_plan, check_reachable, decompose, select_ranks
from ..models import normalization_of
from .report import write_report
from ..files.serialize import record_trained_on, save
from ..training.fit import TrainConfig

EVAL_PHASES = ("dense", "admm_projected", "final")


@dataclass
class CompressConfig:
    """Settings of a compression run.

    ``ratio`` is the target whole-model dense/compressed parameters (``budget="params"``),
    MACs (``"macs"``), parameters with ``macs_ratio`` on MACs (``"joint"``), or the
    speed-up measured on ``runtime`` with batches of ``latency_batch`` images at
    ``latency_threads`` threads (``"latency"``; see :class:`cstar.lowrank.RankSpec`).
    ``layer_weights`` weigh the global rank allocation's layers (see
    :class:`cstar.lowrank.RankSpec`; e.g. :func:`cstar.lowrank.layer_sensitivity`).
    ``dense`` trains the dense model when none is given; ``search`` and
    ``finetune`` are the adversarial training settings of phases 3 and 5; their
    ``distill`` learns from the dense model (adversarial distillation).
    Evaluation: ``eval_attacks`` at radius ``eval_eps`` (None: the training eps, ``finetune.eps``; steps
    ``eval_step``: one for every PGD attack, or ``{attack: step}`` for the attacks named; PGD-k's default
    ``max(eps/4, 2.5*eps/k)``) of the
    models of ``eval_phases`` (a subset of :data:`EVAL_PHASES`) on the first
    ``eval_n`` test images (all when None); AutoAttack on the first ``autoattack_n`` for the final model (0: off).
    """

    ratio: float = 8.0
    budget: str = "params"
    macs_ratio: float | None = None
    rank_method: str = "global"
    exclude: list[str] | None = None
    min_rank: int = 1
    multiple_of: int | None = None
    layer_weights: dict[str, float] | None = None
    runtime: str | None = None
    latency_batch: int = 1
    latency_threads: int | None = None
    dense: TrainConfig = field(default_factory=TrainConfig)
    search: TrainConfig = field(default_factory=TrainConfig)
    admm: ADMMConfig = field(default_factory=ADMMConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=5, lr=0.01))
    eval_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20"])
    eval_eps: float | None = None
    eval_step: float | dict[str, float] | None = None
    eval_phases: list[str] = field(default_factory=lambda: list(EVAL_PHASES))
    eval_n: int | None = None
    autoattack_n: int = 0

    @classmethod
    def from_dict(cls, values: dict) -> "CompressConfig":
        """From a nested dict (a YAML preset); unknown keys are an error."""
        return settings_from_dict(cls, values, ("dense", "search", "finetune"), "compress", COMPRESS)

    def __post_init__(self) -> None:
        self.budget = renamed_value(self.budget, "budget", "CompressConfig()")
        check_sections(self, ("dense", "search", "finetune"))
        check_fields(self, EVALUATION_RULES)
        self.rank_spec()  # ratio, budget, exclude...: RankSpec's own checks, the same as select_ranks'
        if not isinstance(self.eval_phases, (list, tuple)):
            raise CstarError(f"eval_phases must be a list of phases, got {self.eval_phases!r}; "
                             f"e.g. {list(EVAL_PHASES)}")
        unknown = sorted(set(self.eval_phases) - set(EVAL_PHASES))
        if unknown:
            raise CstarError(f"unknown evaluation phase(s) {', '.join(unknown)}: choose from {', '.join(EVAL_PHASES)}")
        check_dense_not_distilled(self.dense, "search or finetune")

    admm_train = old_attribute("CompressConfig", "admm_train", "search")
    flops_ratio = old_attribute("CompressConfig", "flops_ratio", "macs_ratio")

    def to_dict(self) -> dict:
        return asdict(self)

    def rank_spec(self) -> RankSpec:
        """The rank-plan target of these settings (validated)."""
        return RankSpec(self.ratio, budget=self.budget, macs_ratio=self.macs_ratio, method=self.rank_method,
                        exclude=self.exclude, min_rank=self.min_rank, multiple_of=self.multiple_of,
                        layer_weights=self.layer_weights, runtime=self.runtime, latency_batch=self.latency_batch,
                        latency_threads=self.latency_threads)


CompressConfig.__init__ = accepting_old_names(CompressConfig.__init__, COMPRESS, "CompressConfig()")


def plan_ahead(model: nn.Module, spec: RankSpec, *, pretrained: bool, plan: RankPlan | None = None
               ) -> RankPlan | None:
    """What a compression run knows of its ranks before any training or file; refuses in one line.

    A given ``plan`` is checked against ``model`` and ``spec``
    (:func:`cstar.lowrank.check_plan`) and returned. For a ``pretrained``
    model, whose weights the ranks phase would read unchanged, the plan is
    selected now (the run's one selection) and returned. Otherwise the ranks
    wait for the trained weights: ``spec`` is checked reachable from the
    layers' shapes alone (:func:`cstar.lowrank.check_reachable`) and None is
    returned.
    """
    if plan is not None:
        check_plan(model, plan, spec)
        return plan
    if pretrained:
        return select_ranks(model, spec)
    check_reachable(model, spec)
    return None


def compress(model: nn.Module, train_set, test_set, config: CompressConfig, out_dir: str | Path, *,
             pretrained: bool = False, resume: bool = False, val_size: int = 1000, seed: int = 0,
             plan: RankPlan | None = None) -> dict:
    """Run the CSTAR pipeline on ``model`` (trained in place) and return the results dict.

    ``train_set``/``test_set`` are :mod:`cstar.data` datasets. ``pretrained=True``
    skips dense training. The last ``val_size`` training images are held out for
    the per-epoch robustness check (of an image-folder dataset, the first
    ``val_size`` of its validation folder, ``test_set``). Files go to ``out_dir``
    (see the module docstring). ``plan``: ranks chosen beforehand for this model,
    e.g. learned ones; recorded by the ranks phase instead of a selection (a
    resumed run whose ranks phase is done keeps its ``plan.json``); refused in one
    line if it does not match the model's layers or the config's target/budget.
    """
    if plan is not None and not isinstance(plan, RankPlan):
        raise CstarError(f"plan must be a cstar.RankPlan (from select_ranks or learn_ranks), got {type(plan).__name__}")
    out = check_run(config, CompressConfig, train_set, test_set, out_dir, val_size, seed)
    config = with_data_eps(config, train_set.spec, ("dense", "search", "finetune"))
    if config.eval_phases:  # bad attacks are refused, and a too-short step warned about, before any training
        attack_specs(config.eval_attacks, config.eval_eps, step=config.eval_step)
    main = distributed.is_main()  # under torchrun only rank 0 writes files and prints
    spec = config.rank_spec()
    phases = PhaseLedger(out, resume)
    ahead = None  # refused now, before training and before any file is written; the plan, when known already
    if "ranks" not in phases.done:
        ahead = plan_ahead(model, spec, pretrained=pretrained and "dense" not in phases.done, plan=plan)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier()  # every rank has read phases.json before rank 0 updates it
    device = next(model.parameters()).device
    train_part, val = split_held_out(train_set, val_size, device, test_set)
    if main:
        write_json(out / "compress_config.json", config.to_dict())

    # 1. dense: trained here, or given (recorded as it is)
    def dense() -> tuple[None, dict]:
        info = {"seconds": 0.0, "trained": False}
        if not pretrained:
            history, seconds = train_phase(model, train_part, val, config.dense, out / "dense", resume, seed=seed)
            info = {"seconds": round(seconds, 1), "trained": True, "epochs": len(history)}
        if main:
            save_checkpoint(out / "dense.pt", {"model": model.state_dict()})
        return None, info

    phases.run("dense", dense, lambda: model.load_state_dict(_weights(out / "dense.pt", device)))
    dense_model = copy.deepcopy(model)

    # 2. ranks
    def ranks() -> tuple[RankPlan, dict]:
        t0 = time.perf_counter()
        chosen = distributed.broadcast_object(ahead if ahead is not None else select_ranks(model, spec) if main else None)
        if main:
            chosen.save(out / "plan.json")
        return chosen, {"seconds": round(time.perf_counter() - t0, 2), "achieved_ratio": chosen.achieved_ratio,
                        "achieved_macs_ratio": chosen.achieved_macs_ratio,
                        **({} if chosen.achieved_speedup is None else {"achieved_speedup": chosen.achieved_speedup})}

    plan = phases.run("ranks", ranks, lambda: RankPlan.load(out / "plan.json"))
    if main:
        log.info(plan.table())

    # 3. search: ADMM training
    steps_per_epoch = len(training_loader(train_part, config.search, "cpu", seed))  # counted, not moved
    admm = ADMM(model, plan, config.admm, steps_per_epoch,
                rank_spec=spec if config.admm.reselect else None,
                condition_weight=config.search.condition_weight, max_condition=config.search.max_condition)
    search_dir = out / "admm" if resume and (out / "admm").is_dir() else out / "search"  # "admm": a run of old

    def search() -> tuple[None, dict]:
        history, seconds = train_phase(model, train_part, val, config.search, search_dir, resume, hooks=[admm],
                                       seed=seed, name="search", teacher=dense_model)
        if main:
            save_checkpoint(out / "admm.pt", {"model": model.state_dict(), "admm": admm.state_dict()})
        return None, {"seconds": round(seconds, 1), "epochs": len(history), "z_steps": admm.z_steps,
                      "final_residual": admm.residuals(model)}

    def admm_load() -> None:
        state = load_checkpoint(out / "admm.pt", map_location=device)
        model.load_state_dict(state["model"])
        admm.load_state_dict(state["admm"])

    phases.run("search", search, admm_load)
    plan = admm.plan  # ranks may have been re-selected

    # 4. projection and exact decomposition
    def project() -> tuple[nn.Module, dict]:
        t0 = time.perf_counter()
        admm.project_weights(model)
        factorised = decompose(model, plan).to(device)
        gap = _output_gap(model, factorised, test_set if test_set is not None else train_set, device)
        if main:
            save_checkpoint(out / "decomposed.pt", {"model": factorised.state_dict()})
        return factorised, {"seconds": round(time.perf_counter() - t0, 2), "output_gap": gap,
                            "params": count_params(factorised)}

    def decomposed() -> nn.Module:
        factorised = decompose(model, plan).to(device)
        factorised.load_state_dict(_weights(out / "decomposed.pt", device))
        return factorised

    factorised = phases.run("decompose", project, decomposed)
    distributed.broadcast_tensors(list(factorised.state_dict().values()))  # rank 0's projection on every rank
    projected = copy.deepcopy(factorised)

    # 5. fine-tuning
    def finetune() -> tuple[None, dict]:
        history, seconds = train_phase(factorised, train_part, val, config.finetune, out / "finetune", resume,
                                       seed=seed, teacher=dense_model)
        if main:  # the final weights (maybe a best epoch)
            save_checkpoint(out / "finetuned.pt", {"model": factorised.state_dict()})
        return None, {"seconds": round(seconds, 1), "epochs": len(history)}

    phases.run("finetune", finetune, lambda: factorised.load_state_dict(_weights(out / "finetuned.pt", device)))
    if main:  # the saved model says what it was compressed to, and what it reached
        factorised.cstar_compression = {"target_ratio": config.ratio, "budget": config.budget,
                                        "achieved_ratio": count_params(dense_model) / count_params(factorised),
                                        "plan_ratio": plan.achieved_ratio, "plan_macs_ratio": plan.achieved_macs_ratio}
        record_trained_on(factorised, train_set.spec.name, config.finetune.eps)
        save(factorised, out / "model")

    # 6. evaluation
    def evaluation() -> tuple[None, dict]:
        t0 = time.perf_counter()
        evaluations = _evaluate_phases(dense_model, projected, factorised, test_set, config)
        return None, {"seconds": round(time.perf_counter() - t0, 1), "results": evaluations}

    phases.run("evaluate", evaluation, lambda: None)
    results = _results(phases.done, plan, dense_model, factorised, config,
                       getattr(getattr(train_set, "spec", None), "name", None))
    if main:
        write_json(out / "results.json", results)
        write_report(out, results, plan, admm.history)
    distributed.barrier()  # the outputs are complete when any rank returns
    return results


def _weights(path: Path, device: torch.device) -> dict:
    """The model weights of a phase's checkpoint, on ``device``."""
    return load_checkpoint(path, map_location=device)["model"]


@torch.no_grad()
def _output_gap(projected_dense: nn.Module, factorised: nn.Module, data, device) -> float | None:
    """Largest absolute logit difference between the projected dense model and its decomposition, on the
    first 64 images of ``data`` (None for data without an ``images`` tensor, e.g. an image folder), in full
    float32 on every device."""
    if not hasattr(data, "images"):
        return None
    x = data.images[:64].to(device)
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    projected_dense.eval()
    factorised.eval()
    with full_float32():  # TF32 would add about 1e-3 on a GPU: the gap measures the decomposition alone
        return (projected_dense(x) - factorised(x)).abs().max().item()


def _evaluate_phases(dense, projected, final, test_set, config: CompressConfig) -> dict:
    eps = config.eval_eps
    evaluations = {}
    for phase, model in (("dense", dense), ("admm_projected", projected), ("final", final)):
        if phase not in config.eval_phases:
            continue
        result = evaluate(model, test_set, config.eval_attacks, eps=eps, step=config.eval_step, n=config.eval_n)
        evaluations[phase] = result
        if distributed.is_main():
            log.info(f"{phase}: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in result["accuracy"].items()))
    if config.autoattack_n:
        evaluations["final_autoattack"] = evaluate(final, test_set, ["autoattack"], eps=eps, n=config.autoattack_n,
                                                   batch_size=100)
    return evaluations


def _budget_text(config: CompressConfig) -> str:
    return f"ADMM {config.search.summary()}, then fine-tuning {config.finetune.summary()}, batch " \
           f"{config.finetune.batch_size}"


def _results(done: dict, plan: RankPlan, dense: nn.Module, final: nn.Module, config: CompressConfig,
             dataset: str | None = None) -> dict:
    shape = plan.input_shape
    dense_params, final_params = count_params(dense), count_params(final)
    recorded = config.to_dict()
    if not done.get("dense", {}).get("trained", True):
        recorded["dense"] = None  # a given dense model: no dense training ran
    evaluations = done.get("evaluate", {}).get("results", {})
    results = {
        "config": recorded,
        "params": {"dense": dense_params, "compressed": final_params, "ratio": dense_params / final_params},
        "phases": {name: {k: v for k, v in info.items() if k != "results"} for name, info in done.items()},
        "accuracy": {phase: r["accuracy"] for phase, r in evaluations.items()},
        "eval_subset": {phase: r["subset"] for phase, r in evaluations.items()},
        "attacks": {label: settings for r in evaluations.values() for label, settings in r.get("attacks", {}).items()},
        "plan": {"target_ratio": plan.target_ratio, "budget": plan.budget, "achieved_ratio": plan.achieved_ratio,
                 "achieved_macs_ratio": plan.achieved_macs_ratio,
                 **({} if plan.achieved_speedup is None else {"achieved_speedup": plan.achieved_speedup,
                                                              "measured_on": plan.measured_on})},
        "threat_model": {"dataset": dataset, "eps": config.eval_eps, "train_eps": config.finetune.eps,
                         "budget": _budget_text(config), "normalization": normalization_of(dense)},
    }
    if shape is not None:
        dense_macs, final_macs = count_macs(dense, shape), count_macs(final, shape)
        results["macs"] = {"dense": dense_macs, "compressed": final_macs, "ratio": dense_macs / final_macs}
    return results
