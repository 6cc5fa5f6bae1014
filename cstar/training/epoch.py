"""One epoch of adversarial training (:func:`train_one_epoch`) and the device-side bookkeeping that
keeps its steps free of host syncs."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import attacks, distributed
from .._core.errors import CstarError
from .._core.memory_format import to_channels_last
from .config import POLL_EVERY, TrainConfig, TrainHook
from .losses import training_loss
from .state import interrupt


class _Tally:
    """An epoch's running counts, kept on the device so that a training step needs no host sync.

    ``seen`` is a host int (batch sizes are known there); ``correct`` and
    ``loss_sum`` are device tensors; a non-finite loss is left out of
    ``loss_sum`` and remembered: the first such step (1-based, ``bad_step``)
    and the longest run of them (``bad_streak``).
    """

    def __init__(self, device: torch.device, seen: int = 0, correct: float = 0, loss_sum: float = 0.0) -> None:
        self.seen = seen
        self.correct = torch.tensor(float(correct), dtype=torch.float64, device=device)
        self.loss_sum = torch.tensor(float(loss_sum), dtype=torch.float64, device=device)
        self.bad_step = torch.tensor(0, device=device)
        self._streak = torch.tensor(0, device=device)
        self.bad_streak = torch.tensor(0, device=device)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        loss = loss.detach()
        finite = torch.isfinite(loss)
        self.seen += len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.loss_sum += torch.where(finite, loss, torch.zeros_like(loss)).double() * len(y)
        self.bad_step = torch.where((self.bad_step == 0) & ~finite, step, self.bad_step)
        self._streak = (self._streak + 1) * (~finite)
        self.bad_streak = torch.maximum(self.bad_streak, self._streak)

    def diverged(self, scaled: bool) -> torch.Tensor:
        """A device bool: a non-finite loss (without a GradScaler), or ``POLL_EVERY`` in a row (with one,
        which skips the steps whose gradients overflow)."""
        return self.bad_streak >= POLL_EVERY if scaled else self.bad_step > 0

    def counts(self) -> list:
        """``[seen, correct, loss_sum]`` as host numbers (one sync)."""
        correct, loss_sum = torch.stack([self.correct, self.loss_sum]).tolist()
        return [self.seen, int(round(correct)), loss_sum]


def _poll(stop_requested: bool, tally: _Tally, scaled: bool) -> tuple[bool, bool]:
    """(stop, diverged), agreed by every rank: one collective and one host sync."""
    device = tally.correct.device
    flags = torch.stack([torch.tensor(float(stop_requested), dtype=torch.float64, device=device),
                         tally.diverged(scaled).double()])
    stop, diverged = distributed.all_reduce_sum(flags).tolist()
    return stop > 0, diverged > 0


def _diverged_error(epoch: int, tally: _Tally, scaled: bool, ckpt_path: Path | None) -> CstarError:
    where = (f"the last good checkpoint is {ckpt_path}" if ckpt_path and ckpt_path.exists()
             else "no checkpoint was written yet")
    if scaled:
        what = f"the float16 loss was non-finite for {POLL_EVERY} steps in a row, so GradScaler could not recover"
        fix = "lower lr, set grad_clip, or use amp_dtype bfloat16"
    else:  # the first non-finite step of any rank (under DDP the others inherit its gradients)
        bad = [step for step in distributed.all_gather_object(int(tally.bad_step.item())) if step > 0]
        what = f"step {min(bad)} (the loss is not finite)"
        fix = "lower lr (training settings, e.g. --lr) or set grad_clip (--grad-clip)"
    return CstarError(f"training diverged at epoch {epoch + 1}, {what}; {where}: {fix}")


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loss: torch.Tensor,
                    model: nn.Module, grad_clip: float | None) -> bool:
    """Backward and step; False when GradScaler skipped the step (float16 overflow: one host sync)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not scaler.is_enabled():
        optimizer.step()
        return True
    scale = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped


@dataclass
class EpochContext:
    """What every epoch of one :func:`cstar.fit` run shares."""

    model: nn.Module  # the plain module (hooks and checkpoints see it)
    trainer: nn.Module  # what the loss forward goes through: ``model`` or its DDP wrapper
    loader: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    config: TrainConfig
    hooks: list[TrainHook]
    teacher: nn.Module | None
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    ckpt_path: Path | None
    name: str | None
    main: bool


def train_one_epoch(run: EpochContext, epoch: int, partial: dict, stop_request,
                    save_partial: Callable[[dict], None]) -> tuple[list, float, float]:
    """Train ``run.model`` for epoch ``epoch`` (0-based), from batch ``partial["batches"]`` when resumed
    mid-epoch; return the global ``[seen, correct, loss_sum]``, the epoch's seconds and its last eps.

    A stop request (SIGINT/SIGTERM) ends the epoch at the next poll: ``save_partial(counts)`` writes the
    mid-epoch checkpoint and :class:`cstar._core.signals.Interrupted` is raised.
    """
    config, steps_per_epoch = run.config, len(run.loader)
    device = next(run.model.parameters()).device
    scaled = run.scaler.is_enabled()
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(epoch)
    run.model.train()
    t0 = time.perf_counter() - partial["seconds"]
    done = partial["batches"]
    tally = _Tally(device, partial["seen"], partial["correct"], partial["loss_sum"])
    bar = tqdm(run.loader, desc=f"{run.name + ' ' if run.name else ''}epoch {epoch + 1}/{config.epochs}",
               disable=not (config.progress and run.main and sys.stderr.isatty()), leave=False, dynamic_ncols=True)
    checked = False  # the batch's value range is checked once an epoch, not by every attack call
    eps = config.eps
    for i, (x, y) in enumerate(bar):
        if i < done:  # resumed mid-epoch: replay the loader's order up to where the run stopped
            continue
        if not checked and config.attack != "clean":
            attacks.check_inputs(x, y, (0.0, 1.0))
            checked = True
        x = to_channels_last(x) if run.memory_format == torch.channels_last else x.contiguous()
        progress = epoch + i / steps_per_epoch
        eps = config.eps * min(1.0, progress / config.eps_warmup_epochs) if config.eps_warmup_epochs else config.eps
        with attacks.inputs_checked():
            loss, logits = training_loss(run.trainer, x, y, config, eps, run.amp_dtype, run.teacher)
        for hook in run.hooks:
            extra = hook.penalty(run.model)
            if extra is not None:
                loss = loss + extra
        if _optimizer_step(run.optimizer, run.scaler, loss, run.model, config.grad_clip):
            run.scheduler.step()
            for hook in run.hooks:  # the optimiser steps taken so far (skipped ones not counted)
                hook.after_step(run.model, run.scheduler.last_epoch)
        tally.add(i + 1, loss, logits, y)
        last = i == steps_per_epoch - 1
        poll_due = last or (i + 1) % POLL_EVERY == 0
        if not (poll_due or (stop_request.requested and not distributed.is_distributed())):
            continue
        stopping, diverged = _poll(stop_request.requested, tally, scaled)
        if diverged:
            raise _diverged_error(epoch, tally, scaled, run.ckpt_path)
        seen, correct, loss_sum = tally.counts()
        bar.set_postfix(loss=f"{loss_sum / max(1, seen):.3f}", acc=f"{correct / max(1, seen):.3f}",
                        img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        if stopping and not last:  # all ranks stop together
            totals = distributed.all_reduce_sum([seen, correct, loss_sum])
            counts = {"batches": i + 1, **dict(zip(("seen", "correct", "loss_sum"), totals)),
                      "seconds": time.perf_counter() - t0}
            interrupt(run.ckpt_path, lambda: save_partial(counts), epoch, i + 1, steps_per_epoch,
                 stop_request.signum or signal.SIGTERM)
    seconds = time.perf_counter() - t0
    return distributed.all_reduce_sum(tally.counts()), seconds, eps
