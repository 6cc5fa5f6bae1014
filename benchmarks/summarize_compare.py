"""Collect a `cstar compare` run into the benchmark record: its table, CSTAR's margins, machine and command.

Usage:
    python benchmarks/summarize_compare.py RUN_DIR --out benchmarks/results/compare_cifar10

Reads the run directory's results.json and env.json and writes ``<out>.json``
(the cells, the margins and the machine), ``<out>.md`` (the comparison table,
then per ratio CSTAR's clean and robust accuracy minus the best robust pruning
baseline's and minus the best post-hoc low rank's, in points) and, when the run
has one, ``<out>.png`` (its accuracy-vs-ratio plot).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cstar._io import atomic_write_bytes, atomic_write_text, write_json
from cstar.compare import format_comparison

RIVALS = {"pruning": ("hydra", "magnitude"), "post-hoc low rank": ("lowrank_global", "lowrank_uniform")}


def margins(results: dict) -> list[dict]:
    """Per ratio and accuracy label: CSTAR's accuracy minus the best of each rival family's, in points."""
    cells = list(results["cells"].values())
    labels = sorted({k for c in cells for k in c["accuracy"]}, key=lambda k: (k != "clean", k))
    rows = []
    for ratio in sorted({c["target_ratio"] for c in cells if c["method"] == "cstar"}):
        at = {c["method"]: c for c in cells if c["target_ratio"] == ratio}
        for label in labels:
            row = {"ratio": ratio, "label": label, "cstar": round(100 * at["cstar"]["accuracy"][label], 2)}
            for family, methods in RIVALS.items():
                present = [m for m in methods if m in at]
                if present:
                    best = max(present, key=lambda m: at[m]["accuracy"][label])
                    row[family] = {"best": best, "accuracy": round(100 * at[best]["accuracy"][label], 2),
                                   "margin": round(100 * (at["cstar"]["accuracy"][label]
                                                          - at[best]["accuracy"][label]), 2)}
            rows.append(row)
    return rows


def margin_table(rows: list[dict]) -> str:
    head = ["ratio", "accuracy", "CSTAR", *[f"best {family} (margin)" for family in RIVALS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rivals = [f"{r[f]['accuracy']:.2f} {r[f]['best']} ({r[f]['margin']:+.2f})" if f in r else "-" for f in RIVALS]
        lines.append("| " + " | ".join([f"{r['ratio']:g}x", r["label"], f"{r['cstar']:.2f}", *rivals]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text())
    env = json.loads((args.run / "env.json").read_text())
    rows = margins(results)
    record = {"results": results, "margins": rows, "device": env["device_name"], "torch": env["torch"],
              "command": env["command"]}
    write_json(args.out.with_suffix(".json"), record)
    text = (f"# cstar compare: {args.run.name}\n\n{format_comparison(results)}\n"
            f"CSTAR minus the best rival of each family, in points:\n\n{margin_table(rows)}\n"
            f"Machine: {env['device_name']}, torch {env['torch']}. Command: `{env['command']}`\n")
    atomic_write_text(args.out.with_suffix(".md"), text)
    plot = args.run / "accuracy_vs_ratio.png"
    if plot.exists():
        atomic_write_bytes(args.out.with_suffix(".png"), plot.read_bytes())
    print(text)


if __name__ == "__main__":
    main()
