"""Latencies measured on a runtime, the costs of a ``budget="latency"`` rank plan.

1. Each compressible layer is timed alone on the chosen runtime
   (``"onnxruntime"``, ``"openvino"`` or ``"eager"`` PyTorch), on the input it
   sees in the model with ``spec.latency_batch`` images: dense, and factorised
   at a ladder of ranks per mode (:func:`rank_ladder`; Tucker-2 at every pair of
   its two ladders), as hardware-aware compression (NetAdapt) builds its
   look-up tables. A graph's own cost of a call (a one-ReLU graph on the same
   input) is subtracted, times are made non-decreasing in each rank and ranks
   between ladder points are interpolated (multilinear: exact for costs
   linear in each rank, as MACs are). These times weigh the layers against
   each other in the allocation.
2. A layer timed alone is not timed as in the model (runtimes fuse, lay out
   and cache around it), so the whole model is timed too, interleaved with the
   dense model, at a few uniform rank fractions (:data:`PROBES`): the
   :class:`LatencyCurve` maps the sum of the layers' times alone to the
   model's time relative to the dense one, and sets the limit of a plan.
3. Each plan made is timed the same way and added to the curve, and the plan
   is made again under the refined limit until one meets the target
   (``_ranks._meet_latency``): the speed-up a plan records is measured, never
   predicted.

Layer timings are cached in one JSON file per runtime, runtime version, CPU
and thread count (``$CSTAR_LATENCY_CACHE``, default ``~/.cache/cstar/latency``),
keyed by the layer's type, shape, settings, input and ranks, so a layer shape
is timed once per machine; whole-model timings are not cached. The cache is
data: only numbers are read from it; a file that is not a cache cstar wrote
for this machine is ignored with a warning and left as it is.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._core.errors import CstarError
from .._core.io import write_json
from ..evaluation.counting import eval_mode
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ._spec import RUNTIMES

_INSTALL = {"onnxruntime": "pip install 'cstar[export]'", "openvino": "pip install 'cstar[openvino]' onnx"}

LADDER = (1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4)  # rank fractions timed per mode, besides min_rank and full
FORMAT = 1  # the cache file's format
LAYER_RUNS, SETTLE = 30, 20  # timed and untimed calls of a layer graph
# Whole models timed side by side: in short rounds (MODEL_SETTLE untimed and MODEL_RUNS timed calls of each
# model per round), at least MODEL_ROUNDS of them, and more until MODEL_SECONDS per model have passed (at most
# MAX_ROUNDS). Measured here (a sub-millisecond MNIST graph in onnxruntime, against a copy of itself, three
# timings each): 6 rounds of 20 calls among four models, 0.46x-0.71x; rounds of 10 for half a second, in
# pairs, 1.01x-1.07x (benchmarks/bench_speedup_spread.py times such spreads).
MODEL_RUNS, MODEL_SETTLE, MODEL_ROUNDS, MAX_ROUNDS, MODEL_SECONDS = 10, 10, 6, 500, 0.5
PROBES = (0.0, 1 / 8, 1 / 4, 1 / 2)  # rank fractions of the models timed whole to draw the LatencyCurve
PLAN_ROUNDS = 4  # at most this many plans are made and timed to meet a latency target
_FLOOR_MS = 1e-4  # a layer never costs less than this once its graph's call cost is subtracted


def check_runtime(runtime: str) -> None:
    """Refuse in one line a runtime (one of :data:`RUNTIMES`, as :class:`RankSpec` checks it) not installed."""
    needed = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}.get(runtime, ())
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise CstarError(f"timing layers in {runtime} needs {' and '.join(missing)}: {_INSTALL[runtime]}, or "
                         "choose runtime='eager'")


def rank_ladder(size: int, min_rank: int, multiple_of: int) -> list[int]:
    """The ranks timed for one mode of ``size``: ``min_rank``, the :data:`LADDER` fractions on the
    ``multiple_of`` grid, and ``size``; sorted, distinct."""
    return sorted({min(size, min_rank), size, *(_snap(f, size, min_rank, multiple_of) for f in LADDER)})


def _snap(fraction: float, size: int, min_rank: int, multiple_of: int) -> int:
    """``fraction`` of ``size`` on the ``multiple_of`` grid (at least one step and ``min_rank``, at most ``size``)."""
    return min(size, max(min_rank, multiple_of * max(1, round(fraction * size / multiple_of))))


@dataclass
class LatencyGrid:
    """A layer's measured latencies (ms, the batch of the plan): ``dense_ms`` dense, ``values`` factorised at
    every point of ``ladders`` (one ladder per rank mode; values shape: one axis per mode)."""

    dense_ms: float
    ladders: tuple[list[int], ...]
    values: np.ndarray

    def at(self, ranks: tuple[int, ...]) -> float:
        """The latency at ``ranks`` (ms), interpolated between ladder points (multilinear)."""
        axes = []
        for ladder, rank in zip(self.ladders, ranks):
            if len(ladder) == 1:
                axes.append(((0, 1.0),))
                continue
            high = min(max(bisect.bisect_left(ladder, rank), 1), len(ladder) - 1)
            share = min(max((rank - ladder[high - 1]) / (ladder[high] - ladder[high - 1]), 0.0), 1.0)
            axes.append(((high - 1, 1.0 - share), (high, share)))
        return float(sum(math.prod(w for _, w in corner) * self.values[tuple(i for i, _ in corner)]
                         for corner in itertools.product(*axes)))


def _monotone(values: np.ndarray) -> np.ndarray:
    """``values`` made non-decreasing along every axis (running maxima)."""
    for axis in range(values.ndim):
        values = np.maximum.accumulate(values, axis=axis)
    return values


def _factorised(module: nn.Module, ranks: tuple[int, ...]) -> nn.Module:
    """A layer of ``module``'s settings factorised at ``ranks`` as :func:`decompose` builds it (random weights:
    float timings do not depend on the values)."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return LowRankLinear(module.in_features, module.out_features, ranks[0], bias=bias)
    if len(ranks) == 1:
        return LowRankConv1x1(module.in_channels, module.out_channels, ranks[0], stride=module.stride,
                              padding=module.padding, bias=bias, padding_mode=module.padding_mode)
    return Tucker2Conv2d(module.in_channels, module.out_channels, module.kernel_size, ranks, stride=module.stride,
                         padding=module.padding, dilation=module.dilation, bias=bias,
                         padding_mode=module.padding_mode)


def _signature(module: nn.Module, in_shape: tuple[int, ...]) -> str:
    """What a layer's timings depend on: its type, weight shape, settings and input shape (batch included)."""
    settings = "" if isinstance(module, nn.Linear) else \
        f"s{module.stride}p{module.padding}d{module.dilation}{module.padding_mode}"
    return f"{type(module).__name__}{tuple(module.weight.shape)}b{module.bias is not None}{settings}in{in_shape}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runtime_version(runtime: str) -> str:
    """``runtime`` with its installed version, e.g. ``"onnxruntime 1.20.1"``."""
    if runtime == "eager":
        return f"torch {torch.__version__}"
    if runtime == "onnxruntime":
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"
    import openvino
    return f"openvino {openvino.get_version().split('-')[0]}"


def _cache_key(runtime: str, threads: int) -> str:
    """What a cache file's timings hold for: the runtime and its version, the CPU, the threads."""
    return f"{runtime_version(runtime)}|{cpu_name()}|threads={threads}"


def _cache_path(runtime: str, threads: int) -> Path:
    root = Path(os.environ.get("CSTAR_LATENCY_CACHE") or "~/.cache/cstar/latency").expanduser()
    return root / f"{runtime}-{hashlib.sha256(_cache_key(runtime, threads).encode()).hexdigest()[:16]}.json"


class LatencyCache:
    """The measured latencies of one runtime on this machine, read from and written to one JSON file
    (``{"format": 1, "key": ..., "entries": {graph: ms}}``); a file of any other form is not read or written."""

    def __init__(self, runtime: str, threads: int):
        self.path = _cache_path(runtime, threads)
        self.key = _cache_key(runtime, threads)
        self.entries: dict[str, float] = {}
        self.writable = True
        if self.path.exists():
            entries = _read_entries(self.path, self.key)
            if entries is None:
                warnings.warn(f"ignoring the latency cache {self.path}: it is not a file cstar wrote for "
                              f"{self.key}; it is left as it is (delete it to cache timings again)", stacklevel=3)
                self.writable = False
            else:
                self.entries = entries
        self.measured = 0  # graphs timed in this session, not read from the cache

    def save(self) -> None:
        if self.writable and self.measured:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"format": FORMAT, "key": self.key, "entries": self.entries})


def _read_entries(path: Path, key: str) -> dict[str, float] | None:
    """The entries of a cache file, or None when the file is not one cstar wrote for ``key``."""
    try:
        if not path.is_file() or path.stat().st_size > 64 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not (isinstance(data, dict) and set(data) == {"format", "key", "entries"} and data["format"] == FORMAT
            and data["key"] == key and isinstance(data["entries"], dict)):
        return None
    entries = data["entries"]
    ok = all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             and v >= 0 for k, v in entries.items())
    return {k: float(v) for k, v in entries.items()} if ok else None


@contextlib.contextmanager
def _runner(module: nn.Module, x: torch.Tensor, runtime: str, threads: int):
    """A zero-argument call of ``module`` on ``x`` in ``runtime`` at ``threads`` threads (exported to ONNX first
    for onnxruntime and OpenVINO), valid inside the context."""
    if runtime == "eager":
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        x = x.to(next(iter(module.parameters()), x).device)
        try:
            with eval_mode(module), torch.inference_mode():
                yield lambda: module(x)
        finally:
            torch.set_num_threads(before)
        return
    from ..files.export import export
    from ..files.exported import onnxruntime_session, openvino_compiled
    images = np.ascontiguousarray(x.numpy())
    with tempfile.TemporaryDirectory(prefix="cstar-latency-") as folder:
        path = str(export(module, Path(folder) / "graph.onnx", input_shape=tuple(x.shape[1:])))
        if runtime == "onnxruntime":
            session = onnxruntime_session(path, threads)
            name = session.get_inputs()[0].name
            yield lambda: session.run(None, {name: images})
        else:
            request = openvino_compiled(path, threads)[1].create_infer_request()
            yield lambda: request.infer({0: images})


def interleaved_ms(modules: list[nn.Module], x: torch.Tensor, runtime: str, threads: int, runs: int,
                   rounds: int, settle: int = SETTLE, seconds: float = 0.0) -> list[float]:
    """The median latency (ms) of each module on ``x``: ``rounds`` rounds, each timing every module in turn
    (``settle`` untimed calls, then ``runs`` timed ones), and more rounds until ``seconds`` per module have
    passed (at most :data:`MAX_ROUNDS`). Interleaving shares out the machine's slow spells (here a small
    graph's time doubled for seconds at a time), so that ratios between the modules hold; the shorter the
    rounds, the finer the sharing."""
    with contextlib.ExitStack() as stack:
        calls = [stack.enter_context(_runner(m, x, runtime, threads)) for m in modules]
        samples: list[list[float]] = [[] for _ in calls]
        begin, done = time.perf_counter(), 0
        while done < rounds or (time.perf_counter() - begin < seconds * len(calls) and done < MAX_ROUNDS):
            for call, times in zip(calls, samples):
                for _ in range(settle):
                    call()
                for _ in range(runs):
                    start = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - start) * 1e3)
            done += 1
    return [statistics.median(times) for times in samples]


def models_interleaved_ms(modules: list[nn.Module], x: torch.Tensor, runtime: str, threads: int) -> list[float]:
    """The median latency (ms) of each whole model on ``x``, timed side by side in many short rounds (the
    ``MODEL_*`` settings above)."""
    return interleaved_ms(modules, x, runtime, threads, MODEL_RUNS, MODEL_ROUNDS, settle=MODEL_SETTLE,
                          seconds=MODEL_SECONDS)


def where_timed(runtime: str, threads: int, batch: int) -> str:
    """Where timings are taken, in words: runtime and version, CPU, threads, batch."""
    return f"{runtime_version(runtime)} on {cpu_name()}, {threads} thread(s), batch {batch}"


def model_latencies_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...], runtime: str, batch: int = 1,
                       threads: int | None = None) -> dict[str, float]:
    """The median time (ms) of each whole model on ``runtime`` (``"onnxruntime"``, ``"openvino"``, ``"eager"``)
    for a batch of ``batch`` random images of ``input_shape`` (C, H, W), at ``threads`` threads (default
    torch's), every model timed in turn in each round (:func:`interleaved_ms`), as a plan is timed against its
    dense model: ratios between the models are the figures to read."""
    check_runtime(runtime)
    torch.manual_seed(0)
    x = torch.rand(batch, *input_shape)
    cpu = [copy.deepcopy(m).cpu() for m in models.values()]
    with torch.no_grad():
        times = models_interleaved_ms(cpu, x, runtime, threads or torch.get_num_threads())
    return dict(zip(models, times))


class _Timer:
    """Times layer graphs through the cache (:func:`interleaved_ms` for what it lacks)."""

    def __init__(self, runtime: str, threads: int, batch: int):
        self.runtime, self.threads, self.batch = runtime, threads, batch
        self.cache = LatencyCache(runtime, threads)

    def __call__(self, key: str, build: Callable[[], nn.Module], in_shape: tuple[int, ...]) -> float:
        if key not in self.cache.entries:
            torch.manual_seed(0)
            x = torch.rand(self.batch, *in_shape[1:])
            with torch.no_grad():
                self.cache.entries[key] = interleaved_ms([build()], x, self.runtime, self.threads, LAYER_RUNS,
                                                         1)[0]
            self.cache.measured += 1
        return self.cache.entries[key]


def measure_layers(layers: list, modules: list[nn.Module], in_shapes: list[tuple[int, ...] | None],
                   calls: list[int], runtime: str, batch: int, threads: int, min_rank: int, multiple_of: int
                   ) -> list[LatencyGrid]:
    """A :class:`LatencyGrid` per layer (``in_shapes``: each layer's input at batch 1; ``calls``: how many times it
    runs per forward), through the cache."""
    timer = _Timer(runtime, threads, batch)
    grids = []
    for layer, module, in_shape, count in zip(layers, modules, in_shapes, calls):
        if in_shape is None or count == 0:  # never ran: it costs nothing either way
            grids.append(LatencyGrid(0.0, tuple([d] for d in layer.dims), np.zeros((1,) * len(layer.dims))))
            continue
        base = f"b{batch}|{_signature(module, in_shape)}"
        call_cost = timer(f"{base}|relu", lambda: nn.ReLU(), in_shape)

        def net(key: str, build: Callable[[], nn.Module]) -> float:
            return count * max(timer(f"{base}|{key}", build, in_shape) - call_cost, _FLOOR_MS)

        dense = net("dense", lambda: _dense_copy(module))
        ladders = tuple(rank_ladder(d, min_rank, multiple_of) for d in layer.dims)
        values = np.zeros([len(ladder) for ladder in ladders])
        for index in np.ndindex(*values.shape):
            ranks = tuple(ladder[i] for ladder, i in zip(ladders, index))
            values[index] = net(f"r{ranks}", lambda ranks=ranks: _factorised(module, ranks))
        grids.append(LatencyGrid(dense, ladders, _monotone(values)))
    timer.cache.save()
    return grids


def _dense_copy(module: nn.Module) -> nn.Module:
    """A fresh layer with ``module``'s settings (random weights)."""
    if isinstance(module, nn.Linear):
        return nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    return nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                     padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                     padding_mode=module.padding_mode)


class LatencyCurve:
    """Whole-model time (ms) against the sum of the layers' times alone (ms), through measured points.

    Layers timed alone are not timed as in the model (a runtime fuses, lays out
    and caches differently around one layer: alone, dense convs ran faster and
    small factorised ones slower than within the model here), so the model's
    own time is measured at a few plans and interpolated linearly between them
    (extended along the end segments): a plan is then a sum of layer times to
    stay under, and each plan made is measured and added as a point.
    """

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []

    def add(self, layer_sum: float, model_ms: float) -> None:
        self.points = sorted([*self.points, (layer_sum, model_ms)])

    def _xy(self) -> tuple[np.ndarray, np.ndarray]:
        sums = np.array([p[0] for p in self.points])
        return sums, np.maximum.accumulate(np.array([p[1] for p in self.points]))  # more layer time, no faster

    def model_ms(self, layer_sum: float) -> float:
        """The interpolated model time at ``layer_sum``."""
        x, y = self._xy()
        if len(x) == 1:
            return float(y[0] * layer_sum / x[0]) if x[0] > 0 else float(y[0])
        i = min(max(int(np.searchsorted(x, layer_sum)), 1), len(x) - 1)
        slope = (y[i] - y[i - 1]) / (x[i] - x[i - 1]) if x[i] > x[i - 1] else 0.0
        return float(max(y[i - 1] + slope * (layer_sum - x[i - 1]), 1e-6))

    def layer_sum(self, model_ms: float) -> float:
        """The largest sum of layer times whose interpolated model time is at most ``model_ms``."""
        x, y = self._xy()
        if model_ms < y[0]:  # below every measured plan: along the first segment, towards zero
            slope = (y[1] - y[0]) / (x[1] - x[0]) if len(x) > 1 and x[1] > x[0] and y[1] > y[0] else y[0] / x[0]
            return float(max(x[0] - (y[0] - model_ms) / slope, 0.0))
        i = int(np.searchsorted(y, model_ms, side="right"))
        if i >= len(x):
            return float(x[-1])
        slope = (y[i] - y[i - 1]) / (x[i] - x[i - 1]) if x[i] > x[i - 1] else math.inf
        return float(x[i - 1] + (model_ms - y[i - 1]) / slope) if slope > 0 else float(x[i - 1])


def factorised_copy(model: nn.Module, names: list[str], modules: list[nn.Module], states: list) -> nn.Module:
    """A copy of ``model`` with each named layer factorised at its state's ranks (None: kept), random weights:
    the structure of a plan, for timing."""
    probe = copy.deepcopy(model)
    for name, module, ranks in zip(names, modules, states):
        if ranks is not None:
            parent, _, child = name.rpartition(".")
            setattr(probe.get_submodule(parent) if parent else probe, child, _factorised(module, tuple(ranks)))
    return probe


class PlanTimer:
    """Times, on one runtime, the structures of plans of a model's layers ``names`` against the dense model
    (interleaved, :func:`interleaved_ms`), and keeps the :class:`LatencyCurve` of what it timed, in units of
    the dense model's time (the curve's model times are ratios to it)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], names: list[str], modules: list[nn.Module],
                 runtime: str, batch: int, threads: int):
        self.model, self.names, self.modules = model, names, modules
        self.runtime, self.threads = runtime, threads
        torch.manual_seed(0)
        self.x = torch.rand(batch, *input_shape)
        self.curve = LatencyCurve()

    @property
    def measured_on(self) -> str:
        """Where the timings are taken: runtime and version, CPU, threads, batch."""
        return where_timed(self.runtime, self.threads, self.x.shape[0])

    def time(self, states: list, layer_sum: float) -> tuple[float, float]:
        """(dense, plan) median times (ms) of the dense model and of the plan ``states`` (ranks or None per
        layer), timed interleaved; the plan's time relative to the dense one is added to the curve at
        ``layer_sum`` (its layers' times alone)."""
        probe = factorised_copy(self.model, self.names, self.modules, states)
        dense, planned = models_interleaved_ms([self.model, probe], self.x, self.runtime, self.threads)
        self.curve.add(layer_sum, planned / dense)
        return dense, planned
