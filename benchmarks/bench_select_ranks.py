"""Time of ``select_ranks`` on a VGG-16-size model (a 25088 x 4096 classifier layer), one thread.

Usage: ``python benchmarks/bench_select_ranks.py [--threads 1] [--repeats 3] [--both-grams]``

Builds a VGG-16 in the layout of torchvision's (13 3x3 convs in ``features``, a
7x7 adaptive pool, ``classifier`` = Linear(25088, 4096), Linear(4096, 4096),
Linear(4096, 1000)) with random weights (timings do not depend on the values)
and times ``select_ranks(model, 16, input_shape=(3, 224, 224))`` for the
parameter and the MACs budget: the median of ``--repeats`` runs. The spectrum
of an SVD layer comes from the Gram matrix of its smaller side only;
``--both-grams`` also times, once, the way it was computed before (both Gram
matrices, so a 25088 x 25088 eigenproblem for the first classifier layer).
Writes ``benchmarks/results/select_ranks.json`` and ``select_ranks.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cstar.records import machine, write_json, write_text
from cstar.lowrank import mode_spectra, select_ranks

RESULTS = Path(__file__).resolve().parent / "results"
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG-16 as torchvision lays it out: ``features``, ``avgpool``, ``classifier``."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers, channels = [], 3
        for item in VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(4096, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def timed(function, repeats: int) -> tuple[float, object]:
    seconds, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--both-grams", action="store_true", help="also time the former spectrum (both Grams), once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VGG().eval()
    rows = []
    for budget in ("params", "macs"):
        seconds, plan = timed(lambda: select_ranks(model, 16, budget=budget, input_shape=(3, 224, 224)), args.repeats)
        rows.append({"what": f"select_ranks(16x, budget={budget})", "seconds": round(seconds, 2),
                     "ratio": round(plan.achieved_ratio, 3), "macs_ratio": round(plan.achieved_macs_ratio, 3)})
        print(rows[-1], flush=True)
    if args.both_grams:
        weight = model.classifier[0].weight.detach()
        seconds, _ = timed(lambda: mode_spectra(weight[:, :, None, None]), 1)
        rows.append({"what": "former SVD spectrum of the 25088 x 4096 layer alone (both Grams)",
                     "seconds": round(seconds, 2)})
        print(rows[-1], flush=True)
    record = {"model": "VGG-16 (torchvision layout), 138.4 M parameters", "threads": args.threads,
              "repeats": args.repeats, "rows": rows, "environment": machine("cpu", 0)}
    write_json(RESULTS / "select_ranks.json", record)
    lines = [f"# select_ranks on VGG-16 ({args.threads} thread(s), median of {args.repeats})", "",
             "| what | seconds | params ratio | MACs ratio |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['seconds']} | {r.get('ratio', '')} | {r.get('macs_ratio', '')} |" for r in rows]
    write_text(RESULTS / "select_ranks.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
