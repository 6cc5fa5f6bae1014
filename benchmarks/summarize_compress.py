"""Collect `cstar compress` runs into one JSON and a markdown table (the README's CSTAR results).

Usage:
    python benchmarks/summarize_compress.py RUN_DIR [RUN_DIR ...] --out benchmarks/results/cstar_compress

Reads each run directory's results.json, config.yaml and env.json and writes
``<out>.json`` and ``<out>.md``: target and achieved ratios, the accuracy of
every evaluated phase (dense, the ADMM model after projection, the final
fine-tuned model) and the wall time of each phase, with the machine and command.
A phase that a run did not evaluate (``--eval-phases``) is left blank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cstar.records import write_json, write_text


def summarize(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    env = json.loads((run / "env.json").read_text())
    return {
        "run": run.name, "model": config.get("model") or "from checkpoint", "width": config.get("width"),
        "data": config["data"], "eps": config["eps"], "target": results["config"]["ratio"],
        "budget": results["config"]["budget"], "params_ratio": round(results["params"]["ratio"], 2),
        "macs_ratio": round(results["macs"]["ratio"], 2) if "macs" in results else None,
        "params": results["params"], "accuracy_percent": {
            phase: {k: round(100 * v, 2) for k, v in acc.items()} for phase, acc in results["accuracy"].items()},
        "eval_subset": results["eval_subset"],
        "phase_minutes": {("search" if k == "admm" else k): round(v.get("seconds", 0) / 60, 1)  # "admm": its old name
                          for k, v in results["phases"].items()},
        "device": env["device_name"], "command": env["command"],
    }


def table(rows: list[dict]) -> str:
    labels = sorted({k for r in rows for acc in r["accuracy_percent"].values() for k in acc},
                    key=lambda k: (k != "clean", k))
    phases = ("dense", "admm_projected", "final")
    head = ["run", "data", "target", "params ratio", "MACs ratio"]
    head += [f"{p} {k}" for p in phases for k in labels]
    head += ["ADMM (min)", "fine-tune (min)", "evaluation (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["run"], r["data"], f"{r['target']:g}x", f"{r['params_ratio']:.2f}x",
                 f"{r['macs_ratio']:.2f}x" if r["macs_ratio"] else "-"]
        for p in phases:
            for k in labels:
                value = r["accuracy_percent"].get(p, {}).get(k)
                cells.append(f"{value:.2f}" if value is not None else "")
        cells += [str(r["phase_minutes"].get(p, "")) for p in ("search", "finetune", "evaluate")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        lines.append(f"- {r['run']}: {r['device']}; evaluated on {', '.join(sorted(set(r['eval_subset'].values())))}; "
                     f"`{r['command']}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [summarize(run) for run in args.runs]
    write_json(args.out.with_suffix(".json"), rows)
    text = "# CSTAR compression runs\n\n" + table(rows)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
