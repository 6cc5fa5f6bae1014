"""Does ADMM pay as fine-tuning grows? CSTAR and post-hoc low rank at equal total budget, against fine-tuning epochs.

Usage (after ``cstar compare ... --methods ...,cstar,lowrank_global --out DIR`` has finished its cells):
    python benchmarks/bench_finetune_budget.py --compare DIR --ratio 32 --budgets 0,1,4 \\
        --out benchmarks/results/finetune_budget_cifar10_32x

Both methods start from their comparison cell's first phase, which has the
same number of epochs: CSTAR's ADMM training projected and decomposed
(``cells/cstar-<R>x/cstar/decomposed.pt``), post-hoc low rank's global-rank
factors after its first fine-tuning phase (``cells/lowrank_global-<R>x/search``).
Each is then fine-tuned (on the CPU) for every budget of ``--budgets`` epochs with the
comparison's ``finetune`` settings (a fresh schedule over those epochs, the
comparison's data split and seed; budget 0: no fine-tuning) and evaluated with
the comparison's attacks on its test images. The comparison's own cells add
their budget (the ``finetune.epochs`` of the comparison). At every budget the
two methods have trained the same number of epochs after the dense model.
CSTAR minus post-hoc is paired over the same test images
(:func:`cstar.paired_difference`). Each fine-tuning run resumes from its
checkpoint in ``<out>_runs/``; ``<out>.json`` and ``<out>.md`` hold the
figures, the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from cstar import CompareConfig, CstarError, data, decompose, evaluate, load, paired_difference, select_ranks
from cstar.cli import parse_args
from cstar.lowrank import RankPlan
from cstar.pipeline.phases import split_held_out, train_phase
from cstar.records import cell_name, machine, write_json, write_text

METHODS = ("cstar", "lowrank_global")


def _checkpoint(path: Path) -> dict:
    """A checkpoint cstar wrote: tensors and plain values only (weights_only), on the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def starting_models(compare_dir: Path, dense: torch.nn.Module, ratio: float) -> dict[str, torch.nn.Module]:
    """Each method's model after its first phase, rebuilt from the comparison's cell (nothing trained)."""
    cstar_cell = compare_dir / "cells" / cell_name("cstar", ratio) / "cstar"
    posthoc_cell = compare_dir / "cells" / cell_name("lowrank_global", ratio)
    admm = decompose(copy.deepcopy(dense), RankPlan.load(cstar_cell / "plan.json"))
    admm.load_state_dict(_checkpoint(cstar_cell / "decomposed.pt")["model"])
    posthoc = decompose(copy.deepcopy(dense), select_ranks(dense, ratio, method="global"))
    state = _checkpoint(posthoc_cell / "search" / "checkpoint.pt")
    if state["partial"] is not None or state["epoch"] != state["config"]["epochs"]:
        raise CstarError(f"{posthoc_cell}/search has not finished its phase: finish the comparison first")
    posthoc.load_state_dict(state["model"])
    return {"cstar": admm, "lowrank_global": posthoc}


def fine_tune(model: torch.nn.Module, epochs: int, config: CompareConfig, train_part, val, out: Path, seed: int,
              teacher: torch.nn.Module) -> float:
    """Fine-tune ``model`` in place for ``epochs`` with the comparison's ``finetune`` settings (resumable in
    ``out``), as a comparison cell's second phase does; returns its training seconds."""
    settings = dataclasses.replace(config.finetune, epochs=epochs)
    _, seconds = train_phase(model, train_part, val, settings, out, resume=True, seed=seed,
                             name=f"{out.name}", teacher=teacher)
    return seconds


def cell_figures(compare_dir: Path, method: str, ratio: float) -> dict:
    """The comparison cell's own accuracy and per-example results (its ``finetune.epochs`` budget)."""
    cell = compare_dir / "cells" / cell_name(method, ratio)
    row = json.loads((cell / "result.json").read_text())
    per_example = json.loads((cell / "per_example.json").read_text())
    return {"accuracy": row["accuracy"], "per_example": per_example["per_example"], "subset": row["subset"],
            "seconds": row["train_seconds"]["finetune"], "from": str(cell)}


def percent(accuracy: dict[str, float]) -> str:
    """``{"clean": 0.451, "pgd20": 0.304}`` -> ``"45.10 / 30.40"``."""
    return " / ".join(f"{100 * v:.2f}" for v in accuracy.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, required=True, help="a finished cstar compare --out directory")
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("--budgets", default="0,1,4", help="fine-tuning epochs to run (the comparison's own added)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    if any(b < 0 for b in budgets):
        raise SystemExit("error: --budgets are epochs >= 0, e.g. 0,1,4")

    run = parse_args(["compare", "--resume", "--out", str(args.compare)])  # the comparison's own settings
    if not run.checkpoint:
        raise SystemExit(f"error: {args.compare} trained its own dense model; this benchmark rebuilds the cells "
                         "from a comparison run with --checkpoint")
    config = CompareConfig.from_dict(json.loads((args.compare / "compare_config.json").read_text()))
    for method in METHODS:
        if not (args.compare / "cells" / cell_name(method, args.ratio) / "result.json").exists():
            raise SystemExit(f"error: {args.compare} has no finished {cell_name(method, args.ratio)} cell: run the "
                             f"comparison with --methods ...,{method} --ratios {args.ratio:g} first")
    device = torch.device("cpu")
    train_set = data.load(run.data, run.root, split="train")  # as the comparison read them (cstar compare)
    train_set = train_set.take(run.train_n) if run.train_n else train_set
    test_set = data.load(run.data, run.root, split="test")
    eps = train_set.spec.eps if run.eps is None else run.eps
    dense = load(run.checkpoint).to(device)
    train_part, val = split_held_out(train_set, run.val_size, device, test_set)
    starts = starting_models(args.compare, dense, args.ratio)
    runs_dir = args.out.parent / f"{args.out.name}_runs"

    rows = {m: {} for m in METHODS}
    for method in METHODS:
        rows[method][config.finetune.epochs] = cell_figures(args.compare, method, args.ratio)
    for budget in budgets:
        for method in METHODS:
            if budget in rows[method]:
                continue
            model = copy.deepcopy(starts[method])
            seconds = 0.0 if budget == 0 else fine_tune(model, budget, config, train_part, val,
                                                        runs_dir / f"{method}-ft{budget}", run.seed, dense)
            t0 = time.perf_counter()
            result = evaluate(model, test_set, config.eval_attacks, eps=eps, step=config.eval_step,
                              n=config.eval_n, per_example=True)
            rows[method][budget] = {"accuracy": result["accuracy"], "per_example": result["per_example"],
                                    "subset": result["subset"], "seconds": round(seconds, 1),
                                    "eval_seconds": round(time.perf_counter() - t0, 1)}
            print(f"{method} fine-tune {budget}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in
                                                              result["accuracy"].items()), flush=True)

    table = ["| fine-tune epochs | total epochs | cstar | post-hoc | cstar - post-hoc |", "|---|---|---|---|---|"]
    summary = []
    first = config.search.epochs
    for budget in sorted(rows["cstar"]):
        a, b = rows["cstar"][budget], rows["lowrank_global"][budget]
        diffs = {k: paired_difference(a["per_example"][k], b["per_example"][k]) for k in a["per_example"]}
        summary.append({"finetune_epochs": budget, "total_epochs": first + budget,
                        "cstar": a["accuracy"], "lowrank_global": b["accuracy"], "difference": diffs,
                        "finetune_seconds": {"cstar": a["seconds"], "lowrank_global": b["seconds"]}})
        gap = "; ".join(f"{k} {100 * d['difference']:+.2f} ({100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}, "
                        f"p={d['p_value']:.2g})" for k, d in diffs.items())
        table.append(f"| {budget} | {first + budget} | {percent(a['accuracy'])} | {percent(b['accuracy'])} | {gap} |")
    env = machine(device, run.seed)
    command = "python " + " ".join(sys.argv)
    subset = rows["cstar"][config.finetune.epochs]["subset"]
    write_json(args.out.with_suffix(".json"), {"ratio": args.ratio, "first_phase_epochs": first,
                                               "attacks": config.eval_attacks, "subset": subset, "rows": summary,
                                               "machine": env, "command": command})
    text = (f"# Fine-tuning budget at {args.ratio:g}x: CSTAR ({first} epochs of ADMM) against post-hoc low rank "
            f"({first} epochs of fine-tuning), both then fine-tuned\n\n"
            f"Accuracy (%) {' / '.join(config.eval_attacks)} on the {subset} of the test set; the difference "
            "paired over the same images (95% interval, McNemar p). The comparison's own cells give the "
            f"{config.finetune.epochs}-epoch row.\n\n" + "\n".join(table) +
            f"\n\nMachine: {env['device_name']}, torch {env['torch']}. "
            f"Command: `{command}`\n")
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
