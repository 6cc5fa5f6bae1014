"""Wall-time overhead of ADMM on an adversarial-training epoch, at the same settings.

Usage:
    python benchmarks/bench_admm_overhead.py --mnist-root data --cifar-root data

For each setting (MNIST small CNN with PGD-5 at 8x; CIFAR-10 ResNet-18 width 16
with N-FGSM at 8x) it times, in interleaved rounds on the same batches (the arm
that runs first alternating), ``steps`` adversarial training steps with and
without the ADMM penalty (through :func:`cstar.fit`, so the measured step is the
real one), and the Z/U step (Tucker-2/SVD projection of every compressed layer)
on its own. The epoch overhead is then

    (steps_per_epoch * (admm_step - plain_step) + z_steps_per_epoch * z_step)
    / (steps_per_epoch * plain_step)

for the default interval (one Z-step an epoch) and for every 100 steps (the CPU
presets). Writes ``benchmarks/results/admm_overhead.{json,md}`` with the machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch

from cstar import data, models, select_ranks
from cstar.records import describe_device, write_json, write_text
from cstar import ADMM, ADMMConfig
from cstar import TrainConfig, fit

SETTINGS = {
    "mnist": dict(dataset="mnist", model="small_cnn", kw={}, train=dict(
        attack="pgd", eps=0.3, attack_steps=5, attack_step=0.1, optimizer="adam", lr=1e-3, weight_decay=0.0)),
    "cifar10": dict(dataset="cifar10", model="resnet18", kw={"width": 16}, train=dict(
        attack="nfgsm", eps=8 / 255, optimizer="sgd", lr=0.01, weight_decay=5e-4, channels_last=True)),
}


def _time_fit(model, subset, config: TrainConfig, hooks=()) -> float:
    """Seconds per optimiser step of one epoch of ``fit`` over ``subset``."""
    loader = data.make_loader(subset, config.batch_size, train=True, seed=0)
    t0 = time.perf_counter()
    fit(model, loader, config, hooks=hooks)
    return (time.perf_counter() - t0) / len(loader)


def measure(name: str, root: str, ratio: float, steps: int, rounds: int, batch_size: int) -> dict:
    setting = SETTINGS[name]
    train_set = data.load(setting["dataset"], root, split="train")
    spec = train_set.spec
    torch.manual_seed(0)
    c, h, _ = spec.image_shape
    model = models.create(setting["model"], train_set.num_classes, in_channels=c, input_size=h, mean=spec.mean,
                          std=spec.std, **setting["kw"])
    config = TrainConfig(epochs=1, batch_size=batch_size, schedule="constant", check_size=0, progress=False,
                         overfit_guard=False, **setting["train"])
    subset = train_set.take(steps * batch_size)
    plan = select_ranks(model, ratio)
    steps_per_epoch = len(train_set) // batch_size
    admm = ADMM(model, plan, ADMMConfig(rho=1e-2, interval=10 ** 9), steps_per_epoch)  # penalty only: no Z-step

    _time_fit(model, train_set.take(2 * batch_size), config)  # warm-up
    plain, with_penalty, z_step = [], [], []
    for r in range(rounds):  # ABBA: the arm that runs first alternates, so drifts cancel
        arms = [(plain, ()), (with_penalty, [admm])]
        for times, hooks in (arms if r % 2 == 0 else arms[::-1]):
            times.append(_time_fit(model, subset, config, hooks=hooks))
        t0 = time.perf_counter()
        admm.z_step(model)
        z_step.append(time.perf_counter() - t0)
    step_plain, step_admm, z = (statistics.median(v) for v in (plain, with_penalty, z_step))
    epoch_plain = steps_per_epoch * step_plain

    def overhead(interval: int) -> float:
        z_per_epoch = math.ceil(steps_per_epoch / interval)
        return (steps_per_epoch * (step_admm - step_plain) + z_per_epoch * z) / epoch_plain

    return {"setting": name, "model": setting["model"], **setting["kw"], "ratio": ratio,
            "training": setting["train"]["attack"], "batch_size": batch_size, "steps_per_epoch": steps_per_epoch,
            "compressed_layers": len(admm.names), "step_seconds_plain": round(step_plain, 4),
            "step_seconds_admm": round(step_admm, 4), "z_step_seconds": round(z, 4),
            "epoch_seconds_plain": round(epoch_plain, 1),
            "overhead_interval_epoch": round(overhead(steps_per_epoch), 4),
            "overhead_interval_100": round(overhead(100), 4),
            "rounds": rounds, "steps_per_round": steps,
            "per_round_seconds_plain": [round(v, 4) for v in plain],
            "per_round_seconds_admm": [round(v, 4) for v in with_penalty]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist-root", default=None, help="a root holding MNIST/raw (skipped when not given)")
    parser.add_argument("--cifar-root", default=None, help="a root holding cifar-10-batches-py/ (skipped when not given)")
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=20, help="timed optimiser steps per round and arm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/admm_overhead"))
    args = parser.parse_args()

    rows = []
    for name, root in (("mnist", args.mnist_root), ("cifar10", args.cifar_root)):
        if root:
            rows.append(measure(name, root, args.ratio, args.steps, args.rounds, args.batch_size))
            print(rows[-1], flush=True)
    if not rows:
        parser.error("give --mnist-root and/or --cifar-root")
    machine = describe_device(torch.device("cpu"))
    command = "python benchmarks/bench_admm_overhead.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    write_json(args.out.with_suffix(".json"), {"machine": machine, "command": command, "rows": rows})
    lines = [f"# ADMM overhead per adversarial-training epoch ({args.ratio:g}x plan)", "",
             f"Machine: {machine}; torch {torch.__version__}; {torch.get_num_threads()} threads; median of "
             f"{args.rounds} interleaved rounds of {args.steps} steps per arm.", f"Command: `{command}`", "",
             "| setting | training | step plain (s) | step with penalty (s) | Z/U step (s) | epoch plain (s) | "
             "overhead, Z-step once an epoch | overhead, Z-step every 100 steps |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} {r['model']} | {r['training']}, batch {r['batch_size']} | "
                     f"{r['step_seconds_plain']:.4f} | {r['step_seconds_admm']:.4f} | {r['z_step_seconds']:.3f} | "
                     f"{r['epoch_seconds_plain']:.0f} | {100 * r['overhead_interval_epoch']:+.1f}% | "
                     f"{100 * r['overhead_interval_100']:+.1f}% |")
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
