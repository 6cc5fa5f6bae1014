"""Collect `cstar train` / `cstar eval` results into one JSON and a markdown table.

Usage:
    python benchmarks/summarize_runs.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/dense

Reads each run directory's results.json (final evaluation), any eval-*.json
(written by `cstar eval --json`), config.yaml and env.json, and writes
``<out>.json`` and ``<out>.md`` (the table, with the machine each run used).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


from cstar.records import current_names, run_config, write_json, write_text


def method_label(config: dict) -> str:
    """The training attack, with its steps where it has some (e.g. ``pgd-3``); a run recorded before the
    rename of ``method`` to ``attack`` is read in today's names."""
    attack = current_names(config)["attack"]
    if attack in ("pgd", "trades"):
        return f"{attack}-{config['attack_steps']}"
    return attack


def summarize(run: Path) -> dict:
    config = run_config(run)  # in today's names (a run recorded before a rename reads the same)
    env = json.loads((run / "env.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cards = [json.loads((run / "results.json").read_text())]
    cards += [json.loads(p.read_text()) for p in sorted(run.glob("eval-*.json"))]
    accuracies = {}
    for card in cards:
        for key, value in card.items():
            if key.endswith("_acc"):
                accuracies[f"{key[:-4]} (n={card['n_examples']})"] = value
    return {
        "run": run.name, "model": config["model"], "width": config.get("width"), "data": config["data"],
        "method": method_label(config), "eps": config["eps"], "epochs": len(metrics),
        "train_minutes": round(sum(m["train_seconds"] for m in metrics) / 60, 1),
        "accuracy_percent": accuracies, "device": env["device_name"], "command": env["command"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| run | model | data | method | eps | epochs | train min | accuracy (%) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = ", ".join(f"{k}: {v:.2f}" for k, v in r["accuracy_percent"].items())
        model = r["model"] + (f" w{r['width']}" if r["width"] else "")
        lines.append(f"| {r['run']} | {model} | {r['data']} | {r['method']} | {r['eps']:.4g} | {r['epochs']} "
                     f"| {r['train_minutes']} | {acc} |")
    machines = sorted({r["device"] for r in rows})
    lines += ["", "Machine: " + "; ".join(machines)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    args = parser.parse_args()
    rows = [summarize(run) for run in args.runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), rows)
    text = table(rows)
    write_text(args.out.with_suffix(".md"), text + "\n")
    print(text)


if __name__ == "__main__":
    main()
