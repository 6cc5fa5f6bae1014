"""Accuracy of each compressed model before any fine-tuning: what ADMM hands over, against post-hoc compression.

Usage:
    python benchmarks/bench_starting_points.py --checkpoint runs/cifar10-r18w16-nfgsm10/model \\
        --cstar runs/compare-c10/cells/cstar-16x/cstar --data cifar10 --root data --ratio 16 \\
        --n 500 --out benchmarks/results/starting_points_cifar10_16x

``--cstar`` is a `cstar compress` output directory (a `cstar compare` cell's
``cstar/``): its ``decomposed.pt`` holds the ADMM model right after the final
projection, before fine-tuning. The dense model is compressed post hoc at the
same ``--ratio`` with global and uniform ranks and with magnitude channel
pruning. Each is evaluated (``--attacks``, default clean,pgd10 at the
dataset's eps, step eps/4) on the first ``--n`` test images; ``<out>.json``
and ``<out>.md`` record the figures, the machine and the command.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

from cstar import data, evaluate, load, prune
from cstar.records import machine, write_json, write_text
from cstar.lowrank import decompose, select_ranks


def starting_points(dense: torch.nn.Module, cstar_dir: Path, ratio: float) -> dict[str, torch.nn.Module]:
    """The compressed models to evaluate, by name, none of them fine-tuned."""
    admm = load(cstar_dir / "model")  # the architecture; its weights are replaced by the projection's
    admm.load_state_dict(torch.load(cstar_dir / "decomposed.pt", map_location="cpu", weights_only=True)["model"])
    return {
        "cstar: ADMM, projected": admm,
        "post-hoc low rank, global ranks": decompose(copy.deepcopy(dense), select_ranks(dense, ratio, method="global")),
        "post-hoc low rank, uniform ranks": decompose(copy.deepcopy(dense),
                                                      select_ranks(dense, ratio, method="uniform")),
        "magnitude channel pruning": prune.magnitude_prune(dense, ratio),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="the dense robust model (the model dir of 'cstar train', or an older model.pt)")
    parser.add_argument("--cstar", type=Path, required=True, help="a 'cstar compress' output directory")
    parser.add_argument("--data", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--ratio", type=float, required=True)
    parser.add_argument("--attacks", default="clean,pgd10")
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    test_set = data.load(args.data, root=args.root, split="test")
    dense = load(args.checkpoint)
    rows = []
    for name, model in starting_points(dense, args.cstar, args.ratio).items():
        result = evaluate(model, test_set, args.attacks.split(","), eps=test_set.spec.eps, n=args.n)
        rows.append({"model": name, "params": sum(p.numel() for p in model.parameters()),
                     "accuracy_percent": {k: round(100 * v, 2) for k, v in result["accuracy"].items()},
                     "subset": result["subset"], "eps": result["eps"]})
        print(name, rows[-1]["accuracy_percent"], flush=True)
    env = machine("cpu")
    command = "python " + " ".join(sys.argv)
    write_json(args.out.with_suffix(".json"), {"rows": rows, "machine": env, "command": command})
    labels = list(rows[0]["accuracy_percent"])
    lines = [f"# Compressed models at {args.ratio:g}x before fine-tuning ({args.data}, {rows[0]['subset']}, "
             f"eps {rows[0]['eps']:.4g})", "", "| model | params | " + " | ".join(labels) + " |",
             "|---|---|" + "---|" * len(labels)]
    lines += [f"| {r['model']} | {r['params']:,} | " + " | ".join(f"{r['accuracy_percent'][k]:.2f}" for k in labels)
              + " |" for r in rows]
    lines += ["", f"Machine: {env['device_name']}, torch {env['torch']}. Command: `{command}`"]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
