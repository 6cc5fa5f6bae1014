"""PGD throughput (images per second) and strength: cstar's attack against a plain PGD loop.

Usage:
    python benchmarks/bench_attack_throughput.py --data cifar10 --root R [--checkpoint C] [--steps 10]
        [--n 256] [--rounds 5] [--out benchmarks/results/attack_throughput]

On the first ``--n`` test images and one model (a ``cstar.save`` directory such
as ``cstar train``'s ``model``, or a checkpoint; without one an untrained ResNet-18 of width 16, for
speed only), times PGD-``steps`` at the data's eps (step eps/4, random start)
as:

- ``cstar evaluate``: :func:`cstar.attacks.pgd` on the copy :func:`cstar.evaluate`
  attacks, with BatchNorm folded into the convs (:func:`cstar.fold_batchnorm`);
- ``cstar``: :func:`cstar.attacks.pgd` as shipped (channels-last on the CPU);
- ``cstar NCHW``: the same with channels-last off, as before it was added;
- ``plain loop``: a textbook PGD written here (mean cross-entropy,
  ``torch.autograd.grad``, sign step, clamp), the shape of torchattacks' PGD;
- ``torchattacks``: its ``PGD`` when the package imports (it needs torchvision);
- ``cstar bf16``: cstar's attack under bfloat16 autocast, where the CPU has it.

The settings run in interleaved rounds (one batch each per round) and the
median rate counts; every setting's robust accuracy on the same images is the
check that a faster attack is not a weaker one. Writes ``OUT.json`` and ``OUT.md``
with the machine. Run it alone: a timing beside another job is not a figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from cstar import attacks, data, fold_batchnorm, load, models
from cstar.records import describe_device, write_json, write_text


def plain_pgd(model, x, y, eps, step, steps, start):
    """Textbook L-inf PGD from ``x + start`` (no cstar code)."""
    x_adv = (x + start).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        with torch.no_grad():
            x_adv = torch.min(torch.max(x_adv + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def settings(model, eps, step, steps):
    """name -> attack(x, y, seed): every setting starts from the same uniform noise for a given seed."""
    def cstar_pgd(amp_dtype=None, target=model):
        def run(x, y, seed):
            return attacks.pgd(target, x, y, eps, step, steps, amp_dtype=amp_dtype,
                               generator=torch.Generator().manual_seed(seed))
        return run

    def nchw(x, y, seed):
        with mock.patch("cstar.attacks._gradient.attack_in_channels_last", lambda model, x: False):
            return cstar_pgd()(x, y, seed)

    def plain(x, y, seed):
        start = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(seed)) - 1) * eps
        return plain_pgd(model, x, y, eps, step, steps, start)

    runs = {"cstar evaluate": cstar_pgd(target=fold_batchnorm(model)), "cstar": cstar_pgd(), "cstar NCHW": nchw,
            "plain loop": plain}
    try:
        import torchattacks

        reference = torchattacks.PGD(model, eps=eps, alpha=step, steps=steps, random_start=True)
        runs["torchattacks"] = lambda x, y, seed: reference(x, y)
    except Exception as error:  # noqa: BLE001 - any import failure means "not here"
        print(f"torchattacks not measured ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        runs["cstar bf16"] = cstar_pgd(torch.bfloat16)
    return runs


def load_model(checkpoint: str | None, spec, classes: int) -> torch.nn.Module:
    if checkpoint is None:
        torch.manual_seed(0)
        channels, size = spec.image_shape[0], spec.image_shape[1]
        return models.create("resnet18", classes, width=16, in_channels=channels, input_size=size,
                             mean=spec.mean, std=spec.std)
    return load(checkpoint)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--root", required=True)
    parser.add_argument("--checkpoint", help="a trained model (without one: untrained, speed only)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--n", type=int, default=256, help="images per batch (one batch per round)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/attack_throughput"))
    args = parser.parse_args()

    test = data.load(args.data, args.root, split="test")
    spec = test.spec
    x = test.images[:args.n].float() / 255
    y = test.labels[:args.n]
    model = load_model(args.checkpoint, spec, spec.num_classes).eval()
    eps = spec.eps
    runs = settings(model, eps, eps / 4, args.steps)
    for run in runs.values():  # warm-up: oneDNN builds its kernels for these shapes once
        run(x, y, 0)
    rates = {name: [] for name in runs}
    robust = {}
    for r in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            x_adv = run(x, y, r)
            rates[name].append(args.n / (time.perf_counter() - start))
            if r == 0:
                with torch.no_grad():
                    robust[name] = (model(x_adv).argmax(1) == y).float().mean().item()
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)

    base = statistics.median(rates["plain loop"])
    rows = [{"setting": name, "images_per_second": round(statistics.median(v), 1),
             "vs_plain_loop": round(statistics.median(v) / base, 2), "robust_accuracy": round(robust[name], 4),
             "rounds": [round(a, 1) for a in v]} for name, v in rates.items()]
    machine = describe_device("cpu")
    command = (f"python benchmarks/bench_attack_throughput.py --data {args.data} --root {args.root}"
               + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
               + f" --steps {args.steps} --n {args.n} --rounds {args.rounds}")
    what = f"{'trained' if args.checkpoint else 'untrained'} model, first {args.n} test images, eps {eps:.4g}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), {"machine": machine, "torch": torch.__version__, "command": command,
                                               "data": args.data, "steps": args.steps, "n": args.n,
                                               "what": what, "rows": rows})
    lines = [f"# PGD-{args.steps} throughput, {args.data} ({what})", "",
             f"Machine: {machine}; torch {torch.__version__}", f"Command: `{command}`", "",
             f"Median of {args.rounds} interleaved rounds.", "",
             "| setting | images/s | vs plain loop | robust accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['images_per_second']} | {r['vs_plain_loop']}x | {100 * r['robust_accuracy']:.2f} |"
              for r in rows]
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
