"""How much a measured speed-up moves between timings: saved models timed against their dense model, again and again.

Usage:
    C=runs/cmp/cells; python benchmarks/bench_speedup_spread.py --dense $C/dense/model \
        --models lowrank=$C/lowrank_global-2x-faster/model,magnitude=$C/magnitude-2x-faster/model \
        --input-shape 1,28,28 --runtime onnxruntime --repeats 3 --out benchmarks/results/speedup_spread_mnist

Each repeat times every model once in a pair with the dense model and once all together (and the dense model
against a second copy of itself, whose "speed-up" should be 1), with :func:`cstar.lowrank.model_latencies_ms`,
the timing of ``budget="latency"`` plans and of ``cstar compare --speedups``. Prints and saves (JSON and a
markdown table) every time and ratio, with the machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch

from cstar import load
from cstar.lowrank import model_latencies_ms, where_timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", required=True, help="the dense model (a cstar.save directory)")
    parser.add_argument("--models", required=True, help="name=DIR,... of compressed models (cstar.save directories)")
    parser.add_argument("--input-shape", required=True, help="C,H,W, e.g. 1,28,28")
    parser.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "openvino", "eager"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", required=True, help="output path stem (.json and .md are written)")
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.input_shape.split(","))
    dense = load(args.dense)
    models = {"dense (a second copy)": copy.deepcopy(dense)}
    for item in args.models.split(","):
        name, _, path = item.partition("=")
        models[name] = load(path, model=copy.deepcopy(dense))
    threads = args.threads or torch.get_num_threads()

    def timed(group: dict) -> dict[str, float]:
        return model_latencies_ms(group, shape, args.runtime, args.batch, threads)

    rows = []
    for repeat in range(args.repeats):
        for name, model in models.items():
            times = timed({"dense": dense, name: model})
            rows.append({"repeat": repeat, "how": "pair", "model": name, "dense_ms": times["dense"],
                         "model_ms": times[name], "speedup": times["dense"] / times[name]})
        times = timed({"dense": dense, **models})
        rows += [{"repeat": repeat, "how": "all together", "model": name, "dense_ms": times["dense"],
                  "model_ms": times[name], "speedup": times["dense"] / times[name]} for name in models]
    where = where_timed(args.runtime, threads, args.batch)
    lines = [f"# Speed-up spread: {where}", "", f"Command: `python benchmarks/bench_speedup_spread.py "
             f"--dense {args.dense} --models {args.models} --input-shape {args.input_shape} --runtime {args.runtime} "
             f"--batch {args.batch} --repeats {args.repeats} --out {args.out}`", "",
             "| model | timed | dense ms (each timing) | model ms | speed-up (each timing) | median |",
             "|---|---|---|---|---|---|"]
    for name in models:
        for how in ("pair", "all together"):
            mine = [r for r in rows if r["model"] == name and r["how"] == how]
            dense_ms = ", ".join(f"{r['dense_ms']:.3f}" for r in mine)
            model_ms = ", ".join(f"{r['model_ms']:.3f}" for r in mine)
            speedups = ", ".join(f"{r['speedup']:.2f}x" for r in mine)
            median = statistics.median(r["speedup"] for r in mine)
            lines.append(f"| {name} | {how} | {dense_ms} | {model_ms} | {speedups} | {median:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"measured_on": where, "rows": rows}, indent=2))
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
