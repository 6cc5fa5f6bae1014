"""Robustness-aware ranks before any training: post-hoc low rank with energy ranks against sensitivity-weighted ones.

Usage:
    python benchmarks/bench_rank_weights.py --checkpoint runs/mnist/model --data mnist --root data \\
        --ratios 16,64 --powers 0,0.5,1 --attacks clean,pgd40 --step 0.01 --n 1000 \\
        --out benchmarks/results/rank_weights_mnist

For each ratio, the dense model is decomposed post hoc with the global
allocation weighted by ``layer_sensitivity ** power`` (power 0: the plain
energy allocation; 1: the sensitivity itself; 0.5 tempers it), computed on the
first ``--batches`` training batches of 128 at the dataset's eps with PGD-5.
Each model is evaluated, untrained, on the first ``--n`` test images; the
difference to power 0 is paired over the same images
(:func:`cstar.paired_difference`). ``<out>.json`` and ``<out>.md`` hold the
figures, the ranks, the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from cstar import data, decompose, evaluate, layer_sensitivity, load, paired_difference, select_ranks
from cstar.records import machine, write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the dense robust model (any cstar.save dir, e.g. the model of 'cstar train', or model.pt)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--ratios", default="16,64")
    parser.add_argument("--powers", default="0,0.5,1")
    parser.add_argument("--attacks", default="clean,pgd40")
    parser.add_argument("--step", type=float, default=None, help="PGD step of the evaluation (default eps/4)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set = data.load(args.data, root=args.root, split="train")
    test_set = data.load(args.data, root=args.root, split="test")
    eps = test_set.spec.eps
    dense = load(args.checkpoint)
    torch.manual_seed(0)
    sensitivity = layer_sensitivity(dense, data.make_loader(train_set, 128, train=False), eps,
                                    max_batches=args.batches)
    print("sensitivity:", {k: round(v, 3) for k, v in sensitivity.items()}, flush=True)
    attacks = args.attacks.split(",")
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        baseline = None
        for power in [float(p) for p in args.powers.split(",")]:
            weights = None if power == 0 else {k: v ** power for k, v in sensitivity.items()}
            plan = select_ranks(dense, ratio, layer_weights=weights)
            result = evaluate(decompose(copy.deepcopy(dense), plan), test_set, attacks, eps=eps, step=args.step,
                              n=args.n, per_example=True)
            row = {"ratio": ratio, "power": power, "params_ratio": round(plan.achieved_ratio, 2),
                   "ranks": {n: list(p.ranks) for n, p in plan.layers.items()},
                   "accuracy_percent": {k: round(100 * v, 2) for k, v in result["accuracy"].items()},
                   "per_example": result["per_example"], "subset": result["subset"]}
            if baseline is None:
                baseline = row
            else:
                row["vs_energy"] = {k: paired_difference(row["per_example"][k], baseline["per_example"][k])
                                    for k in row["per_example"]}
            rows.append(row)
            print(ratio, power, row["ranks"], row["accuracy_percent"], flush=True)
    env = machine("cpu")
    command = "python " + " ".join(sys.argv)
    write_json(args.out.with_suffix(".json"), {"sensitivity": sensitivity, "rows": rows, "machine": env,
                                               "command": command})
    lines = [f"# Post-hoc low rank before fine-tuning: energy ranks against sensitivity-weighted ranks "
             f"({args.data}, {rows[0]['subset']}, eps {eps:.4g})", "",
             "| ratio | weight power | params ratio | ranks | " + " | ".join(attacks)
             + " | minus energy ranks (paired 95% CI, p) |", "|---|---|---|---|" + "---|" * len(attacks) + "---|"]
    for r in rows:
        margins = "; ".join(f"{k} {100 * d['difference']:+.2f} ({100 * d['ci'][0]:+.2f} to {100 * d['ci'][1]:+.2f}, "
                            f"p={d['p_value']:.2g})" for k, d in r.get("vs_energy", {}).items()) or "-"
        ranks = ", ".join(f"{n} {tuple(v)}" for n, v in r["ranks"].items())
        lines.append(f"| {r['ratio']:g}x | {r['power']:g} | {r['params_ratio']:.2f}x | {ranks} | "
                     + " | ".join(f"{r['accuracy_percent'][k]:.2f}" for k in attacks) + f" | {margins} |")
    lines += ["", "Sensitivity (mean 1): " + ", ".join(f"{k} {v:.3f}" for k, v in sensitivity.items()), "",
              f"Machine: {env['device_name']}, torch {env['torch']}. Command: `{command}`"]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
