"""Adversarial training: PGD-AT (Madry), FGSM-RS, N-FGSM and TRADES.

:func:`fit` trains any ``nn.Module`` that maps images in [0, 1] to logits. Each
epoch it logs a JSON record (loss, adversarial training accuracy, learning rate,
images per second, and a PGD check on a held-out set), writes a checkpoint
atomically, and watches the PGD check for catastrophic overfitting (the robust
accuracy of single-step training collapsing while training accuracy rises):
when it happens, training stops and the best epoch's weights are restored.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .. import attacks, distributed
from ..data import BatchLoader
from .._core import log
from .._core.errors import CstarError
from .._core.io import append_jsonl, atomic_write_text, load_latest_checkpoint
from .._core.memory_format import ONEDNN_IC_BLOCK, channels_last_unsafe_convs
from .._core.precision import cpu_has_bfloat16
from .._core.signals import stop_requests
from .config import AMP_DTYPES, ATTACKS, OPTIMIZERS, POLL_EVERY, SCHEDULES, TrainConfig, TrainHook
from .epoch import EpochContext, train_one_epoch
from .state import BestEpoch, Checkpointer, Progress, check_resumable, interrupt

__all__ = ["AMP_DTYPES", "ATTACKS", "OPTIMIZERS", "POLL_EVERY", "SCHEDULES", "TrainConfig", "TrainHook", "fit",
           "lr_factor", "make_optimizer", "resolve_amp_dtype", "robust_check"]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on all parameters) or Adam (decoupled weight decay)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_factor(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based), in [0, 1]."""
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    if config.schedule == "onecycle":
        # Triangle: 0 -> peak at 40% of the run -> 0 at the end (Wong et al. 2020).
        peak = 0.4 * total
        return step / peak if step < peak else max(0.0, (total - step) / (total - peak))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1.0, total - warmup)
    if config.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "multistep":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def robust_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10,
                 batch_size: int = 256, seed: int = 0) -> tuple[float, float]:
    """(clean, PGD-``steps``) accuracy on (x, y); step ``2.5 * eps / steps``, eval mode."""
    was_training = model.training
    model.eval()
    try:
        clean = _accuracy(model, x, y, batch_size)
        generator = torch.Generator(device=x.device).manual_seed(seed)
        correct = 0
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            x_adv = attacks.pgd(model, xb, yb, eps, 2.5 * eps / steps, steps, generator=generator)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum().item()
        return clean, correct / max(1, len(x))
    finally:
        model.train(was_training)


def _sharded_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> tuple[float, float]:
    """:func:`robust_check`, each rank checking its strided share; every rank gets the same totals."""
    r, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return robust_check(model, x, y, eps, steps)
    xs, ys = x[r::world], y[r::world]
    clean, robust = robust_check(model, xs, ys, eps, steps) if len(ys) else (0.0, 0.0)
    n_clean, n_robust, n = distributed.all_reduce_sum([round(clean * len(ys)), round(robust * len(ys)), len(ys)])
    return n_clean / n, n_robust / n


def _checked_teacher(teacher: nn.Module | None, config: TrainConfig, model: nn.Module) -> nn.Module | None:
    """The eval-mode, frozen teacher of a distilled run (None when ``config.distill`` is 0)."""
    if not config.distill:
        return None
    if not isinstance(teacher, nn.Module):
        raise CstarError(f"distill={config.distill:g} learns from a robust teacher: pass fit(..., teacher=model) "
                         "(compress and compare pass the dense model), or set distill=0")
    if teacher is model:
        raise CstarError("the teacher is the model being trained: pass a copy of the robust model")
    device = next(model.parameters()).device
    return copy.deepcopy(teacher).to(device).eval().requires_grad_(False)  # the caller's teacher is left alone


def _held_out_check(train_loader, val, config: TrainConfig):
    """(loader, val): without ``val``, a :class:`cstar.data.BatchLoader` gives up its data's last images
    (``check_size``, at most a tenth) for the per-epoch PGD check, so that a collapse is caught."""
    if val is not None or config.check_size == 0 or not isinstance(train_loader, BatchLoader):
        return train_loader, val
    n = min(config.check_size, len(train_loader.data) // 10)
    if n == 0 or (len(train_loader.data) - n) // train_loader.world_size < train_loader.batch_size:
        return train_loader, val
    warnings.warn(f"fit: no validation data given, so the last {n} training images are held out for the "
                  "per-epoch PGD check that catches a collapse of robustness (pass val=(x, y) to choose them, or "
                  "check_size=0 to train on every image without the check)", stacklevel=3)
    return train_loader.hold_out(n)


def resolve_amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of a run on ``device`` (None: float32); see :class:`TrainConfig` ``amp``."""
    if not config.amp:
        return None
    if config.amp_dtype != "auto":
        return getattr(torch, config.amp_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if cpu_has_bfloat16():  # AVX512-BF16 or AMX: bfloat16 runs natively
        return torch.bfloat16
    warnings.warn("amp=True has no effect on this CPU (no AVX512-BF16 or AMX): training in float32 "
                  "(amp_dtype='bfloat16' forces bfloat16 autocast, emulated and slower here)", stacklevel=3)
    return None


def _with_data_eps(config: TrainConfig, loader) -> TrainConfig:
    """``config`` with ``eps=None`` replaced by the threat model of ``loader``'s dataset (0 for clean
    training without the per-epoch PGD check, which needs no radius)."""
    if config.eps is not None:
        return config
    spec = getattr(getattr(loader, "data", None), "spec", None)
    if spec is None and config.attack == "clean" and config.check_size == 0:
        return replace(config, eps=0.0)  # nothing adversarial happens: no radius needed
    if spec is None:
        raise CstarError(f"TrainConfig.eps is not set and the {type(loader).__name__} does not say its dataset's "
                         "threat model: pass eps= (e.g. TrainConfig(eps=8/255)), or build the loader with "
                         "cstar.data.make_loader")
    return config.with_eps_of(spec)


def _memory_format(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.memory_format:
    """channels-last when asked for and safe on this device (oneDNN mis-trains some convs in NHWC)."""
    if not config.channels_last:
        return torch.contiguous_format
    if device.type == "cpu" and (unsafe := channels_last_unsafe_convs(model)):
        warnings.warn(f"channels_last is off for this run: oneDNN computes wrong weight gradients (or crashes) in "
                      f"NHWC for 1x1 strided convs with fewer than {ONEDNN_IC_BLOCK} input channels, as "
                      f"{', '.join(unsafe)} (uxlfoundation/oneDNN#6035); training in NCHW, the same arithmetic",
                      stacklevel=3)
        return torch.contiguous_format
    return torch.channels_last


def fit(model: nn.Module, train_loader, config: TrainConfig, *, val: tuple[torch.Tensor, torch.Tensor] | None = None,
        out_dir: str | Path | None = None, resume: bool = False, hooks: Iterable[TrainHook] = (),
        name: str | None = None, teacher: nn.Module | None = None) -> list[dict]:
    """Adversarially train ``model`` in place; return the per-epoch log records.

    ``train_loader`` yields ``(x, y)`` batches on the training device with x in
    [0, 1] (see :func:`cstar.data.make_loader`; ``set_epoch`` is called when it
    exists). ``val`` is an (images, labels) pair on that device for the per-epoch
    PGD check. With ``out_dir``, writes ``metrics.jsonl``, ``checkpoint.pt``
    (each epoch, atomically, keeping the one before as ``checkpoint.prev.pt``)
    and ``best.pt``; ``resume=True`` continues from ``checkpoint.pt`` (from
    ``checkpoint.prev.pt``, with a warning, when the latest is corrupt), at the
    batch where it stopped, on whatever device ``model`` is now. SIGINT/SIGTERM
    finish the current step, write a checkpoint and raise
    :class:`cstar._core.signals.Interrupted`. ``hooks`` (:class:`TrainHook`) add loss
    terms, per-step and per-epoch work, and checkpointed state. With the
    loader's seed and ``config.seed`` fixed, a resumed run on the CPU ends with
    the same weights and records as an uninterrupted one (timings aside). A
    training step makes no host sync of its own (float16 with a GradScaler
    makes one): divergence is checked every :data:`POLL_EVERY` steps and at the
    end of each epoch, and names the first non-finite step. Under torchrun (see
    :mod:`cstar.distributed`) every rank calls ``fit`` with its shard of the
    data; the model is wrapped in DistributedDataParallel for the training
    step, logged losses and accuracies are global, only rank 0 writes files and
    prints, and signals and divergence are polled together every
    :data:`POLL_EVERY` steps, so that all ranks stop at the same step. ``name``
    (e.g. a pipeline's phase) starts every log line; the progress bar shows
    only on a terminal, and the per-epoch line always (with ``config.progress``).
    ``teacher`` (needed when ``config.distill`` > 0, unused otherwise) is a
    robust model whose soft labels the student learns from; a frozen
    eval-mode copy of it on ``model``'s device is used. Training draws from
    torch's global generators seeded with ``config.seed``; the caller's random
    state is restored when ``fit`` returns.
    """
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _train(model, train_loader, config, val, out_dir, resume, list(hooks), name, teacher)


def _train(model: nn.Module, train_loader, config: TrainConfig, val, out_dir, resume: bool, hooks: list,
           name: str | None, teacher: nn.Module | None) -> list[dict]:
    """:func:`fit`'s work, inside its private random state."""
    config = _with_data_eps(config, train_loader)
    teacher = _checked_teacher(teacher, config, model)
    main = distributed.is_main()  # under torchrun only rank 0 writes files and prints
    device = next(model.parameters()).device
    amp_dtype = resolve_amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    memory_format = _memory_format(model, config, device)
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, config)
    train_loader, val = _held_out_check(train_loader, val, config)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise CstarError(f"the training set gives no batch of size {config.batch_size}: lower --batch-size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps_per_epoch))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
    saver = Checkpointer(out, main, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, hooks=hooks)
    progress = Progress()
    torch.manual_seed(config.seed)
    if resume and saver.exists():
        progress = _resume(saver, model, config, out, name)
    best = BestEpoch(progress, config, out, main)

    stopped_early = False
    with stop_requests() as stop, distributed.sync_batchnorm(model, config.sync_bn):
        run = EpochContext(model, distributed.wrap(model), train_loader, optimizer, scheduler, scaler, config, hooks,
                           teacher, amp_dtype, memory_format, saver.path, name, main)
        for epoch in range(progress.epoch, config.epochs):
            counts, seconds, eps = train_one_epoch(run, epoch, progress.take_partial(), stop,
                                                   lambda partial: saver.save(progress, config, epoch, partial))
            record = _epoch_record(model, optimizer, epoch, counts, seconds, eps, amp_dtype)
            if val is not None and config.check_size > 0:
                xv, yv = val[0][:config.check_size], val[1][:config.check_size]
                record["val_clean"], record["val_pgd"] = _sharded_check(model, xv, yv, config.eps, config.check_steps)
                stopped_early = best.update(record, model, hooks)
            for hook in hooks:
                hook.after_epoch(model, record)
            progress.history.append(record)
            if main:
                _print_record(record, config, name)
            if out is not None and main:
                append_jsonl(out / "metrics.jsonl", record)
            saver.save(progress, config, epoch + 1)
            if stopped_early:
                break
            if distributed.any_rank(stop.requested) and epoch + 1 < config.epochs:
                interrupt(saver.path, None, epoch + 1, 0, steps_per_epoch, stop.signum or signal.SIGTERM)
    best.restore_if_chosen(model, stopped_early)
    return progress.history


def _resume(saver: Checkpointer, model: nn.Module, config: TrainConfig, out: Path, name: str | None) -> Progress:
    """The run's state from its checkpoint (read on the CPU: RNG states must stay there, and the optimiser
    moves its own state to the parameters); the log is rewritten from it, as it may hold later epochs."""
    state = load_latest_checkpoint(saver.path, map_location="cpu")
    check_resumable(state, model, config, saver.path, saver.hooks)
    progress = saver.restore(state)
    if saver.main:
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in progress.history))
        batches = progress.partial["batches"]
        where = f"epoch {progress.epoch + 1}" + (f", batch {batches + 1}" if batches else "")
        doing = (f"all {config.epochs} epoch(s) done in {saver.path}" if progress.epoch >= config.epochs
                 else f"resuming {saver.path} at {where} of {config.epochs}")
        log.info(f"{name + ': ' if name else ''}{doing}")
    return progress


def _epoch_record(model: nn.Module, optimizer, epoch: int, counts: list, seconds: float, eps: float,
                  amp_dtype: torch.dtype | None) -> dict:
    """An epoch's log record from its global counts (the BatchNorm statistics of rank 0 taken by all)."""
    seen, correct, loss_sum = counts
    distributed.broadcast_tensors(list(model.buffers()))  # per-rank BatchNorm statistics: take rank 0's
    record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "eps": eps,
              "train_loss": loss_sum / seen, "train_adv_acc": correct / seen,
              "train_seconds": round(seconds, 2), "images_per_second": round(seen / seconds, 1)}
    if amp_dtype is not None:
        record["amp"] = str(amp_dtype).removeprefix("torch.")
    return record


def _print_record(record: dict, config: TrainConfig, name: str | None = None) -> None:
    if not config.progress:
        return
    text = (f"{name + ': ' if name else ''}epoch {record['epoch']:>3}/{config.epochs}  loss {record['train_loss']:.4f}  "
            f"adv-acc {record['train_adv_acc']:.4f}  lr {record['lr']:.4g}  {record['images_per_second']:.0f} img/s")
    if "val_pgd" in record:
        text += f"  check: clean {record['val_clean']:.3f} pgd{config.check_steps} {record['val_pgd']:.3f}"
    if "admm_residual_mean" in record:
        text += f"  ADMM residual {record['admm_residual_mean']:.4f} (rho {record['admm_rho']:.3g})"
    log.info(text)
