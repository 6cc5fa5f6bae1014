"""Training throughput (images per second) of one adversarial-training step on CIFAR-10.

Usage:
    python benchmarks/bench_train_throughput.py --root data [--width 16] [--batches 8] [--checkpoint M]

Times, for ResNet-18 at the given width (or ``--checkpoint``'s model, e.g. a
factorised one, as fine-tuning trains it) and batch 128, a clean training step, an
N-FGSM attack alone, and a full N-FGSM training step, each in the default and in
the channels-last memory format, in float32 and (``--bf16``) under bfloat16
autocast as ``--amp`` runs on a CPU with AVX512-BF16 or AMX, after one warm-up batch. Writes
``benchmarks/results/train_throughput.{json,md}`` with the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cstar import attacks, data, load, models
from cstar.records import describe_device, write_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="a root holding cifar-10-batches-py/")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per setting")
    parser.add_argument("--bf16", action="store_true", help="also time each setting under bfloat16 autocast")
    parser.add_argument("--checkpoint", default=None, help="a model cstar.load reads, instead of a fresh ResNet-18")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_throughput"))
    args = parser.parse_args()

    train_set = data.load("cifar10", args.root, split="train")
    spec = train_set.spec
    torch.manual_seed(0)
    model = load(args.checkpoint) if args.checkpoint else \
        models.create("resnet18", 10, width=args.width, mean=spec.mean, std=spec.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = data.make_loader(train_set, 128, train=True)
    eps = 8 / 255

    amp = None  # the autocast type of the setting being timed

    def clean_step(x, y):
        model.train()
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def attack(x, y):
        attacks.nfgsm(model, x, y, eps, amp_dtype=amp)

    def nfgsm_step(x, y):
        clean_step(attacks.nfgsm(model, x, y, eps, amp_dtype=amp), y)

    rows = []
    settings = [(f, a) for a in ((None, torch.bfloat16) if args.bf16 else (None,))
                for f in (torch.contiguous_format, torch.channels_last)]
    for memory_format, amp in settings:
        model.to(memory_format=memory_format)
        for name, step in (("clean step", clean_step), ("N-FGSM attack", attack), ("N-FGSM step", nfgsm_step)):
            batches = iter(loader)
            x, y = next(batches)
            step(x.contiguous(memory_format=memory_format), y)  # warm-up
            start = time.perf_counter()
            for _ in range(args.batches):
                x, y = next(batches)
                step(x.contiguous(memory_format=memory_format), y)
            seconds = time.perf_counter() - start
            rows.append({"setting": name, "channels_last": memory_format == torch.channels_last,
                         "dtype": "bfloat16" if amp is not None else "float32",
                         "images_per_second": round(args.batches * 128 / seconds, 1)})
            print(rows[-1], flush=True)

    machine = describe_device("cpu")
    command = (f"python benchmarks/bench_train_throughput.py --root {args.root} --width {args.width} "
               f"--batches {args.batches}" + (" --bf16" if args.bf16 else "")
               + (f" --checkpoint {args.checkpoint}" if args.checkpoint else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    what = args.checkpoint or f"ResNet-18 width {args.width}"
    write_json(args.out.with_suffix(".json"), {"machine": machine, "command": command, "model": what,
                                               "width": args.width, "batch_size": 128, "rows": rows})
    lines = [f"# Training throughput, CIFAR-10 {what}, batch 128", "",
             f"Machine: {machine}; torch {torch.__version__}", f"Command: `{command}`", "",
             "| setting | memory format | type | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {'channels-last' if r['channels_last'] else 'default'} | {r['dtype']} | "
              f"{r['images_per_second']} |" for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
