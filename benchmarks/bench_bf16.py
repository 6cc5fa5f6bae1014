"""bf16 against float32 on a CPU: attack strength, and the robust accuracy of the models two runs trained.

Usage:
    python benchmarks/bench_bf16.py --root DATA --model RUN_FP32/model [--compare RUN_BF16/model] [--n 2000]

1. Attack strength: PGD-``--steps`` (step ``2.5 * eps / steps``, no restarts)
   of ``--model`` on the first ``--n`` test images, its adversarial examples
   made once in float32 and once under bfloat16 autocast (as ``--amp`` attacks
   in training on a CPU with AVX512-BF16 or AMX); each set is then classified
   in float32. Paired on the same images, with the same random starts.
2. With ``--compare`` (the model of the same ``cstar train`` run made with
   ``--amp``): both models' clean and float32 PGD accuracy on the same images,
   paired, and each run's training images per second read from its
   ``results.json`` and ``metrics.jsonl``.

Writes ``benchmarks/results/bf16.{json,md}`` (``--out``) with the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import cstar
from cstar import attacks, data
from cstar.records import describe_device, write_json, write_text


def predictions(model, images, labels, eps, steps, amp, batch_size=200, seed=0) -> tuple[str, float]:
    """Per-example '1'/'0' (right under the attack; clean when ``steps`` is 0) and the attack's seconds."""
    generator = torch.Generator().manual_seed(seed)
    hits, seconds = [], 0.0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 255
        y = labels[start:start + batch_size]
        t0 = time.perf_counter()
        if steps:
            x = attacks.pgd(model, x, y, eps, 2.5 * eps / steps, steps, amp_dtype=amp, generator=generator)
        seconds += time.perf_counter() - t0
        with torch.no_grad():
            hits.extend("1" if right else "0" for right in (model(x).argmax(1) == y).tolist())
    return "".join(hits), seconds


def training_speed(model_dir: Path) -> dict:
    """The images per second of the ``cstar train`` run holding ``model_dir`` (epoch logs beside it)."""
    run = model_dir.parent
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(e["train_seconds"] for e in epochs)
    images = sum(e["train_seconds"] * e["images_per_second"] for e in epochs)
    config = (run / "config.yaml").read_text()
    return {"run": str(run), "epochs": len(epochs), "train_seconds": round(seconds, 1),
            "images_per_second": round(images / seconds, 1) if images and seconds else None,
            "amp": "amp: true" in config}


def percent(hits: str) -> float:
    return round(100 * hits.count("1") / len(hits), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--data", default="cifar10")
    parser.add_argument("--model", type=Path, required=True, help="a cstar model (float32-trained)")
    parser.add_argument("--compare", type=Path, default=None, help="the model of the same run made with --amp")
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bf16"))
    args = parser.parse_args()

    test = data.load(args.data, args.root, split="test")
    images, labels = test.images[:args.n], test.labels[:args.n]
    model = cstar.load(args.model).eval()
    record = {"machine": describe_device(torch.device("cpu")), "data": args.data, "n": len(labels), "eps": args.eps,
              "attack": f"PGD-{args.steps}, step 2.5*eps/{args.steps}, one random start",
              "cpu_bf16": "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()}
    fp32, fp32_s = predictions(model, images, labels, args.eps, args.steps, None)
    bf16, bf16_s = predictions(model, images, labels, args.eps, args.steps, torch.bfloat16)
    gap = cstar.paired_difference(bf16, fp32)
    record["attack_strength"] = {"model": str(args.model), "pgd_fp32_attack": percent(fp32),
                                 "pgd_bf16_attack": percent(bf16), "seconds_fp32": round(fp32_s, 1),
                                 "seconds_bf16": round(bf16_s, 1),
                                 "bf16_minus_fp32_points": round(100 * gap["difference"], 2),
                                 "ci_points": [round(100 * c, 2) for c in gap["ci"]], "p_value": gap["p_value"]}
    lines = ["# bf16 against float32 on the CPU", "", f"Machine: {record['machine']}", "",
             f"Data: {args.data}, first {len(labels)} test images, L-inf eps {args.eps:.4g}, {record['attack']}.", "",
             "## Attack strength (the same model, the attack in each type, classified in float32)", "",
             "| attack type | PGD accuracy % | attack seconds |", "|---|---|---|",
             f"| float32 | {percent(fp32)} | {fp32_s:.1f} |", f"| bfloat16 | {percent(bf16)} | {bf16_s:.1f} |", "",
             f"bf16 - fp32: {100 * gap['difference']:+.2f} points, 95% CI [{100 * gap['ci'][0]:+.2f}, "
             f"{100 * gap['ci'][1]:+.2f}], McNemar p = {gap['p_value']:.3g}", ""]
    if args.compare is not None:
        other = cstar.load(args.compare).eval()
        rows = {}
        for name, m, path in (("float32", model, args.model), ("bfloat16", other, args.compare)):
            clean, _ = predictions(m, images, labels, args.eps, 0, None)
            robust, _ = predictions(m, images, labels, args.eps, args.steps, None)
            rows[name] = {"clean": clean, "pgd": robust, **training_speed(path)}
        pgd_gap = cstar.paired_difference(rows["bfloat16"]["pgd"], rows["float32"]["pgd"])
        clean_gap = cstar.paired_difference(rows["bfloat16"]["clean"], rows["float32"]["clean"])
        record["training"] = {name: {"clean": percent(r["clean"]), "pgd": percent(r["pgd"]),
                                     **{k: v for k, v in r.items() if k not in ("clean", "pgd")}}
                              for name, r in rows.items()}
        record["training"]["pgd_bf16_minus_fp32_points"] = round(100 * pgd_gap["difference"], 2)
        record["training"]["pgd_ci_points"] = [round(100 * c, 2) for c in pgd_gap["ci"]]
        record["training"]["clean_bf16_minus_fp32_points"] = round(100 * clean_gap["difference"], 2)
        fast, slow = rows["bfloat16"]["images_per_second"], rows["float32"]["images_per_second"]
        record["training"]["speedup"] = round(fast / slow, 2) if fast and slow else None
        lines += ["## Training in each type (the same run settings; evaluated in float32)", "",
                  "| training | epochs | images/s | clean % | PGD % | run |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {r['epochs']} | {r['images_per_second']} | {percent(r['clean'])} | "
                  f"{percent(r['pgd'])} | {r['run']} |" for name, r in rows.items()]
        lines += ["", f"bf16 training speed-up: {record['training']['speedup']}x; PGD bf16 - fp32: "
                  f"{100 * pgd_gap['difference']:+.2f} points, 95% CI [{100 * pgd_gap['ci'][0]:+.2f}, "
                  f"{100 * pgd_gap['ci'][1]:+.2f}], p = {pgd_gap['p_value']:.3g}; clean "
                  f"{100 * clean_gap['difference']:+.2f} points", ""]
    print("\n".join(lines))
    write_json(args.out.with_suffix(".json"), record)
    write_text(args.out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
