"""CPU latency of a dense vs low-rank model on every deployment path, speed-ups side by side in one run.

Usage:
    python benchmarks/bench_latency.py [--model resnet18] [--width 64] [--input-size 32] [--batch 1,32]
        [--plans params:16,macs:4,macs:8,macs:16,macs:64] [--multiple-of 1,16]
        [--paths eager,fold_bn,fold_bn+channels_last,fold_bn+compile,onnxruntime,openvino,
                 onnxruntime_int8,openvino_int8]
        [--threads N] [--rounds 10] [--per-round 20] [--settle 20] [--out benchmarks/results/latency]
        [--checkpoint M] [--plan-runtime onnxruntime] [--plan-files A.json,B.json] [--save-plans DIR]

The model (default the CIFAR ``resnet18`` at width 64, 10 classes; any name
``cstar.models.create`` takes, e.g. ``resnet50_imagenet --input-size 224`` or
``tests.archs:mobilenet_v3`` when run from the repository root, where a factory's
module imports as it would for ``python -m``) has random weights: latency does not depend on
the values, but the global ranks are chosen from the spectra of random
kernels, so a trained model gets other per-layer ranks at the same budget.
Each plan ``budget:ratio`` (``macs:16`` = 16x fewer MACs) is decomposed once
per ``--multiple-of`` value (ranks rounded to multiples of it: CPU kernels
work in blocks of 8 or 16 channels), and timed at every ``--batch`` size.

Float paths: ``eager`` (PyTorch, as trained), ``fold_bn`` (BatchNorm folded),
``fold_bn+channels_last``, ``fold_bn+compile`` (``torch.compile``), and, from
the ONNX file ``cstar.export`` writes, ``onnxruntime`` and ``openvino``
(extra ``cstar[openvino]``). INT8 paths: ``onnxruntime_int8`` and
``openvino_int8`` (extra ``cstar[openvino-int8]``, NNCF), post-training
quantised on random calibration images (``latency_runtimes.py`` has each
runtime's settings, all at ``--threads``). A path whose package is missing is
reported as not installed; the others run.
Every path's output is checked against the eager model before timing: float
paths within ``TOLERANCE`` (1e-4 of the largest logit), INT8 paths within
``INT8_TOLERANCE`` on 64 fresh random images, whose top-1 agreement with eager
mode is reported beside. Every round times each path in turn and, within it, each model in turn
(``--settle`` untimed runs, then ``--per-round`` timed ones), so that slow
drifts of the machine's load hit all cells alike and no runtime's idle
threads share the cores with another cell's timed runs; reported: median and interquartile range (IQR) in milliseconds, the
like-for-like speed-up (dense and decomposed on the same path) and best-vs-best:
the decomposed model's fastest path against the dense model's fastest path,
across every runtime (INT8 included) and across the float paths only. The share of CPU time the hypervisor stole
during the run and the load average are recorded: above a few percent of steal, figures are noisy.
onnxruntime's and OpenVINO's paths are timed each in a process of their own, one after the other, on the same
models (``--no-isolate``: all in this process): with both runtimes' sessions in one process, onnxruntime's
small graphs ran 54-63% slower on a 2-core AMD EPYC (docs/RESULTS.md).
``--checkpoint`` times a trained model; ``latency:S`` plans are chosen for a measured speed-up on
``--plan-runtime`` at the first ``--batch``; ``--plan-files`` times plans saved beforehand (``--save-plans``).
Writes ``<out>.json`` and ``<out>.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cstar import count_macs, count_params, load
from cstar.inference import optimize_for_inference
from cstar.lowrank import RankPlan, decompose, select_ranks
from cstar.models import create
from cstar.records import describe_device, machine, write_json, write_text
from latency_runtimes import FLOAT, INT8, int8_agreement, runtime_forward, versions

PATHS = ("eager", "fold_bn", "fold_bn+channels_last", "fold_bn+compile") + FLOAT + INT8
MIXED_RUNTIMES = ("onnxruntime and OpenVINO timed in one process (--no-isolate): each runtime's threads slow the "
                  "other's (onnxruntime's small graphs 54-63% on a 2-core AMD EPYC)")
TOLERANCE = 1e-4  # max |difference| allowed, relative to max |logit| of the eager model
# INT8: 8-bit activations have steps of 1/255 of each tensor's range, and ~20 quantised layers add theirs up to
# 1-6% of the largest logit on these random-weight models; a broken path (wrong layout, scale or file) is off by
# the order of the logits themselves. 0.25 tells the two apart with room for the smallest ranks' wider ranges.
INT8_TOLERANCE = 0.25


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
                shape: tuple[int, ...], latency: dict | None = None, save_plans: Path | None = None,
                files: list[Path] = ()) -> list[dict]:
    """Dense plus one decomposed model per plan file and per (plan, multiple_of); each a dict with the model and
    its counts. A ``latency:S`` plan is timed on ``latency`` (runtime, latency_batch, latency_threads);
    ``save_plans``: a folder to write each plan's JSON into."""
    rows = [{"name": "dense", "budget": "-", "ratio": 1.0, "multiple_of": None, "model": dense}]
    for file in files:
        plan = RankPlan.load(file)
        rows.append({"name": file.stem, "budget": plan.budget, "ratio": plan.target_ratio, "multiple_of": None,
                     "model": decompose(dense, plan).eval(), "plan": plan})
    for budget, ratio in plans:
        for multiple in multiples:
            extra = (latency or {}) if budget == "latency" else {}
            plan = select_ranks(dense, ratio, budget=budget, input_shape=shape, multiple_of=multiple, **extra)
            rows.append({"name": f"{budget}-{ratio:g}x" + (f" m{multiple}" if len(multiples) > 1 else ""),
                         "budget": budget, "ratio": ratio, "multiple_of": multiple,
                         "model": decompose(dense, plan).eval(), "plan": plan})
            if plan.achieved_speedup is not None:
                rows[-1]["planned_speedup"] = plan.achieved_speedup
            if save_plans is not None:
                plan.save(save_plans / f"{rows[-1]['name'].replace(' ', '_')}.json")
            print(f"decomposed {rows[-1]['name']}", flush=True)
    params, macs = count_params(dense), count_macs(dense, shape)
    for row in rows:
        row["params"], row["macs"] = count_params(row["model"]), count_macs(row["model"], shape)
        row["params_ratio"], row["macs_ratio"] = params / row["params"], macs / row["macs"]
    return rows


def prepare(model: nn.Module, path: str, x: torch.Tensor, threads: int, workdir: Path, name: str) -> dict:
    """A zero-argument call of ``model`` on ``x`` along ``path``, checked against eager mode (or the error)."""
    start = time.perf_counter()
    try:
        if path in FLOAT + INT8:
            forward = runtime_forward(path, model, tuple(x.shape), threads, workdir, name.replace(" ", "_"))
            run = lambda: forward(x)  # noqa: E731
        else:
            options = {"fold_bn": "fold_bn" in path, "channels_last": "channels_last" in path,
                       "compile": "compile" in path}
            fast = optimize_for_inference(model, **options)
            xin = x.contiguous(memory_format=torch.channels_last) if options["channels_last"] else x
            run = lambda: fast(xin)  # noqa: E731
        with torch.inference_mode():
            reference, got = model(x), run()
        check = int8_agreement(model, forward, tuple(x.shape)) if path in INT8 else {}
    except ImportError as exc:  # a runtime not installed: reported in the table, not fatal
        return {"error": str(exc), "not_installed": True}
    except Exception as exc:  # a missing compiler or backend: reported in the table, not fatal
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
    if path in INT8:
        error, limit = check["relative_error"], INT8_TOLERANCE
    else:
        error, limit = (got - reference).abs().max().item() / max(1.0, reference.abs().max().item()), TOLERANCE
    if error > limit:
        raise SystemExit(f"error: {name} / {path}: outputs differ from eager mode by {error:.2e} (relative), "
                         f"above {limit}")
    return {"run": run, "relative_error": error, **check, "setup_s": time.perf_counter() - start}


def speedups(rows: list[dict], paths: list[str]) -> None:
    """Fill each row's like-for-like speed-ups and best-vs-best: its fastest path against the dense model's.

    ``rows[0]`` is the dense model. ``best`` takes every path (INT8 included),
    ``best_float`` the float paths only; either is absent where no path of its kind was timed.
    """
    dense = rows[0]["paths"]

    def best(cells: dict, allowed) -> tuple[str, float] | None:
        timed = [(p, c["median_ms"]) for p, c in cells.items() if "median_ms" in c and p in allowed]
        return min(timed, key=lambda t: t[1]) if timed else None

    for key, allowed in (("best", paths), ("best_float", [p for p in paths if p not in INT8])):
        dense_best = best(dense, allowed)
        for row in rows:
            mine = best(row["paths"], allowed)
            if mine and dense_best:
                row[key] = {"path": mine[0], "median_ms": mine[1], "dense_path": dense_best[0],
                            "dense_ms": dense_best[1], "speedup": dense_best[1] / mine[1]}
    for row in rows:
        for path in paths:
            cell = row["paths"][path]
            if "median_ms" in cell and "median_ms" in dense[path]:
                cell["speedup"] = dense[path]["median_ms"] / cell["median_ms"]


def cell_text(cell: dict) -> str:
    if "error" in cell:
        return "not installed" if cell.get("not_installed") else "failed"
    return f"{cell['median_ms']:.2f} ({cell.get('speedup', 1.0):.2f}x)"


def best_text(best: dict | None) -> str:
    return f"{best['path']} {best['median_ms']:.2f} vs {best['dense_path']} {best['dense_ms']:.2f}: " \
           f"**{best['speedup']:.2f}x**" if best else "-"


def markdown(result: dict) -> str:
    paths, rows = result["paths"], result["rows"]
    int8 = [p for p in paths if p in INT8]
    steal, load = result["steal_percent"], result["load_average_1min"]
    runtimes = ", ".join(f"{k} {v or 'not installed'}" for k, v in result["runtimes"].items())
    lines = [
        f"# CPU latency, {result['model']}, input {'x'.join(map(str, result['input']))}, "
        f"batch {', '.join(map(str, result['batch']))}",
        "",
        f"Machine: {result['device']}; torch {result['environment']['torch']}; {runtimes}; "
        f"{result['threads']} threads; {'trained' if result.get('trained') else 'random'} weights; median of "
        f"{result['samples']} runs per cell ({result['rounds']} rounds of {result['settle']} untimed + "
        f"{result['per_round']} timed runs); CPU stolen by the host during the run: {steal:.1f}%; "
        f"1-min load average {load['start']:.2f} at start, {load['end']:.2f} at the end "
        f"(this benchmark adds about {result['threads']}).",
        f"Command: `{result['environment']['command']}`",
        "",
        *([f"**Warning**: {MIXED_RUNTIMES}", ""] if result.get("mixed_runtimes") else []),
        *([f"Timed each in a process of its own, one after the other: {', '.join(apart)} (CPU stolen "
           + ", ".join(f"{f} {c['steal_percent']:.1f}%" for f, c in apart.items()) + ").", ""]
          if (apart := result.get("runtimes_timed_apart")) else []),
        "## Best vs best",
        "",
        "Each decomposed model's fastest path against the dense model's fastest path (median ms), "
        "across every runtime and across the float paths only.",
        "",
        "| batch | model | params ratio | MACs ratio | best, any path | best, float paths |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['batch']} | {r['name']} | {r['params_ratio']:.2f}x | {r['macs_ratio']:.2f}x | "
              f"{best_text(r.get('best'))} | {best_text(r.get('best_float'))} |" for r in rows if r["name"] != "dense"]
    lines += ["", "## Every path", "",
              "Each cell: median ms (like-for-like speed-up: dense on the same path / this model).", "",
              "| batch | model | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    lines += [f"| {r['batch']} | {r['name']} | " + " | ".join(cell_text(r["paths"][p]) for p in paths) + " |"
              for r in rows]
    if int8:
        lines += ["", f"INT8 paths against eager mode on fresh random images: max |logit difference| relative to "
                  f"the largest logit (limit {INT8_TOLERANCE}), top-1 agreement (classes eager mode predicts).", "",
                  "| batch | model | " + " | ".join(int8) + " |", "|---|---|" + "---|" * len(int8)]
        for r in rows:
            cells = [r["paths"][p] for p in int8]
            lines.append(f"| {r['batch']} | {r['name']} | " + " | ".join(
                f"{c['relative_error']:.3f}, {100 * c['top1_agreement']:.1f}% of {c['check_images']} "
                f"({c['eager_classes']})" if "top1_agreement" in c else cell_text(c) for c in cells) + " |")
    errors = [(r["batch"], r["name"], p, r["paths"][p]["error"]) for r in rows for p in paths
              if "error" in r["paths"][p]]
    if errors:
        lines += ["", "Paths not timed:"] + [f"- batch {b} {name} / {path}: {error}" for b, name, path, error in errors]
    lines += ["", "IQR (ms) per cell, in the same layout:", "",
              "| batch | model | " + " | ".join(paths) + " |", "|---|---|" + "---|" * len(paths)]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['name']} | " + " | ".join(
            f"{r['paths'][p]['iqr_ms']:.2f}" if "iqr_ms" in r["paths"][p] else "-" for p in paths) + " |")
    return "\n".join(lines) + "\n"


def time_in_child(args: argparse.Namespace, models: list[dict], paths: list[str], folder: Path) -> dict:
    """Time ``paths`` (one runtime's) of every model in a process of their own: the same dense model, each
    decomposed model by its plan saved to ``folder``. Returns {"rows": {(model index, batch): path cells},
    "steal_percent", "load_average_1min"} of that run."""
    folder.mkdir(parents=True)
    files = []
    for index, row in enumerate(models[1:], start=1):
        files.append(str(row["plan"].save(folder / f"{index:03d}.json")))
    command = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--width", str(args.width),
               "--input-size", str(args.input_size), "--batch", args.batch, "--plans", "", "--plan-files",
               ",".join(files), "--paths", ",".join(paths), "--threads", str(args.threads), "--rounds",
               str(args.rounds), "--per-round", str(args.per_round), "--settle", str(args.settle), "--out",
               str(folder / "timed"), *(["--checkpoint", args.checkpoint] if args.checkpoint else [])]
    print(f"timing {', '.join(paths)} in a process of their own", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: timing {', '.join(paths)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    result = json.loads((folder / "timed.json").read_text())
    index = {"dense": 0, **{Path(f).stem: i for i, f in enumerate(files, start=1)}}
    return {"rows": {(index[r["name"]], r["batch"]): r["paths"] for r in result["rows"]},
            "steal_percent": result["steal_percent"], "load_average_1min": result["load_average_1min"]}


def parse_plans(text: str) -> list[tuple[str, float]]:
    plans = []
    for item in text.split(","):
        budget, _, ratio = item.partition(":")
        try:
            if budget not in ("params", "macs", "latency") or float(ratio) <= 1:
                raise ValueError
        except ValueError:
            raise SystemExit(f"error: --plans item {item!r}: write budget:ratio with budget params, macs or latency "
                             "(a speed-up on --plan-runtime) and a ratio above 1, e.g. macs:16") from None
        plans.append((budget, float(ratio)))
    return plans


def positive_ints(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"error: {option} {text!r}: write positive integers separated by commas, e.g. 1,32")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a cstar.models name or package.module:factory")
    parser.add_argument("--width", type=int, default=64, help="width of the built-in ResNets (default 64)")
    parser.add_argument("--input-size", type=int, default=32, help="input height and width (default 32)")
    parser.add_argument("--batch", default="1", help="batch sizes, e.g. 1,32 (default 1)")
    parser.add_argument("--plans", default="params:16,macs:4,macs:8,macs:16,macs:64",
                        help="budget:ratio items (default params:16,macs:4,macs:8,macs:16,macs:64)")
    parser.add_argument("--multiple-of", default="1,16", help="rank multiples, one model each (default 1,16)")
    parser.add_argument("--checkpoint", default=None,
                        help="a trained model (cstar.load reads it) instead of --model with random weights")
    parser.add_argument("--plan-runtime", default="onnxruntime", choices=("onnxruntime", "openvino", "eager"),
                        help="where latency:S plans are timed, at the first --batch (default onnxruntime)")
    parser.add_argument("--save-plans", type=Path, default=None, help="a folder to write every plan's JSON into")
    parser.add_argument("--plan-files", default="",
                        help="comma-separated plan JSONs (cstar ranks --json, --save-plans) to time beside --plans")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"paths to time (default {','.join(PATHS)})")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over every cell (default 10)")
    parser.add_argument("--per-round", type=int, default=20, help="timed runs per cell per round (default 20)")
    parser.add_argument("--settle", type=int, default=20,
                        help="untimed runs before each cell's timed ones in every round (default 20)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency"), help="output path stem")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="time onnxruntime and OpenVINO in this process too (their threads slow each other)")
    args = parser.parse_args()
    paths = args.paths.split(",")
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise SystemExit(f"error: --paths: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    plans = parse_plans(args.plans) if args.plans else []
    multiples, batches = positive_ints("--multiple-of", args.multiple_of), positive_ints("--batch", args.batch)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # every model and batch size shares its forward's code object: without this, dynamo runs the 9th on eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(plans) * len(multiples) * len(batches))
    kwargs = {"width": args.width} if args.model in ("resnet18", "preact_resnet18") and not args.checkpoint else {}
    dense = (load(args.checkpoint) if args.checkpoint else create(args.model, 10, **kwargs)).eval()
    shape = (next(m for m in dense.modules() if isinstance(m, nn.Conv2d)).in_channels, args.input_size,
             args.input_size)
    device = describe_device("cpu")
    print(f"machine: {device}; threads {torch.get_num_threads()}", flush=True)
    mixed = len({p.split("_")[0] for p in paths if p in FLOAT + INT8}) > 1
    if mixed and not args.isolate:
        print(f"warning: {MIXED_RUNTIMES}", flush=True)
    if args.save_plans is not None:
        args.save_plans.mkdir(parents=True, exist_ok=True)
    latency = {"runtime": args.plan_runtime, "latency_batch": batches[0], "latency_threads": args.threads}
    files = [Path(f) for f in args.plan_files.split(",") if f]
    models = plan_models(dense, plans, multiples, shape, latency, args.save_plans, files)

    families = {"onnxruntime": [], "openvino": []}
    for path in paths:
        if path in FLOAT + INT8:
            families[path.split("_")[0]].append(path)
    isolated = {f: ps for f, ps in families.items() if ps} if args.isolate and mixed else {}
    local = [p for p in paths if not any(p in ps for ps in isolated.values())]
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, family_paths in isolated.items():
            children = time_in_child(args, models, family_paths, Path(tmp) / family)
            isolated[family] = children
        for batch in batches:
            x = torch.rand(batch, *shape)
            for index, model_row in enumerate(models):
                row = {**model_row, "batch": batch, "paths": {}}
                for path in local:
                    cell = prepare(row["model"], path, x, args.threads, Path(tmp), row["name"])
                    if "run" in cell:
                        runs[(f"{row['name']} b{batch}", path)] = cell.pop("run")
                    row["paths"][path] = cell
                for child in isolated.values():
                    row["paths"].update(child["rows"][(index, batch)])
                rows.append(row)
                print(f"prepared {row['name']} at batch {batch}", flush=True)
        for batch in batches:
            x = torch.rand(batch, *shape)
        load_before, (steal0, total0) = os.getloadavg()[0], cpu_times()
        times = time_runs(runs, args.rounds, args.per_round, args.settle)
        steal1, total1 = cpu_times()
    for row in rows:
        for path in local:
            row["paths"][path].update(times.get((f"{row['name']} b{row['batch']}", path), {}))
    for batch in batches:
        speedups([r for r in rows if r["batch"] == batch], paths)

    name = args.checkpoint or (f"{args.model} width {args.width}" if kwargs else args.model)
    result = {
        "model": name, "trained": bool(args.checkpoint), "input": list(shape), "batch": batches, "device": device,
        "threads": args.threads,
        "runtimes": versions(), "paths": paths, "samples": args.rounds * args.per_round, "rounds": args.rounds,
        "per_round": args.per_round, "settle": args.settle, "tolerance": TOLERANCE, "int8_tolerance": INT8_TOLERANCE,
        "environment": machine("cpu"),
        "steal_percent": 100.0 * (steal1 - steal0) / max(1, total1 - total0),
        "mixed_runtimes": mixed and not isolated,
        "runtimes_timed_apart": {f: {k: c[k] for k in ("steal_percent", "load_average_1min")}
                                 for f, c in isolated.items()},
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "rows": [{k: v for k, v in r.items() if k not in ("model", "plan")} for r in rows],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out.with_suffix(".json"), result)
    text = markdown(result)
    write_text(args.out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
