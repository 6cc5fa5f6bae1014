"""Give the finished cells of a `cstar compare` run that predates ``per_example.json`` their per-example results.

Usage:
    python benchmarks/backfill_per_example.py RUN_DIR --root DATA [--cells cstar-16x,lowrank_global-16x]

Re-evaluates each finished cell's saved model with the run's own evaluation
settings (``compare_config.json``; dataset and eps from ``config.yaml``), the
same seeds and subset, checks that the accuracies match the recorded ones, and
writes ``cells/<cell>/per_example.json`` atomically. Cells that have the file
are skipped; ``--cells`` limits it to the named cells.
``benchmarks/summarize_compare.py`` then adds paired intervals to CSTAR's margins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cstar import data
from cstar.records import cell_model, write_json
from cstar import evaluate
from cstar import load

TOLERANCE = 0.002  # a few examples may flip near the decision boundary (thread counts change float sums)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--root", default=None, help="the dataset root the run used (none for digits)")
    parser.add_argument("--cells", default=None, help="comma-separated cell names (default: every finished cell)")
    args = parser.parse_args(argv)
    config = json.loads((args.run / "compare_config.json").read_text())
    options = yaml.safe_load((args.run / "config.yaml").read_text())
    test_set = data.load(options["data"], args.root, split="test")
    for result_path in sorted((args.run / "cells").glob("*/result.json")):
        cell = result_path.parent
        if (cell / "per_example.json").exists() or (args.cells and cell.name not in args.cells.split(",")):
            continue
        recorded = json.loads(result_path.read_text())
        result = evaluate(load(cell_model(cell, recorded)), test_set, config["eval_attacks"], eps=float(options["eps"]),
                          step=config["eval_step"], n=config["eval_n"], per_example=True)
        drift = {k: round(result["accuracy"][k] - recorded["accuracy"][k], 4) for k in recorded["accuracy"]}
        print(f"{cell.name}: " + ", ".join(f"{k} {100 * v:.2f}% (recorded {100 * recorded['accuracy'][k]:.2f}%)"
                                           for k, v in result["accuracy"].items()), flush=True)
        if result["subset"] != recorded["subset"] or any(abs(d) > TOLERANCE for d in drift.values()):
            raise SystemExit(f"{cell.name}: the re-evaluation differs from the recorded result ({drift}, subset "
                             f"{result['subset']!r} against {recorded['subset']!r}); not written")
        write_json(cell / "per_example.json", {"subset": result["subset"], "per_example": result["per_example"]})


if __name__ == "__main__":
    main()
