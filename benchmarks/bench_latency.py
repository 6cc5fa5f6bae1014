"""Batch-1 CPU latency of a dense vs low-rank CIFAR ResNet-18 (the paper's Table 6, on this machine).

Usage:
    python benchmarks/bench_latency.py [--width 64] [--threads N] [--rounds 10] [--per-round 10]
                                       [--no-compile] [--out benchmarks/results/latency]

The model is ``resnet18`` (width 64 by default, 10 classes) with random
weights: latency does not depend on the weight values, but the global ranks
are chosen from the spectra of random kernels, so a trained model gets other
per-layer ranks at the same budget. Input 1x3x32x32, CPU,
``torch.inference_mode``, a fixed thread count (default: all cores).

Part 1: dense vs decomposed at 2x-64x under the params budget and the FLOPs
budget, plus one joint row (16x params and 16x FLOPs), all in eager mode.
Part 2: the dense and the FLOPs-16x models with BN folding, channels-last and
``torch.compile``, alone and combined; outputs are checked against the eager
model before timing. Times are interleaved (every model runs ``--per-round``
times in each of ``--rounds`` rounds) so background load hits all alike;
reported: the median and the interquartile range (IQR) in milliseconds.
Writes ``<out>.json`` and ``<out>.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cstar._env import describe_device, environment
from cstar._io import atomic_write_text, write_json
from cstar.counting import count_flops, count_params
from cstar.inference import optimize_for_inference
from cstar.lowrank import decompose, select_ranks
from cstar.models import create

INPUT = (3, 32, 32)
RATIOS = (2, 4, 8, 16, 32, 64)
VARIANTS = {  # name -> options of optimize_for_inference
    "eager": {"fold_bn": False},
    "fold_bn": {"fold_bn": True},
    "channels_last": {"fold_bn": False, "channels_last": True},
    "compile": {"fold_bn": False, "compile": True},
    "fold_bn+channels_last": {"fold_bn": True, "channels_last": True},
    "fold_bn+channels_last+compile": {"fold_bn": True, "channels_last": True, "compile": True},
}
TOLERANCE = 1e-4  # max |difference| allowed, relative to max |logit| of the eager model


def time_models(runs: dict[str, Callable[[], object]], rounds: int, per_round: int, warmup: int) -> dict[str, dict]:
    """Median and IQR (ms) of each zero-argument callable, interleaved over ``rounds``."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            for _ in range(warmup):
                run()
        for _ in range(rounds):
            for name, run in runs.items():
                for _ in range(per_round):
                    start = time.perf_counter()
                    run()
                    samples[name].append((time.perf_counter() - start) * 1e3)
    out = {}
    for name, values in samples.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        out[name] = {"median_ms": statistics.median(values), "iqr_ms": q3 - q1, "min_ms": min(values),
                     "n": len(values)}
    return out


def decomposed_models(dense: nn.Module) -> list[dict]:
    """Dense plus one decomposed model per (budget, ratio); each a dict with the model and its counts."""
    rows = [{"name": "dense", "budget": "-", "target": "1x", "model": dense}]
    for budget in ("params", "flops"):
        for ratio in RATIOS:
            plan = select_ranks(dense, ratio, budget=budget, input_shape=INPUT)
            rows.append({"name": f"{budget}-{ratio}x", "budget": budget, "target": f"{ratio}x",
                         "model": decompose(dense, plan).eval()})
            print(f"decomposed {budget}-{ratio}x", flush=True)
    plan = select_ranks(dense, 16, budget="joint", flops_ratio=16, input_shape=INPUT)
    rows.append({"name": "joint-16x", "budget": "joint", "target": "16x params + 16x FLOPs",
                 "model": decompose(dense, plan).eval()})
    params, macs = count_params(dense), count_flops(dense, INPUT)
    for row in rows:
        row["params"], row["macs"] = count_params(row["model"]), count_flops(row["model"], INPUT)
        row["params_ratio"], row["flops_ratio"] = params / row["params"], macs / row["macs"]
    return rows


def variant(model: nn.Module, name: str, x: torch.Tensor) -> dict:
    """The model under inference settings ``name``, its input, and the check of its outputs (compiles it)."""
    options = VARIANTS[name]
    x = x.contiguous(memory_format=torch.channels_last) if options.get("channels_last") else x
    start = time.perf_counter()
    try:
        fast = optimize_for_inference(model, **options)
        with torch.inference_mode():
            reference, got = model(x), fast(x)
    except Exception as exc:  # torch.compile can fail for want of a compiler or a backend
        return {"variant": name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    error = (got - reference).abs().max().item() / max(1.0, reference.abs().max().item())
    if error > TOLERANCE:
        raise SystemExit(f"{name}: outputs differ from the eager model by {error:.2e} (relative), above {TOLERANCE}")
    return {"variant": name, "run": lambda: fast(x), "relative_error": error,
            "setup_s": time.perf_counter() - start}


def markdown(result: dict) -> str:
    lines = [
        f"# Batch-1 CPU latency, {result['model']}, input 1x{'x'.join(map(str, INPUT))}",
        "",
        f"Machine: {result['device']}; torch {result['environment']['torch']}; {result['threads']} threads; "
        f"random weights; median of {result['samples']} runs (interleaved rounds) after warm-up; "
        f"1-min load average {result['load_average_1min']['start']:.1f} at start, "
        f"{result['load_average_1min']['end']:.1f} at end (this benchmark adds about {result['threads']}; "
        "more means other jobs shared the cores).",
        f"Command: `{result['environment']['command']}`",
        "",
        "## Dense vs decomposed (eager)",
        "",
        "| model | budget | target | params | params ratio | MACs | FLOPs ratio | latency ms | IQR ms | min ms "
        "| speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['name']} | {r['budget']} | {r['target']} | {r['params']:,} | {r['params_ratio']:.2f}x | "
            f"{r['macs']:,} | {r['flops_ratio']:.2f}x | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | "
            f"{r['min_ms']:.2f} | {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        "## Inference settings (speed-up vs dense eager; like for like: vs dense under the same settings)",
        "",
        "| model | settings | latency ms | IQR ms | min ms | speed-up vs dense eager | like-for-like speed-up "
        "| max rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["inference"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | |")
        else:
            like = f"{r['like_for_like']:.2f}x" if "like_for_like" in r else "-"
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['median_ms']:.2f} | {r['iqr_ms']:.2f} | {r['min_ms']:.2f} | "
                f"{r['speedup_vs_dense_eager']:.2f}x | {like} | {r['relative_error']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64, the standard model)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--per-round", type=int, default=5, help="runs per model per round (default 5)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model first (default 5)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile settings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"), help="output path stem")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = describe_device("cpu")
    load_before = os.getloadavg()[0]
    print(f"machine: {device}; threads: {torch.get_num_threads()}; load average {load_before:.1f}", flush=True)
    dense = create("resnet18", 10, width=args.width).eval()
    x = torch.rand(1, *INPUT)
    rows = decomposed_models(dense)
    times = time_models({r["name"]: (lambda m=r["model"]: m(x)) for r in rows},
                        args.rounds, args.per_round, args.warmup)
    for r in rows:
        r.update(times[r["name"]])
        r["speedup"] = times["dense"]["median_ms"] / r["median_ms"]

    names = [v for v in VARIANTS if not (args.no_compile and "compile" in v)]
    inference = []
    for row in (rows[0], next(r for r in rows if r["name"] == "flops-16x")):
        for name in names:
            inference.append({"model": row["name"], **variant(row["model"], name, x)})
            print(f"prepared {row['name']} / {name}", flush=True)
    timed = [r for r in inference if "run" in r]
    times = time_models({f"{r['model']}/{r['variant']}": r.pop("run") for r in timed},
                        args.rounds, args.per_round, args.warmup)
    for r in timed:
        r.update(times[f"{r['model']}/{r['variant']}"])
        r["speedup_vs_dense_eager"] = times["dense/eager"]["median_ms"] / r["median_ms"]
        if r["model"] != "dense" and f"dense/{r['variant']}" in times:
            r["like_for_like"] = times[f"dense/{r['variant']}"]["median_ms"] / r["median_ms"]

    result = {
        "model": f"resnet18 width {args.width}", "device": device, "threads": torch.get_num_threads(),
        "samples": args.rounds * args.per_round, "environment": environment("cpu"),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "rows": [{k: v for k, v in r.items() if k != "model"} for r in rows], "inference": inference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    text = markdown(result)
    atomic_write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
