"""Peak memory of a robust evaluation of the CIFAR-10 test set: it streams, batch by batch.

Usage:
    python benchmarks/bench_eval_memory.py --root data

Runs :func:`cstar.evaluate` (clean and PGD) of a ResNet-20 on the first 1,000 and
on all 10,000 CIFAR-10 test images, each in a fresh process, and reads the
process's peak resident memory (``VmHWM`` in ``/proc/self/status``) before and
after. A streaming evaluation's peak does not grow with the number of images;
holding every adversarial example would add ``n * 3 * 32 * 32 * 4`` bytes
(123 MB for the test set). Writes ``benchmarks/results/eval_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from cstar.records import describe_device, write_json, write_text

CHILD = """
import json, sys, time, torch
from cstar import data, evaluate, models

def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

root, n, attack, batch_size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
test_set = data.load("cifar10", root, split="test")
torch.manual_seed(0)
model = models.create("resnet20", 10, mean=test_set.spec.mean, std=test_set.spec.std).eval()
model(torch.rand(batch_size, 3, 32, 32)).sum()  # allocator warm-up at the evaluation batch size
before = peak_mb()
t0 = time.perf_counter()
result = evaluate(model, test_set, ["clean", attack], eps=8 / 255, n=n, batch_size=batch_size)
print(json.dumps({"n": n, "peak_before_mb": before, "peak_after_mb": peak_mb(),
                  "seconds": round(time.perf_counter() - t0, 1), "accuracy": result["accuracy"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a root holding cifar-10-batches-py/")
    parser.add_argument("--attack", default="pgd2", help="the attack evaluated (memory does not depend on its steps)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_memory"))
    args = parser.parse_args()

    rows = []
    for n in (1000, 10000):
        output = subprocess.run([sys.executable, "-c", CHILD, args.root, str(n), args.attack, str(args.batch_size)],
                                check=True, capture_output=True, text=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        row["growth_mb"] = round(row["peak_after_mb"] - row["peak_before_mb"], 1)
        row["all_adversarial_examples_mb"] = round(n * 3 * 32 * 32 * 4 / 2 ** 20, 1)
        rows.append(row)
        print(row, flush=True)
    machine = describe_device(torch.device("cpu"))
    command = f"python benchmarks/bench_eval_memory.py --root {args.root} --attack {args.attack} --batch-size {args.batch_size}"
    write_json(args.out.with_suffix(".json"), {"machine": machine, "command": command, "rows": rows})
    lines = ["# Peak memory of evaluating CIFAR-10 (ResNet-20, clean + " + args.attack + ")", "",
             f"Machine: {machine}; torch {torch.__version__}; batch {args.batch_size}; each size in a fresh process.",
             f"Command: `{command}`", "",
             "| test images | peak RSS before (MB) | peak RSS after (MB) | growth (MB) | all adversarial examples would take (MB) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']:,} | {r['peak_before_mb']:.0f} | {r['peak_after_mb']:.0f} | {r['growth_mb']:.0f} | "
                     f"{r['all_adversarial_examples_mb']:.0f} | {r['seconds']} |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
