"""Collect a `cstar compare` run into the benchmark record: its table, CSTAR's margins, machine and command.

Usage:
    python benchmarks/summarize_compare.py RUN_DIR --out benchmarks/results/compare_cifar10

Reads the run directory's results.json and env.json and writes ``<out>.json``
(the cells, the margins and the machine), ``<out>.md`` (the comparison table,
then per ratio CSTAR's clean and robust accuracy minus the best robust pruning
baseline's and minus the best post-hoc low rank's, in points, with the paired
95% interval and McNemar p-value where both cells kept ``per_example.json``)
and, when the run has one, ``<out>.png`` (its accuracy-vs-ratio plot).

``--ours cstar_equal_macs --rival "post-hoc low rank=lowrank_equal_macs"``
measures another method against other families (a ``--rival`` replaces the
default family of its name; the default families: pruning = hydra, magnitude, harp;
post-hoc low rank = lowrank_global, lowrank_uniform, lowrank_learned, lowrank_conditioned).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cstar.records import cell_name, format_comparison, write_bytes, write_json, write_text
from cstar import paired_difference

RIVALS = {"pruning": ("hydra", "magnitude", "harp"),
          "post-hoc low rank": ("lowrank_global", "lowrank_uniform", "lowrank_learned", "lowrank_conditioned")}


def margins(results: dict, per_example: dict[str, dict] | None = None, ours: str = "cstar",
            rivals: dict[str, tuple[str, ...]] = RIVALS) -> list[dict]:
    """Per ratio and accuracy label: ``ours``' accuracy (key ``cstar``) minus the best of each family of
    ``rivals``' (``{family: methods}``), in points.

    ``per_example`` maps cell names to their ``per_example.json``; where both cells
    have one over the same subset, the margin also gets its paired 95% interval
    (``ci95``, points) and exact McNemar ``p_value``.
    """
    per_example = per_example or {}
    cells = list(results["cells"].values())
    labels = sorted({k for c in cells for k in c["accuracy"]}, key=lambda k: (k != "clean", k))
    rows = []
    for ratio in sorted({c["target_ratio"] for c in cells if c["method"] == ours}):
        at = {c["method"]: c for c in cells if c["target_ratio"] == ratio}
        for label in labels:
            row = {"ratio": ratio, "label": label, "cstar": round(100 * at[ours]["accuracy"][label], 2)}
            for family, methods in rivals.items():
                present = [m for m in methods if m in at]
                if present:
                    best = max(present, key=lambda m: at[m]["accuracy"][label])
                    row[family] = {"best": best, "accuracy": round(100 * at[best]["accuracy"][label], 2),
                                   "margin": round(100 * (at[ours]["accuracy"][label]
                                                          - at[best]["accuracy"][label]), 2)}
                    mine, theirs = (per_example.get(cell_name(m, ratio), {}) for m in (ours, best))
                    if mine.get("subset") is not None and mine.get("subset") == theirs.get("subset"):
                        paired = paired_difference(mine["per_example"][label], theirs["per_example"][label])
                        row[family]["ci95"] = [round(100 * v, 2) for v in paired["ci"]]
                        row[family]["p_value"] = float(f"{paired['p_value']:.3g}")
            rows.append(row)
    return rows


def margin_table(rows: list[dict], ours: str = "CSTAR", families=tuple(RIVALS)) -> str:
    head = ["ratio", "accuracy", ours, *[f"best {family} (margin; paired 95% CI, p)" for family in families]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def rival(r: dict) -> str:
        text = f"{r['accuracy']:.2f} {r['best']} ({r['margin']:+.2f}"
        if "ci95" in r:
            p = "p<0.001" if r["p_value"] < 0.001 else f"p={r['p_value']:.2g}"
            text += f"; {r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f}, {p}"
        return text + ")"

    for r in rows:
        rivals = [rival(r[f]) if f in r else "-" for f in families]
        lines.append("| " + " | ".join([f"{r['ratio']:g}x", r["label"], f"{r['cstar']:.2f}", *rivals]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ours", default="cstar", help="the method whose margins are measured (default cstar)")
    parser.add_argument("--rival", action="append", default=[], metavar="FAMILY=M1,M2",
                        help="a family of rivals, e.g. 'pruning=magnitude'; replaces the default family of that name")
    args = parser.parse_args()
    rivals = dict(RIVALS)
    for text in args.rival:
        family, _, methods = text.partition("=")
        if not family.strip() or not methods.strip():
            raise SystemExit(f"error: --rival {text!r} is not FAMILY=M1,M2, e.g. 'pruning=magnitude,hydra'")
        rivals[family.strip()] = tuple(m.strip() for m in methods.split(",") if m.strip())
    results = json.loads((args.run / "results.json").read_text())
    env = json.loads((args.run / "env.json").read_text())
    per_example = {path.parent.name: json.loads(path.read_text())
                   for path in (args.run / "cells").glob("*/per_example.json")}
    rows = margins(results, per_example, args.ours, rivals)
    name = "CSTAR" if args.ours == "cstar" else args.ours
    record = {"results": results, "ours": args.ours, "rivals": rivals, "margins": rows,
              "device": env["device_name"], "torch": env["torch"], "command": env["command"]}
    write_json(args.out.with_suffix(".json"), record)
    text = (f"# cstar compare: {args.run.name}\n\n{format_comparison(results)}\n"
            f"{name} minus the best rival of each family, in points:\n\n{margin_table(rows, name, tuple(rivals))}\n"
            f"Machine: {env['device_name']}, torch {env['torch']}. Command: `{env['command']}`\n")
    write_text(args.out.with_suffix(".md"), text)
    plot = args.run / "accuracy_vs_ratio.png"
    if plot.exists():
        write_bytes(args.out.with_suffix(".png"), plot.read_bytes())
    print(text)


if __name__ == "__main__":
    main()
