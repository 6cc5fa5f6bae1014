"""Paired difference between two `cstar compare` cells or `cstar eval` records, which may come from different runs.

Usage:
    python benchmarks/paired_cells.py runs/compare-fmnist-split12/cells/cstar-16x runs/compare-fmnist/cells/lowrank_global-16x
    python benchmarks/paired_cells.py eval-a.json eval-b.json   # cstar eval ... --per-example --json eval-a.json

Reads each cell's ``per_example.json`` (or the ``cstar eval`` JSON file given) and prints, per accuracy label both cells
have, A's accuracy minus B's in points with the paired 95% interval and the exact
McNemar p-value (:func:`cstar.paired_difference`). The two cells must have been
evaluated on the same test subset, which the script checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cstar import paired_difference


def read_cell(path: Path) -> dict:
    record = path if path.suffix == ".json" else path / "per_example.json"
    if not record.is_file():
        raise SystemExit(f"{record} not found: pass a finished cell directory (runs/NAME/cells/METHOD-RATIOx) or a "
                         "'cstar eval --per-example --json' file; cells from before per-example records need "
                         "benchmarks/backfill_per_example.py")
    found = json.loads(record.read_text())
    if "per_example" not in found:
        raise SystemExit(f"{record} has no per-example results: evaluate with cstar eval --per-example")
    return found


def paired_rows(a: dict, b: dict) -> list[dict]:
    """One row per accuracy label in both records: A minus B in points, its 95% interval and p-value."""
    if a.get("subset") != b.get("subset"):
        raise SystemExit(f"the cells were evaluated on different test images ({a.get('subset')!r} and "
                         f"{b.get('subset')!r}): pair cells evaluated with the same eval_n")
    rows = []
    for label in sorted(set(a["per_example"]) & set(b["per_example"]), key=lambda k: (k != "clean", k)):
        d = paired_difference(a["per_example"][label], b["per_example"][label])
        rows.append({"label": label, "difference": round(100 * d["difference"], 2),
                     "ci95": [round(100 * v, 2) for v in d["ci"]], "p_value": float(f"{d['p_value']:.3g}"),
                     "only_a": d["only_a"], "only_b": d["only_b"], "n": d["n"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cell_a", type=Path)
    parser.add_argument("cell_b", type=Path)
    args = parser.parse_args(argv)
    rows = paired_rows(read_cell(args.cell_a), read_cell(args.cell_b))
    print(f"A = {args.cell_a}\nB = {args.cell_b}\n")
    print("| accuracy | A - B (points) | paired 95% CI | McNemar p | only A right | only B right | images |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['difference']:+.2f} | {r['ci95'][0]:+.2f} to {r['ci95'][1]:+.2f} | "
              f"{r['p_value']:.3g} | {r['only_a']} | {r['only_b']} | {r['n']} |")


if __name__ == "__main__":
    main(sys.argv[1:])
