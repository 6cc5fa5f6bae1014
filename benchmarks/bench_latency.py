"""CPU latency of a dense vs low-rank model on every deployment path, speed-ups side by side in one run.

Usage:
    python benchmarks/bench_latency.py [--model resnet18] [--width 64] [--input-size 32] [--batch 1]
        [--plans params:16,flops:4,flops:8,flops:16,flops:64] [--multiple-of 1,16]
        [--paths eager,fold_bn,fold_bn+channels_last,fold_bn+compile,onnxruntime]
        [--threads N] [--rounds 10] [--per-round 20] [--settle 20] [--out benchmarks/results/latency]

The model (default the CIFAR ``resnet18`` at width 64, 10 classes; any name
``cstar.models.create`` takes, e.g. ``resnet50_imagenet --input-size 224`` or
``tests.archs:mobilenet_v3`` when run from the repository root, where a factory's
module imports as it would for ``python -m``) has random weights: latency does not depend on
the values, but the global ranks are chosen from the spectra of random
kernels, so a trained model gets other per-layer ranks at the same budget.
Each plan ``budget:ratio`` (``flops:16`` = 16x fewer MACs) is decomposed once
per ``--multiple-of`` value (ranks rounded to multiples of it: CPU kernels
work in blocks of 8 or 16 channels).

Paths: ``eager`` (PyTorch, as trained), ``fold_bn`` (BatchNorm folded),
``fold_bn+channels_last``, ``fold_bn+compile`` (``torch.compile``), and
``onnxruntime`` (``cstar.export`` to ONNX, run by onnxruntime's CPU provider
with all graph optimisations). Every path's output is checked against the eager
model before timing. Every round times each path in turn and, within it, each model in turn
(``--settle`` untimed runs, then ``--per-round`` timed ones), so that slow
drifts of the machine's load hit all cells alike and no runtime's idle
threads share the cores with another cell's timed runs; reported: median and interquartile range (IQR) in milliseconds, the
like-for-like speed-up (dense and decomposed on the same path) and the best
path's speed-up (the decomposed model's fastest path against the dense model's
fastest path). The share of CPU time the hypervisor stole during the run is
recorded: above a few percent, figures are noisy.
Writes ``<out>.json`` and ``<out>.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cstar.records import describe_device, machine, write_json, write_text
from cstar import count_flops, count_params
from cstar.inference import optimize_for_inference
from cstar.lowrank import decompose, select_ranks
from cstar.models import create
from cstar import export

PATHS = ("eager", "fold_bn", "fold_bn+channels_last", "fold_bn+compile", "onnxruntime")
TOLERANCE = 1e-4  # max |difference| allowed, relative to max |logit| of the eager model


def cpu_times() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs from /proc/stat; (0, 0) where it does not exist."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def time_runs(runs: dict[tuple[str, str], Callable[[], object]], rounds: int, per_round: int,
              settle: int) -> dict[tuple[str, str], dict]:
    """Median, IQR and minimum (ms) of each zero-argument callable, keyed (model, path).

    Each of ``rounds`` rounds times every path in turn, and within a path every
    model in turn: ``settle`` untimed runs, then ``per_round`` timed ones. The
    untimed runs matter: onnxruntime's and OpenMP's idle threads spin for a while
    after work, and a session's spinning threads slow the next session's runs
    (interleaving sessions run by run doubled the dense model's onnxruntime
    latency here and inflated the speed-ups).
    """
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    paths = list(dict.fromkeys(path for _, path in runs))
    with torch.inference_mode():
        for _ in range(rounds):
            for path in paths:
                for key, run in runs.items():
                    if key[1] != path:
                        continue
                    for _ in range(settle):
                        run()
                    for _ in range(per_round):
                        start = time.perf_counter()
                        run()
                        samples[key].append((time.perf_counter() - start) * 1e3)
    out = {}
    for key, values in samples.items():
        q1, _, q3 = statistics.quantiles(values, n=4)
        out[key] = {"median_ms": statistics.median(values), "iqr_ms": q3 - q1, "min_ms": min(values),
                    "n": len(values)}
    return out


def plan_models(dense: nn.Module, plans: list[tuple[str, float]], multiples: list[int],
                shape: tuple[int, ...]) -> list[dict]:
    """Dense plus one decomposed model per (plan, multiple_of); each a dict with the model and its counts."""
    rows = [{"name": "dense", "budget": "-", "ratio": 1.0, "multiple_of": None, "model": dense}]
    for budget, ratio in plans:
        for multiple in multiples:
            plan = select_ranks(dense, ratio, budget=budget, input_shape=shape, multiple_of=multiple)
            rows.append({"name": f"{budget}-{ratio:g}x" + (f" m{multiple}" if len(multiples) > 1 else ""),
                         "budget": budget, "ratio": ratio, "multiple_of": multiple,
                         "model": decompose(dense, plan).eval()})
            print(f"decomposed {rows[-1]['name']}", flush=True)
    params, macs = count_params(dense), count_flops(dense, shape)
    for row in rows:
        row["params"], row["macs"] = count_params(row["model"]), count_flops(row["model"], shape)
        row["params_ratio"], row["flops_ratio"] = params / row["params"], macs / row["macs"]
    return rows


def onnxruntime_run(model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, name: str) -> Callable:
    """``model`` exported by :func:`cstar.export` and loaded in an onnxruntime CPU session."""
    import onnxruntime as ort

    path = export(model, workdir / f"{name.replace(' ', '_')}.onnx", input_shape=tuple(x.shape[1:]))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def prepare(model: nn.Module, path: str, x: torch.Tensor, threads: int, workdir: Path, name: str) -> dict:
    """A zero-argument call of ``model`` on ``x`` along ``path``, checked against eager mode (or the error)."""
    start = time.perf_counter()
    try:
        if path == "onnxruntime":
            run = onnxruntime_run(model, x, threads, workdir, name)
        else:
            options = {"fold_bn": "fold_bn" in path, "channels_last": "channels_last" in path,
                       "compile": "compile" in path}
            fast = optimize_for_inference(model, **options)
            xin = x.contiguous(memory_format=torch.channels_last) if options["channels_last"] else x
            run = lambda: fast(xin)  # noqa: E731
        with torch.inference_mode():
            reference, got = model(x), run()
    except Exception as exc:  # a missing compiler, backend or package: reported in the table, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
    error = (got - reference).abs().max().item() / max(1.0, reference.abs().max().item())
    if error > TOLERANCE:
        raise SystemExit(f"{name} / {path}: outputs differ from eager mode by {error:.2e} (relative), "
                         f"above {TOLERANCE}")
    return {"run": run, "relative_error": error, "setup_s": time.perf_counter() - start}


def speedups(rows: list[dict], paths: list[str]) -> None:
    """Fill each row's like-for-like speed-ups and its best path's speed-up over the dense model's best path."""
    dense = rows[0]["paths"]

    def best(cells: dict) -> tuple[str, float] | None:
        timed = [(p, c["median_ms"]) for p, c in cells.items() if "median_ms" in c]
        return min(timed, key=lambda t: t[1]) if timed else None

    dense_best = best(dense)
    for row in rows:
        for path in paths:
            cell = row["paths"][path]
            if "median_ms" in cell and "median_ms" in dense[path]:
                cell["speedup"] = dense[path]["median_ms"] / cell["median_ms"]
        mine = best(row["paths"])
        if mine and dense_best:
            row["best"] = {"path": mine[0], "median_ms": mine[1], "dense_path": dense_best[0],
                           "speedup": dense_best[1] / mine[1]}


def markdown(result: dict) -> str:
    paths = result["paths"]
    steal = result["steal_percent"]
    lines = [
        f"# CPU latency, {result['model']}, input {result['batch']}x{'x'.join(map(str, result['input']))}",
        "",
        f"Machine: {result['device']}; torch {result['environment']['torch']}; onnxruntime "
        f"{result['onnxruntime'] or 'not installed'}; {result['threads']} threads; random weights; median of "
        f"{result['samples']} runs per cell ({result['rounds']} rounds of {result['settle']} untimed + "
        f"{result['per_round']} timed runs); CPU stolen by the host during "
        f"the run: {steal:.1f}%; 1-min load average {result['load_average_1min']['start']:.1f} at start "
        f"(this benchmark adds about {result['threads']}).",
        f"Command: `{result['environment']['command']}`",
        "",
        "Each path cell: median ms (like-for-like speed-up: dense on the same path / this model). "
        "Best: this model's fastest path against the dense model's fastest path.",
        "",
        "| model | params ratio | FLOPs ratio | " + " | ".join(paths) + " | best |",
        "|---|---|---|" + "---|" * len(paths) + "---|",
    ]
    for r in result["rows"]:
        cells = []
        for path in paths:
            c = r["paths"][path]
            if "error" in c:
                cells.append("failed")
            else:
                cells.append(f"{c['median_ms']:.2f} ({c.get('speedup', 1.0):.2f}x)")
        b = r.get("best")
        best = f"{b['path']} {b['median_ms']:.2f} ({b['speedup']:.2f}x)" if b else "-"
        lines.append(f"| {r['name']} | {r['params_ratio']:.2f}x | {r['flops_ratio']:.2f}x | "
                     + " | ".join(cells) + f" | {best} |")
    errors = [(r["name"], p, r["paths"][p]["error"]) for r in result["rows"] for p in paths
              if "error" in r["paths"][p]]
    if errors:
        lines += ["", "Failed paths:"] + [f"- {name} / {path}: {error}" for name, path, error in errors]
    lines += ["", "IQR (ms) per cell, in the same layout:", "",
              "| model | " + " | ".join(paths) + " |", "|---|" + "---|" * len(paths)]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | " + " | ".join(
            f"{r['paths'][p]['iqr_ms']:.2f}" if "iqr_ms" in r["paths"][p] else "-" for p in paths) + " |")
    return "\n".join(lines) + "\n"


def parse_plans(text: str) -> list[tuple[str, float]]:
    plans = []
    for item in text.split(","):
        budget, _, ratio = item.partition(":")
        if budget not in ("params", "flops") or not ratio:
            raise SystemExit(f"--plans item {item!r}: write budget:ratio with budget params or flops, e.g. flops:16")
        plans.append((budget, float(ratio)))
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a cstar.models name or package.module:factory")
    parser.add_argument("--width", type=int, default=64, help="width of the built-in ResNets (default 64)")
    parser.add_argument("--input-size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument("--plans", default="params:16,flops:4,flops:8,flops:16,flops:64",
                        help="budget:ratio items (default params:16,flops:4,flops:8,flops:16,flops:64)")
    parser.add_argument("--multiple-of", default="1,16", help="rank multiples, one model each (default 1,16)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"paths to time (default {','.join(PATHS)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over every cell (default 10)")
    parser.add_argument("--per-round", type=int, default=20, help="timed runs per cell per round (default 20)")
    parser.add_argument("--settle", type=int, default=20,
                        help="untimed runs before each cell's timed ones in every round (default 20)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"), help="output path stem")
    args = parser.parse_args()
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    plans = parse_plans(args.plans)
    multiples = [int(v) for v in args.multiple_of.split(",")]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # every model shares its forward's code object: without this, dynamo runs the 9th model on in eager mode
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(plans) * len(multiples))
    kwargs = {"width": args.width} if args.model in ("resnet18", "resnet18_imagenet", "preact_resnet18") else {}
    dense = create(args.model, 10, **kwargs).eval()
    shape = (next(m for m in dense.modules() if isinstance(m, nn.Conv2d)).in_channels, args.input_size,
             args.input_size)
    x = torch.rand(args.batch, *shape)
    device = describe_device("cpu")
    print(f"machine: {device}; threads {torch.get_num_threads()}", flush=True)
    rows = plan_models(dense, plans, multiples, shape)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            row["paths"] = {}
            for path in paths:
                cell = prepare(row["model"], path, x, args.threads, Path(tmp), row["name"])
                if "run" in cell:
                    runs[(row["name"], path)] = cell.pop("run")
                row["paths"][path] = cell
            print(f"prepared {row['name']}", flush=True)
        load_before, (steal0, total0) = os.getloadavg()[0], cpu_times()
        times = time_runs(runs, args.rounds, args.per_round, args.settle)
        steal1, total1 = cpu_times()
    for row in rows:
        for path in paths:
            row["paths"][path].update(times.get((row["name"], path), {}))
    speedups(rows, paths)

    try:
        import onnxruntime
        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    name = f"{args.model} width {args.width}" if kwargs else args.model
    result = {
        "model": name, "input": list(shape), "batch": args.batch, "device": device, "threads": args.threads,
        "onnxruntime": ort_version, "paths": paths, "samples": args.rounds * args.per_round, "rounds": args.rounds,
        "per_round": args.per_round, "settle": args.settle,
        "environment": machine("cpu"),
        "steal_percent": 100.0 * (steal1 - steal0) / max(1, total1 - total0),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "rows": [{k: v for k, v in r.items() if k != "model"} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    text = markdown(result)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
