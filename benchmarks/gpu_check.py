"""GPU check: every path CUDA changes in cstar, run once and recorded as JSON.

Usage (through the wrapper, which bounds the time):
    bash benchmarks/gpu_check.sh OUT_DIR            # on one or more GPUs: at most 8 minutes
    bash benchmarks/gpu_check.sh OUT_DIR --tiny     # on the CPU (CI): the same code, tiny settings

Writes ``OUT_DIR/gpu_check.json`` after every item (a run cut short keeps what
it measured) and ``OUT_DIR/gpu_check.md``, a table of the figures. Each item
is ``{"status": "ok" | "failed" | "skipped", "seconds": ..., figures...}``;
a failed item keeps its error and the run goes on; the exit code is 1 when any
item failed. The items, in the order they run (cheap and decisive first):

- ``resume_after_stop``: one-epoch trainings stopped mid-epoch by SIGTERM and
  resumed (AMP off; AMP on; off, then float16 with its GradScaler), weights
  against an uninterrupted run with the resumed settings;
- ``attack_precision``: PGD-10 accuracy and the fraction of zero input-gradient
  entries under float32, bfloat16 and float16 (with and without the rescaled
  attack gradient), on a confident model;
- ``projections``: Tucker-2 / SVD projections on the device against the CPU,
  contiguity, and the exact-decomposition gap with TF32 on and off;
- ``process_group``: torchrun with NCCL (Gloo in ``--tiny``): ADMM on ResNet-18
  at 16x with every Z and U broadcast, DDP and SyncBatchNorm training steps;
- ``host_syncs``: host syncs per training step (``torch.cuda.set_sync_debug_mode``);
- ``channels_last_amp``: a factorised ResNet-18 under AMP, channels-last against
  NCHW (outputs and forward-backward time);
- ``train_throughput``: images/s of PGD training of dense and factorised
  ResNet-18 (width 64), float32 NCHW and AMP + channels-last;
- ``pgd_throughput``: PGD-10 images/s (ResNet-18 width 16), float32 and AMP;
- ``latency_batch1``: dense against decomposed (16x MACs plan), eager and
  compiled, synchronised, interleaved rounds, medians;
- ``cli_end_to_end``: ``cstar compress`` and ``cstar compare`` on tiny data.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import cstar
from cstar import attacks, data, distributed, models
from cstar.records import machine, write_json, write_text
from cstar import Interrupted
from cstar.data import DATASETS, TensorData
from cstar.training.fit import POLL_EVERY, TrainConfig, fit, resolve_amp_dtype

ITEMS = ("resume_after_stop", "attack_precision", "projections", "process_group", "host_syncs",
         "channels_last_amp", "train_throughput", "pgd_throughput", "latency_batch1", "cli_end_to_end")


@dataclass(frozen=True)
class Settings:
    """Sizes of one run: the GPU defaults, or ``tiny()`` for the CPU."""

    device: str
    tiny: bool = False
    width: int = 64  # ResNet-18 of the speed items
    width_small: int = 16  # ResNet-18 of ADMM, attacks and PGD throughput
    batch: int = 128
    train_batches: int = 10  # timed training steps
    images: int = 256  # attack items
    latency_rounds: int = 7
    latency_per_round: int = 20
    compile_backend: str = "inductor"
    macs_ratio: float = 16.0  # the plan of the factorised models (a width-4 ResNet-18 reaches about 10x)

    @classmethod
    def tiny_cpu(cls) -> "Settings":
        return cls(device="cpu", tiny=True, width=4, width_small=4, batch=8, train_batches=2, images=16,
                   latency_rounds=2, latency_per_round=2, compile_backend="eager", macs_ratio=4.0)


# --- helpers ------------------------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic(n: int, shape=(3, 32, 32), seed: int = 0, spec: str = "cifar10") -> TensorData:
    """Images whose class is the brightest of 10 fixed patterns (learnable, no download)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    patterns = torch.rand(10, *shape, generator=gen)
    noise = torch.rand(n, *shape, generator=gen)
    images = (0.5 * noise + 0.5 * patterns[labels]).mul(255).round().to(torch.uint8)
    return TensorData(images, labels, DATASETS[spec])


def _resnet18(width: int, device: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    spec = DATASETS["cifar10"]
    return models.create("resnet18", 10, width=width, mean=spec.mean, std=spec.std).to(device)


def _decomposed(model: nn.Module, ratio: float, budget: str = "params") -> tuple[nn.Module, cstar.RankPlan]:
    plan = cstar.select_ranks(model, ratio, budget=budget, input_shape=(3, 32, 32))
    device = next(model.parameters()).device
    return cstar.decompose(model, plan).to(device), plan


def _train_config(s: Settings, **kw) -> TrainConfig:
    base = dict(attack="pgd", epochs=1, batch_size=s.batch, eps=8 / 255, attack_steps=2, optimizer="sgd", lr=0.01,
                weight_decay=5e-4, schedule="constant", check_size=0, progress=False)
    return TrainConfig(**{**base, **kw})


class _StopAt:
    """A loader that sends this process SIGTERM while yielding batch ``batch`` (the run stops after that step)."""

    def __init__(self, loader, batch: int):
        self.loader, self.batch = loader, batch

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, item in enumerate(self.loader):
            if i == self.batch:
                os.kill(os.getpid(), signal.SIGTERM)
            yield item


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a.state_dict().values(),
                                                                          b.state_dict().values())
               if x.is_floating_point())


def _median_ms(times: list[float]) -> float:
    return round(1000 * statistics.median(times), 4)


# --- items --------------------------------------------------------------------------------------------------------

def resume_after_stop(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    train_set = _synthetic(s.batch * 6)
    results = {}
    amp = {"amp": True} if device.type == "cuda" else {"amp": True, "amp_dtype": "bfloat16"}
    cases = {"fp32": ({}, {}), "amp": (amp, amp), "fp32_then_fp16": ({}, {"amp": True, "amp_dtype": "float16"})}
    for name, (before, after) in cases.items():
        loader = lambda: data.make_loader(train_set, s.batch, train=True, device=device, seed=0)  # noqa: E731
        reference = _resnet18(s.width_small, device)
        fit(reference, loader(), _train_config(s, **after), out_dir=out / f"resume-{name}-reference")
        stopped, run_dir = _resnet18(s.width_small, device), out / f"resume-{name}"
        try:
            fit(stopped, _StopAt(loader(), 2), _train_config(s, **before), out_dir=run_dir)
            raise RuntimeError("the SIGTERM did not stop the run")
        except Interrupted:
            pass
        saved = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        resumed = _resnet18(s.width_small, device, seed=1)
        history = fit(resumed, loader(), _train_config(s, **after), out_dir=run_dir, resume=True)
        results[name] = {
            "stopped_after_batches": saved["partial"]["batches"],
            "cuda_rng_states_saved": len(saved["rng"].get("cuda", [])),
            "amp": history[-1].get("amp", "off"),
            "max_weight_diff_vs_uninterrupted": _max_diff(resumed, reference),
        }
    return {"cases": results}


def _confident_model(device: torch.device) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).to(device).eval()
    x = torch.rand(256, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
        model[-1].weight.mul_(400)
        model[-1].bias.mul_(400)
    return model, x, y


def attack_precision(s: Settings, out: Path) -> dict:
    import cstar.attacks._gradient as gradient

    device = torch.device(s.device)
    model, x, y = _confident_model(device)
    x, y = x[:s.images], y[:s.images]
    with torch.no_grad():
        gap = (1 - model(x).softmax(1).max(1).values).median().item()
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
    rows = {}
    for name, dtype in list(dtypes.items()) + [("float16_unscaled", torch.float16)]:
        unscaled = name.endswith("unscaled")
        with _patched(gradient, "_rescale_gradient", lambda logits, per_example: logits) if unscaled else \
                contextlib.nullcontext():
            first = attacks.pgd(model, x, y, 0.2, 0.2, 1, random_start=False, amp_dtype=dtype)
            x_adv = attacks.pgd(model, x, y, 0.2, 0.05, 10, amp_dtype=dtype,
                                generator=torch.Generator(device=device).manual_seed(0))
        with torch.no_grad():
            accuracy = (model(x_adv).argmax(1) == y).float().mean().item()
        rows[name] = {"pgd10_accuracy": round(100 * accuracy, 2),
                      "zero_gradient_fraction": round((first == x).float().mean().item(), 4)}
    return {"median_1_minus_p_y": gap, "eps": 0.2, "images": len(y), "by_dtype": rows}


@contextlib.contextmanager
def _patched(module, name, value):
    real = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, real)


def projections(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    gen = torch.Generator().manual_seed(0)
    shapes = {"conv3x3 128x64": ((128, 64, 3, 3), "tucker2", (32, 16)), "shortcut 1x1 128x64": ((128, 64, 1, 1), "svd", (16,)),
              "linear 10x512": ((10, 512), "svd", (4,))}
    rows = {}
    for name, (shape, kind, ranks) in shapes.items():
        w = torch.randn(*shape, generator=gen)
        on_cpu = cstar.pipeline.admm.project(w, kind, ranks)
        on_device = cstar.pipeline.admm.project(w.to(device), kind, ranks)
        rows[name] = {"relative_diff_vs_cpu": ((on_device.cpu() - on_cpu).norm() / on_cpu.norm()).item(),
                      "contiguous": on_device.is_contiguous()}
    model = _resnet18(s.width_small, device).eval()
    plan = cstar.select_ranks(model, 16, input_shape=(3, 32, 32))
    with torch.no_grad():
        for layer_name, layer in plan.layers.items():
            if layer.kind != "dense":
                weight = model.get_submodule(layer_name).weight
                weight.copy_(cstar.pipeline.admm.project(weight, layer.kind, layer.ranks))
    factorised = cstar.decompose(model, plan).to(device).eval()
    x = torch.rand(64, 3, 32, 32, generator=gen).to(device)
    gaps = {}
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        with torch.no_grad():
            gaps["tf32_on"] = (model(x) - factorised(x)).abs().max().item()
            with cstar.full_float32():
                gaps["tf32_off"] = (model(x) - factorised(x)).abs().max().item()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    return {"projections": rows, "decomposition_gap": gaps, "tf32_defaults": {"cudnn": before[0], "matmul": before[1]}}


def process_group(s: Settings, out: Path) -> dict:
    procs = max(1, min(2, torch.cuda.device_count())) if s.device.startswith("cuda") else 1
    result_path = out / "process_group.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(Path(__file__).resolve()), "--worker", "process_group", "--out", str(out), "--device", s.device]
    if s.tiny:
        command.append("--tiny")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    return {"processes": procs, **json.loads(result_path.read_text())}


def _process_group_worker(s: Settings, out: Path) -> None:
    """One rank of :func:`process_group` (run by torchrun)."""
    import torch.distributed as dist

    device = torch.device(s.device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        context = distributed.init_from_env(device)
        device = context.device
    else:  # one rank: cstar's helpers are no-ops there, so the collectives below are called directly
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1, timeout=distributed.timeout(),
                                **({"device_id": device} if backend == "nccl" else {}))
    record = {"backend": dist.get_backend(), "world_size": dist.get_world_size()}
    model = _resnet18(s.width_small, device)
    plan = cstar.select_ranks(model, 16, input_shape=(3, 32, 32))
    admm = cstar.ADMM(model, plan, cstar.ADMMConfig(interval=2, rho=0.01), steps_per_epoch=4)
    tensors = [admm.Z[n] for n in admm.names] + [admm.U[n] for n in admm.names]
    for t in tensors:  # NCCL refuses non-contiguous tensors: every Z and U must go through
        dist.broadcast(t, 0)
    record["admm_broadcast_tensors"] = len(tensors)
    record["admm_noncontiguous"] = sum(not t.is_contiguous() for t in tensors)
    train_set = _synthetic(s.batch * 4 * dist.get_world_size(), seed=3)
    loader = data.make_loader(train_set, s.batch, train=True, device=device, rank=dist.get_rank(),
                              world_size=dist.get_world_size())
    history = fit(model, loader, _train_config(s, sync_bn=device.type == "cuda" and dist.get_world_size() > 1),
                  hooks=[admm])
    record["admm_z_steps"] = admm.z_steps
    record["admm_residual_mean"] = history[-1].get("admm_residual_mean")
    # DDP and SyncBatchNorm steps, also with one rank (cstar wraps only when there are several)
    net = copy.deepcopy(model)
    if device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ddp = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    losses = []
    for x, y in loader:
        x_adv = attacks.pgd(net, x, y, 8 / 255, 2 / 255, 2)
        loss = F.cross_entropy(ddp(x_adv), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    record["ddp_steps"] = len(losses)
    record["sync_batchnorm"] = device.type == "cuda"
    record["ddp_losses_finite"] = all(np.isfinite(losses))
    dist.barrier()
    if dist.get_rank() == 0:
        write_json(out / "process_group.json", record)
    dist.destroy_process_group()


def host_syncs(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    if device.type != "cuda":
        return {"status": "skipped", "reason": "torch.cuda.set_sync_debug_mode needs CUDA"}
    steps = 3 * POLL_EVERY
    train_set = _synthetic(s.batch * steps)
    rows = {}
    for name, amp in (("fp32", False), ("amp", True)):
        model = _resnet18(s.width_small, device)
        config = _train_config(s, amp=amp, attack_steps=3)
        fit(model, data.make_loader(train_set, s.batch, train=True, device=device), config)  # warm-up
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(model, data.make_loader(train_set, s.batch, train=True, device=device, seed=1), config)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        rows[name] = {"steps": steps, "syncs": len(syncs), "syncs_per_step": round(len(syncs) / steps, 3),
                      "amp": str(resolve_amp_dtype(config, device)).removeprefix("torch."),
                      "where": sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})[:12]}
    return {"poll_every": POLL_EVERY, "runs": rows}


def _amp_dtype(device: torch.device) -> torch.dtype:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = resolve_amp_dtype(TrainConfig(amp=True), device)
    return chosen or torch.bfloat16  # the CPU's autocast type


def channels_last_amp(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    factorised, plan = _decomposed(_resnet18(s.width, device), s.macs_ratio, "macs")
    amp_dtype = _amp_dtype(device)
    x = torch.rand(s.batch, 3, 32, 32, device=device)
    rows = {}
    outputs = {}
    for name, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        net = copy.deepcopy(factorised).to(memory_format=fmt).train()
        xi = x.contiguous(memory_format=fmt)
        times = []
        for i in range(3 + s.train_batches):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp_dtype):
                logits = net(xi)
            logits.float().sum().backward()
            _sync(device)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        outputs[name] = logits.float().detach()
        rows[name] = {"forward_backward_ms": _median_ms(times)}
    rows["max_output_diff"] = (outputs["nchw"] - outputs["channels_last"]).abs().max().item()
    return {"amp": str(amp_dtype).removeprefix("torch."), "batch": s.batch, "macs_ratio": plan.achieved_macs_ratio,
            "results": rows}


def train_throughput(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    train_set = _synthetic(s.batch * (s.train_batches + 2))
    dense = _resnet18(s.width, device)
    factorised, plan = _decomposed(dense, s.macs_ratio, "macs")
    rows = {}
    for model_name, model in (("dense", dense), (f"factorised {s.macs_ratio:g}x MACs", factorised)):
        for setting, kw in (("fp32_nchw", {}), ("amp_channels_last", {"amp": True, "channels_last": True})):
            if device.type == "cpu":
                kw = {**kw, "amp_dtype": "bfloat16"} if kw else kw
            net = copy.deepcopy(model)
            config = _train_config(s, attack_steps=10, **kw)
            warm = data.make_loader(_synthetic(s.batch * 2, seed=1), s.batch, train=True, device=device)
            fit(net, warm, config)
            record = fit(net, data.make_loader(train_set, s.batch, train=True, device=device), config)[-1]
            rows[f"{model_name} {setting}"] = {"images_per_second": record["images_per_second"],
                                               "amp": record.get("amp", "off")}
    return {"attack": "pgd-10", "batch": s.batch, "width": s.width, "macs_ratio": plan.achieved_macs_ratio, "results": rows}


def pgd_throughput(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    model = _resnet18(s.width_small, device).eval()
    x = torch.rand(s.images, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (s.images,), device=device)
    rows = {}
    for name, dtype, fmt in (("fp32", None, torch.contiguous_format),
                             ("amp_channels_last", _amp_dtype(device), torch.channels_last)):
        net = copy.deepcopy(model).to(memory_format=fmt)
        xi = x.contiguous(memory_format=fmt)
        attacks.pgd(net, xi[:s.batch], y[:s.batch], 8 / 255, 2 / 255, 2, amp_dtype=dtype)  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        for i in range(0, s.images, s.batch):
            attacks.pgd(net, xi[i:i + s.batch], y[i:i + s.batch], 8 / 255, 2 / 255, 10, amp_dtype=dtype)
        _sync(device)
        rows[name] = {"images_per_second": round(s.images / (time.perf_counter() - t0), 1),
                      "amp": str(dtype).removeprefix("torch.") if dtype else "off"}
    return {"attack": "pgd-10", "width": s.width_small, "images": s.images, "batch": s.batch, "results": rows}


def latency_batch1(s: Settings, out: Path) -> dict:
    device = torch.device(s.device)
    dense = _resnet18(s.width, device).eval()
    factorised, plan = _decomposed(dense, s.macs_ratio, "macs")
    x = torch.rand(1, 3, 32, 32, device=device)
    variants = {"dense eager": cstar.fold_batchnorm(dense), "decomposed eager": cstar.fold_batchnorm(factorised)}
    variants["dense compiled"] = torch.compile(variants["dense eager"], backend=s.compile_backend)
    variants["decomposed compiled"] = torch.compile(variants["decomposed eager"], backend=s.compile_backend)
    times = {name: [] for name in variants}
    with torch.inference_mode():
        reference = {name: variants[name.split()[0] + " eager"](x) for name in variants}
        for name, net in variants.items():  # warm-up (and compilation), checked against eager
            for _ in range(3):
                y = net(x)
            if (y - reference[name]).abs().max().item() > 1e-2:
                raise RuntimeError(f"{name} gives other outputs than eager mode")
        for _ in range(s.latency_rounds):
            for name, net in variants.items():
                for _ in range(s.latency_per_round):
                    _sync(device)
                    t0 = time.perf_counter()
                    net(x)
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
    rows = {name: {"median_ms": _median_ms(t)} for name, t in times.items()}
    for mode in ("eager", "compiled"):
        rows[f"speed-up {mode}"] = round(rows[f"dense {mode}"]["median_ms"] / rows[f"decomposed {mode}"]["median_ms"], 3)
    return {"width": s.width, "macs_ratio": plan.achieved_macs_ratio, "compile_backend": s.compile_backend,
            "batch": 1, "results": rows}


def _synthetic_mnist(root: Path) -> Path:
    """MNIST-format idx files of :func:`_synthetic` digits (so that the CLI runs with no download)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 512), ("t10k", 128)):
        ds = _synthetic(n, shape=(1, 28, 28), seed=0 if split == "train" else 1, spec="mnist")
        images = ds.images[:, 0].numpy()
        header = np.array([0x0803, n, 28, 28], dtype=">i4").tobytes()
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = np.array([0x0801, n], dtype=">i4").tobytes()
        labels = ds.labels.numpy().astype(np.uint8)
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    return root


def cli_end_to_end(s: Settings, out: Path) -> dict:
    root = _synthetic_mnist(out / "mnist-synthetic")
    section = "{epochs: 1, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 32, check_size: 32}"
    common = ["--model", "small_cnn", "--data", "mnist", "--root", str(root), "--train-n", "256", "--val-size", "64",
              "--eval-n", "64", "--eval-attacks", "clean,pgd2", "--device", s.device, "--no-progress"]
    runs = {
        "compress": ["compress", *common, "--ratio", "4", "--dense", section, "--search", section,
                     "--admm", "{interval: 2, rho: 0.01}", "--finetune", section, "--out", str(out / "compress")],
        "compare": ["compare", *common, "--ratios", "4", "--methods", "dense,cstar,magnitude", "--dense", section,
                    "--search", section, "--finetune", section, "--latency-runs", "3", "--out", str(out / "compare")],
    }
    rows = {}
    for name, argv in runs.items():
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "cstar", *argv], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"cstar {name} exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        results = json.loads((out / name / "results.json").read_text())
        accuracy = results.get("accuracy") or {c: cell["accuracy"] for c, cell in results["cells"].items()}
        rows[name] = {"seconds": round(time.perf_counter() - t0, 1), "accuracy": accuracy}
    model = cstar.load(out / "compress" / "model", map_location=s.device)
    rows["compress"]["reloaded_on"] = str(next(model.parameters()).device)
    return rows


# --- driver -------------------------------------------------------------------------------------------------------

def _machine(s: Settings) -> dict:
    device = torch.device(s.device)
    record = machine(device)
    record.pop("command", None)
    if device.type == "cuda":
        record.update(gpus=torch.cuda.device_count(), capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                      bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                      memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return record


def _table(report: dict) -> str:
    lines = [f"# GPU check ({report['machine']['device_name']}, torch {report['machine']['torch']}, "
             f"{'tiny CPU setting' if report['settings']['tiny'] else 'full setting'})", "",
             "| item | status | seconds | figures |", "|---|---|---|---|"]
    for name in ITEMS:
        item = report["items"].get(name)
        if item is None:
            lines.append(f"| {name} | not run | | |")
            continue
        figures = {k: v for k, v in item.items() if k not in ("status", "seconds")}
        text = json.dumps(figures, separators=(", ", ": "))
        lines.append(f"| {name} | {item['status']} | {item.get('seconds', '')} | `{text[:600]}` |")
    return "\n".join(lines) + "\n"


def run(s: Settings, out: Path, only: list[str]) -> int:
    (out / "work").mkdir(parents=True, exist_ok=True)
    report = {"machine": _machine(s), "settings": asdict(s), "items": {}}
    functions = {name: globals()[name] for name in ITEMS}
    for name in only or ITEMS:
        print(f"gpu_check: {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            item = functions[name](s, out / "work")
            item = {"status": item.pop("status", "ok"), **item}
        except Exception as exc:  # an item's failure is a finding: record it and go on
            item = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-3000:]}
        item["seconds"] = round(time.perf_counter() - t0, 1)
        report["items"][name] = item
        print(f"gpu_check: {name} {item['status']} in {item['seconds']} s", flush=True)
        write_json(out / "gpu_check.json", report)
        write_text(out / "gpu_check.md", _table(report))
    print(_table(report))
    return 1 if any(item["status"] == "failed" for item in report["items"].values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json / .md and scratch files")
    parser.add_argument("--device", default=None, help="default: cuda when visible, else cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU setting that CI runs)")
    parser.add_argument("--only", default="", help=f"comma-separated items (default: all of {', '.join(ITEMS)})")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = Settings.tiny_cpu() if args.tiny else Settings(device=device)
    if args.device:
        settings = Settings(**{**asdict(settings), "device": args.device})
    only = [name for name in args.only.split(",") if name]
    unknown = [name for name in only if name not in ITEMS]
    if unknown:
        parser.error(f"unknown item(s) {', '.join(unknown)}: choose from {', '.join(ITEMS)}")
    if args.worker == "process_group":
        _process_group_worker(settings, args.out)
        return 0
    torch.manual_seed(0)
    return run(settings, args.out, only)


if __name__ == "__main__":
    sys.exit(main())
