"""One Pareto view of several comparisons: accuracy against parameters and MACs, a line per method.

Usage:
    python benchmarks/pareto.py benchmarks/results/compare_cifar10.json benchmarks/results/compare_cifar10_high.json \\
        --out benchmarks/results/pareto_cifar10

Each input is a ``cstar compare`` output directory (its ``results.json``) or a
record of ``summarize_compare.py`` (its ``results``). The cells of all inputs
are merged into one table (``<out>.md``), one record (``<out>.json``) and one
plot (``<out>.png``: each accuracy against the parameter ratio and the MACs
ratio). A (method, ratio) cell given by two inputs is taken from the first and
named in the output. Latencies are left out: each comparison measured its own
at another time, so they do not compare across inputs. Inputs with different
training budgets or threat models are refused (they do not belong in one view).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cstar.records import cell_name, current_settings, format_comparison, plot_pareto, write_json, write_text


def read_results(path: Path) -> dict:
    """The ``results`` of a comparison directory or of a summarize_compare record."""
    if path.is_dir():
        return json.loads((path / "results.json").read_text())
    record = json.loads(path.read_text())
    if "results" not in record:
        raise SystemExit(f"error: {path} is neither a cstar compare directory nor a summarize_compare record")
    return record["results"]


def budget(results: dict) -> dict:
    """The training budget of a comparison's results, flat (``search.lr``...): its phases' settings in today's
    terms, as its cells record them (display-only ``progress`` left out), and the threat model."""
    config = results["config"]
    record = current_settings({key: config[key] for key in ("search", "finetune", "admm") if key in config})
    flat = {f"{phase}.{key}": value for phase, settings in record.items() for key, value in settings.items()
            if key != "progress"}
    return {**flat, "eps": results["eps"]}


def merged(inputs: dict[str, dict]) -> tuple[dict, list[str]]:
    """(one results dict holding every input's cells without latency, the cells that several inputs gave)."""
    first_name, first = next(iter(inputs.items()))
    theirs = budget(first)
    for name, results in inputs.items():
        ours = budget(results)
        differ = [f"{key} {ours.get(key)} (not {theirs.get(key)})" for key in sorted(set(ours) | set(theirs))
                  if ours.get(key) != theirs.get(key)]
        if differ:
            raise SystemExit(f"error: {name} has another budget than {first_name}: {', '.join(differ)}; one view "
                             "needs one budget and one eps")
    cells, repeated = {}, []
    for name, results in inputs.items():
        for cell in results["cells"].values():
            key = cell_name(cell["method"], cell["target_ratio"])
            if key in cells:
                repeated.append(f"{key} (kept from {cells[key]['from']}, not {name})")
                continue
            cells[key] = {**{k: v for k, v in cell.items() if k != "latency_ms"}, "from": name}
    return {"budget": first["budget"], "eps": first["eps"], "cells": cells}, repeated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    inputs = {str(path): read_results(path) for path in args.inputs}
    results, repeated = merged(inputs)
    dense = [f"- {name}: " + ", ".join(f"{k} {100 * v:.2f}" for k, v in r["cells"]["dense"]["accuracy"].items())
             for name, r in inputs.items() if "dense" in r["cells"]]
    command = "python " + " ".join(sys.argv)
    write_json(args.out.with_suffix(".json"), {"results": results, "repeated": repeated, "command": command})
    plot_pareto(results, args.out.with_suffix(".png"))
    sources = "\n".join(f"- {key}: {cell['from']}" for key, cell in results["cells"].items())
    text = (f"# Pareto view of {len(args.inputs)} comparisons\n\n{format_comparison(results)}\n"
            "Latencies are left out (each comparison measured its own at another time).\n"
            + (f"\nGiven twice, kept once: {'; '.join(repeated)}.\n" if repeated else "")
            + ("\nThe dense model of each input (each input's cells start from its own):\n\n" + "\n".join(dense) + "\n"
               if dense else "")
            + f"\nCells and their sources:\n\n{sources}\n\nCommand: `{command}`\n")
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
