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
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import _smoke, attacks, distributed
from .data import BatchLoader
from ._errors import CstarError, check_options
from ._memory_format import ONEDNN_IC_BLOCK, channels_last_unsafe_convs
from ._io import (append_jsonl, atomic_write_text, load_checkpoint, load_latest_checkpoint, previous_checkpoint,
                  save_checkpoint, state_mismatch)
from ._signals import Interrupted, stop_requests

METHODS = ("pgd", "fgsm_rs", "nfgsm", "trades", "clean")
SCHEDULES = ("cosine", "onecycle", "multistep", "constant")
OPTIMIZERS = ("sgd", "adam")
AMP_DTYPES = ("auto", "bfloat16", "float16")
POLL_EVERY = 8  # optimiser steps between the checks that need a host sync (divergence; under torchrun also signals)


@dataclass
class TrainConfig:
    """Settings of an adversarial training run (defaults: PGD-10 AT with SGD, as for CIFAR-10).

    ``eps`` and ``attack_step`` are L-inf radii in input units ([0, 1] images);
    ``eps=None`` (default) is the training data's threat model, read by :func:`fit`
    from a loader of :func:`cstar.data.make_loader` (MNIST 0.3, Fashion-MNIST 0.1,
    CIFAR and SVHN 8/255, ImageNet folders 4/255), as the command line does.
    ``attack_step=None`` picks the method's usual step: ``2.5 * eps / attack_steps``
    for PGD and TRADES, ``1.25 * eps`` for FGSM-RS, ``eps`` for N-FGSM.
    ``eps_warmup_epochs`` ramps eps linearly from 0 (helps MNIST at eps 0.3).
    ``distill`` in [0, 1] (default 0, off) mixes adversarial distillation from a
    robust teacher into the loss, as ARD and RSLAD do (Goldblum et al. 2020;
    Zi et al. 2021): ``(1 - distill) * method loss + distill * T^2 *
    KL(teacher(x) / T || student(x_adv) / T)`` with ``T = distill_temperature``,
    the teacher's soft labels taken on the clean batch and the student's on the
    method's adversarial one; :func:`fit` needs ``teacher=`` (``compress`` and
    ``compare`` pass the dense model to every phase after it).
    ``lr`` is the peak learning rate; ``warmup_epochs`` ramps it linearly first.
    ``amp`` trains under ``torch.autocast`` in ``amp_dtype``: "auto" (default)
    is bfloat16 on GPUs that support it (no loss scaling needed) and float16
    with a GradScaler on older GPUs, and nothing on the CPU (a warning says so);
    "bfloat16" or "float16" forces that type on any device. Under float16 the
    attacks rescale each example's loss gradient so that it cannot underflow
    (see :mod:`cstar.attacks`), and a step whose gradients overflow is skipped
    (the learning-rate schedule and the hooks' ``after_step`` then wait). The
    type used is recorded in every epoch record (``amp``).
    ``channels_last`` trains in NHWC memory format (1.3x faster for a width-16
    ResNet-18 on 2 CPU cores here; the same arithmetic); on the CPU it is turned
    off, with a warning, for models that oneDNN mis-trains in NHWC
    (:func:`cstar._memory_format.channels_last_unsafe_convs`).
    ``check_size`` images of the validation set get a PGD-``check_steps`` check
    after every epoch; ``select="best"`` keeps the epoch with the best check.
    Under torchrun (:mod:`cstar.distributed`) ``batch_size`` is per process (the
    global batch is ``batch_size * world_size``) and BatchNorm statistics are per
    process unless ``sync_bn`` (CUDA only) computes them over the global batch.
    """

    method: str = "pgd"
    epochs: int = 10
    batch_size: int = 128
    eps: float | None = None
    attack_steps: int = 10
    attack_step: float | None = None
    eps_warmup_epochs: float = 0.0
    trades_beta: float = 6.0
    distill: float = 0.0
    distill_temperature: float = 1.0
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: float | None = None
    amp: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    check_size: int = 512
    check_steps: int = 10
    overfit_guard: bool = True
    select: str = "last"
    seed: int = 0
    progress: bool = True
    sync_bn: bool = False

    def __post_init__(self) -> None:
        self.validate()
        if _smoke.active():  # documentation examples as tests: a token budget (see cstar._smoke)
            self.epochs = min(self.epochs, _smoke.EPOCHS)
            self.check_size = min(self.check_size, _smoke.CHECK_IMAGES)

    def validate(self) -> None:
        """Raise :class:`CstarError` on a value that cannot work."""
        _choice("method", self.method, METHODS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("select", self.select, ("last", "best"))
        _choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        if self.eps is not None and not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps)
                                         and 0 <= self.eps <= 1):
            raise CstarError(f"eps={self.eps} is out of range: inputs are in [0, 1], so use 0 <= eps <= 1 (e.g. 8/255 = {8/255:.5f})")
        if self.method not in ("clean",) and self.eps == 0:
            raise CstarError(f"eps=0 with method '{self.method}' is clean training: pass --method clean or a positive --eps")
        for name in ("epochs", "batch_size", "attack_steps", "check_steps"):
            if int(getattr(self, name)) < 1:
                raise CstarError(f"{name}={getattr(self, name)} must be at least 1")
        if self.check_size < 0:
            raise CstarError(f"check_size={self.check_size} must be >= 0 (0 turns the per-epoch PGD check off)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise CstarError(f"lr={self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise CstarError(f"weight_decay={self.weight_decay} must be >= 0")
        if self.attack_step is not None and not self.attack_step > 0:
            raise CstarError(f"attack_step={self.attack_step} must be positive (or omitted for the method's default)")
        if not (isinstance(self.distill, (int, float)) and 0 <= self.distill <= 1):
            raise CstarError(f"distill={self.distill} must be in [0, 1]: the weight of the distillation term "
                             "(0 turns it off)")
        if not (isinstance(self.distill_temperature, (int, float)) and self.distill_temperature > 0):
            raise CstarError(f"distill_temperature={self.distill_temperature} must be positive (1 keeps the logits)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise CstarError(f"grad_clip={self.grad_clip} must be positive (or omitted to turn clipping off)")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a YAML config); unknown keys are an error."""
        check_options(values, [f.name for f in fields(cls)], "training")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_eps_of(self, spec) -> "TrainConfig":
        """This config, with ``eps`` from dataset ``spec`` (a :class:`cstar.data.DatasetSpec`) when it is None."""
        return self if self.eps is not None else replace(self, eps=spec.eps)

    def summary(self) -> str:
        """One line for reports, e.g. ``"2 epoch(s) of pgd-5 (eps 0.3, adam lr 0.001, cosine)"``."""
        attack = f"{self.method}-{self.attack_steps}" if self.method in ("pgd", "trades") else self.method
        eps = "" if self.eps is None else f"eps {self.eps:.4g}, "
        distill = f", distilled {self.distill:g} at T {self.distill_temperature:g}" if self.distill else ""
        return f"{self.epochs} epoch(s) of {attack} ({eps}{self.optimizer} lr {self.lr:g}, {self.schedule}{distill})"

    def step_size(self) -> float:
        if self.eps is None:
            raise CstarError("TrainConfig.eps is not set: pass eps= (fit sets it from a cstar.data loader's dataset)")
        if self.attack_step is not None:
            return self.attack_step
        if self.method in ("pgd", "trades"):
            return 2.5 * self.eps / self.attack_steps
        if self.method == "fgsm_rs":
            return 1.25 * self.eps
        return self.eps


class TrainHook:
    """Extends :func:`fit` without forking it (ADMM is one); every method is optional.

    ``penalty(model)`` returns a scalar added to the loss of every step (or None);
    ``after_step(model, step)`` runs after each optimiser step (``step`` counts
    the steps taken, from 1 over the whole run: a step that a float16
    GradScaler skipped is not counted); ``after_epoch(model, record)`` may add fields to
    the epoch's log record; ``state_dict``/``load_state_dict`` put the hook's
    state into the checkpoint so that ``resume`` restores it.
    """

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def after_epoch(self, model: nn.Module, record: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _choice(name: str, value: str, valid: Iterable[str]) -> None:
    if value not in valid:
        raise CstarError(f"unknown {name} '{value}': choose one of {', '.join(valid)}")


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


def _training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, eps: float,
                   amp_dtype: torch.dtype | None, teacher: nn.Module | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's loss on one batch (distilled from ``teacher`` when ``config.distill``), and the logits it
    was computed from.

    ``model`` may be a DistributedDataParallel wrapper: attacks then run on the
    plain module inside, so that only the loss forward goes through the wrapper
    (DDP sees one forward and one backward per step).
    """
    loss, logits = _method_loss(model, x, y, config, eps, amp_dtype)
    if not config.distill:
        return loss, logits
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        soft = F.softmax(teacher(x).float() / config.distill_temperature, dim=1)
    t = config.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft, reduction="batchmean") * t * t
    return (1 - config.distill) * loss + config.distill * kl, logits


def _method_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, eps: float,
                 amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training method's own loss on one batch, and the (adversarial) logits it was computed from."""
    step = config.step_size() * (eps / config.eps if config.eps else 1.0)
    raw = distributed.unwrap(model)
    if config.method == "clean" or eps == 0:
        x_train = x
    elif config.method == "pgd":
        x_train = attacks.pgd(raw, x, y, eps, step, config.attack_steps, amp_dtype=amp_dtype)
    elif config.method == "fgsm_rs":
        x_train = attacks.fgsm(raw, x, y, eps, random_start=True, step=step, amp_dtype=amp_dtype)
    elif config.method == "nfgsm":
        x_train = attacks.nfgsm(raw, x, y, eps, noise=2 * eps, step=step, amp_dtype=amp_dtype)
    else:  # trades
        return _trades_loss(model, x, y, config, eps, step, amp_dtype)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x_train)
    return F.cross_entropy(logits.float(), y), logits


def _trades_loss(model, x, y, config, eps, step, amp_dtype):
    """TRADES (Zhang et al. 2019): CE on clean inputs + beta * KL(clean || adversarial).

    The clean targets and the attack use the plain module; the two loss forwards use ``model``.
    """
    raw = distributed.unwrap(model)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        clean_probs = F.softmax(raw(x).float(), dim=1)

    def kl_to_clean(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(logits.float(), dim=1), probs, reduction="sum")

    x_adv = attacks.pgd(raw, x, clean_probs, eps, step, config.attack_steps, loss_fn=kl_to_clean, amp_dtype=amp_dtype)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits_clean = model(x)
        logits_adv = model(x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1), F.softmax(logits_clean.float(), dim=1),
                      reduction="batchmean")
    return F.cross_entropy(logits_clean.float(), y) + config.trades_beta * robust, logits_adv


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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore :func:`_rng_state`'s states wherever the checkpoint's tensors were loaded.

    RNG states must be CPU byte tensors; a checkpoint written with more GPUs
    than this machine has restores the generators of the GPUs it has.
    """
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def resolve_amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast type of a run on ``device`` (None: float32); see :class:`TrainConfig` ``amp``."""
    if not config.amp:
        return None
    if config.amp_dtype != "auto":
        return getattr(torch, config.amp_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    warnings.warn("amp=True has no effect on the CPU: training in float32 (amp_dtype='bfloat16' forces "
                  "bfloat16 autocast on a CPU that supports it)", stacklevel=3)
    return None


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


def _with_data_eps(config: TrainConfig, loader) -> TrainConfig:
    """``config`` with ``eps=None`` replaced by the threat model of ``loader``'s dataset (0 for clean
    training without the per-epoch PGD check, which needs no radius)."""
    if config.eps is not None:
        return config
    spec = getattr(getattr(loader, "data", None), "spec", None)
    if spec is None and config.method == "clean" and config.check_size == 0:
        return replace(config, eps=0.0)  # nothing adversarial happens: no radius needed
    if spec is None:
        raise CstarError(f"TrainConfig.eps is not set and the {type(loader).__name__} does not say its dataset's "
                         "threat model: pass eps= (e.g. TrainConfig(eps=8/255)), or build the loader with "
                         "cstar.data.make_loader")
    return config.with_eps_of(spec)


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
    :class:`cstar._signals.Interrupted`. ``hooks`` (:class:`TrainHook`) add loss
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
    eval-mode copy of it on ``model``'s device is used.
    """
    hooks = list(hooks)
    config = _with_data_eps(config, train_loader)
    teacher = _checked_teacher(teacher, config, model)
    main = distributed.is_main()  # under torchrun only rank 0 writes files and prints
    device = next(model.parameters()).device
    amp_dtype = resolve_amp_dtype(config, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    scaled = scaler.is_enabled()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    if config.channels_last and device.type == "cpu" and (unsafe := channels_last_unsafe_convs(model)):
        warnings.warn(f"channels_last is off for this run: oneDNN computes wrong weight gradients (or crashes) in "
                      f"NHWC for 1x1 strided convs with fewer than {ONEDNN_IC_BLOCK} input channels, as "
                      f"{', '.join(unsafe)} (uxlfoundation/oneDNN#6035); training in NCHW, the same arithmetic",
                      stacklevel=2)
        memory_format = torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = make_optimizer(model, config)
    train_loader, val = _held_out_check(train_loader, val, config)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise CstarError(f"the training set gives no batch of size {config.batch_size}: lower --batch-size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s, steps_per_epoch))
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    if out is not None and main:
        out.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    best = {"epoch": -1, "robust": -1.0}  # the epoch with the best PGD check
    best_state = None  # its weights, when this process saw that epoch
    start_epoch = 0
    partial = {"batches": 0, "seen": 0, "correct": 0, "loss_sum": 0.0, "seconds": 0.0}  # of an interrupted epoch
    torch.manual_seed(config.seed)

    if resume and ckpt_path is not None and (ckpt_path.exists() or previous_checkpoint(ckpt_path).exists()):
        # on the CPU: RNG states must stay there, and the optimiser moves its own state to the parameters
        state = load_latest_checkpoint(ckpt_path, map_location="cpu")
        _check_resumable(state, model, config, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaled and state.get("scaler"):  # a run started without float16 AMP saved no scaler state
            scaler.load_state_dict(state["scaler"])
        history, best, start_epoch = state["history"], state["best"], state["epoch"]
        partial = state.get("partial") or partial
        if not main:  # rank 0's checkpoint holds the interrupted epoch's counts of all ranks
            partial = {**partial, "seen": 0, "correct": 0, "loss_sum": 0.0}
        _set_rng_state(state["rng"])
        for hook, hook_state in zip(hooks, state.get("hooks", [])):
            hook.load_state_dict(hook_state)
        # the log may hold epochs finished after this checkpoint was written: rewrite it from the checkpoint
        if main:
            atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
            where = f"epoch {start_epoch + 1}" + (f", batch {partial['batches'] + 1}" if partial["batches"] else "")
            print(f"{name + ': ' if name else ''}resuming {ckpt_path} at {where} of {config.epochs}", flush=True)

    def checkpoint(epoch: int, batches: dict | None = None) -> None:
        if not main:
            return
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "partial": batches, "config": config.to_dict(), "history": history, "best": best,
            "rng": _rng_state(), "model_config": getattr(model, "cstar_config", None),
            "hooks": [hook.state_dict() for hook in hooks]}, keep_previous=True)

    stopped_early = False
    with stop_requests() as stop, distributed.sync_batchnorm(model, config.sync_bn):
        trainer = distributed.wrap(model)  # DDP under torchrun: the loss forward/backward go through it
        for epoch in range(start_epoch, config.epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            model.train()
            t0 = time.perf_counter() - partial["seconds"]
            done = partial["batches"]
            tally = _Tally(device, partial["seen"], partial["correct"], partial["loss_sum"])
            partial = {"batches": 0, "seen": 0, "correct": 0, "loss_sum": 0.0, "seconds": 0.0}
            bar = tqdm(train_loader, desc=f"{name + ' ' if name else ''}epoch {epoch + 1}/{config.epochs}",
                       disable=not (config.progress and main and sys.stderr.isatty()), leave=False,
                       dynamic_ncols=True)
            checked = False  # the batch's value range is checked once an epoch, not by every attack call
            for i, (x, y) in enumerate(bar):
                if i < done:  # resumed mid-epoch: replay the loader's order up to where the run stopped
                    continue
                if not checked and config.method != "clean":
                    attacks.check_inputs(x, y, (0.0, 1.0))
                    checked = True
                x = x.contiguous(memory_format=memory_format)
                progress = epoch + i / steps_per_epoch
                eps = config.eps * min(1.0, progress / config.eps_warmup_epochs) if config.eps_warmup_epochs else config.eps
                with attacks.inputs_checked():
                    loss, logits = _training_loss(trainer, x, y, config, eps, amp_dtype, teacher)
                for hook in hooks:
                    extra = hook.penalty(model)
                    if extra is not None:
                        loss = loss + extra
                if _optimizer_step(optimizer, scaler, loss, model, config.grad_clip):
                    scheduler.step()
                    for hook in hooks:  # the optimiser steps taken so far (skipped ones not counted)
                        hook.after_step(model, scheduler.last_epoch)
                tally.add(i + 1, loss, logits, y)
                last = i == steps_per_epoch - 1
                poll_due = last or (i + 1) % POLL_EVERY == 0
                if not (poll_due or (stop.requested and not distributed.is_distributed())):
                    continue
                stopping, diverged = _poll(stop.requested, tally, scaled)
                if diverged:
                    raise _diverged_error(epoch, tally, scaled, ckpt_path)
                seen, correct, loss_sum = tally.counts()
                bar.set_postfix(loss=f"{loss_sum / max(1, seen):.3f}", acc=f"{correct / max(1, seen):.3f}",
                                img_s=f"{seen / (time.perf_counter() - t0):.0f}")
                if stopping and not last:  # all ranks stop together
                    totals = distributed.all_reduce_sum([seen, correct, loss_sum])
                    _stop(out, checkpoint, epoch, i + 1, steps_per_epoch, stop.signum or signal.SIGTERM, {
                        "batches": i + 1, **dict(zip(("seen", "correct", "loss_sum"), totals)),
                        "seconds": time.perf_counter() - t0})
            train_time = time.perf_counter() - t0
            seen, correct, loss_sum = distributed.all_reduce_sum(tally.counts())  # over all ranks
            distributed.broadcast_tensors(list(model.buffers()))  # per-rank BatchNorm statistics: take rank 0's
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], "eps": eps,
                      "train_loss": loss_sum / seen, "train_adv_acc": correct / seen,
                      "train_seconds": round(train_time, 2), "images_per_second": round(seen / train_time, 1)}
            if amp_dtype is not None:
                record["amp"] = str(amp_dtype).removeprefix("torch.")
            if val is not None and config.check_size > 0:
                xv, yv = val[0][:config.check_size], val[1][:config.check_size]
                record["val_clean"], record["val_pgd"] = _sharded_check(model, xv, yv, config.eps, config.check_steps)
                if record["val_pgd"] > best["robust"]:
                    best.update(epoch=epoch + 1, robust=record["val_pgd"])
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    if out is not None and main:
                        save_checkpoint(out / "best.pt",
                                        {"model": best_state, "epoch": epoch + 1, "val_pgd": best["robust"]})
                stopped_early = _robustness_collapsed(record, best, config, hooks)
            for hook in hooks:
                hook.after_epoch(model, record)
            history.append(record)
            if main:
                _print_record(record, config, name)
            if out is not None and main:
                append_jsonl(out / "metrics.jsonl", record)
                checkpoint(epoch + 1)
            if stopped_early:
                break
            if distributed.any_rank(stop.requested) and epoch + 1 < config.epochs:
                _stop(out, None, epoch + 1, 0, steps_per_epoch, stop.signum or signal.SIGTERM, None)

    if (config.select == "best" or stopped_early) and best["epoch"] > 0 and best["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(best_state if best_state is not None else
                              load_checkpoint(out / "best.pt", map_location=device)["model"])
        if main:
            print(f"restored the weights of epoch {best['epoch']} (best PGD check {best['robust']:.3f})")
    return history


def _stop(out: Path | None, checkpoint, epoch: int, batches: int, steps_per_epoch: int, signum: int,
          partial: dict | None) -> None:
    """Write the mid-epoch checkpoint (when ``checkpoint`` is given) and raise :class:`Interrupted`."""
    if out is not None and checkpoint is not None:
        checkpoint(epoch, partial)
    where = (f"checkpoint written to {out / 'checkpoint.pt'}; continue with --resume" if out is not None
             else "no output directory, so no checkpoint was written")
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name} at epoch {epoch + 1}, batch "
                      f"{batches}/{steps_per_epoch}: {where}", signum)


def _robustness_collapsed(record: dict, best: dict, config: TrainConfig, hooks: list | None = None) -> bool:
    """True (with a warning) when the PGD check fell below half its best: catastrophic overfitting."""
    robust = record["val_pgd"]
    collapsed = best["robust"] >= 0.05 and robust < 0.5 * best["robust"]
    if collapsed:
        record["catastrophic_overfitting"] = True
        warnings.warn(
            f"catastrophic overfitting at epoch {record['epoch']}: PGD-{config.check_steps} check fell to "
            f"{robust:.3f} from {best['robust']:.3f} (epoch {best['epoch']})"
            + ("; stopping and restoring the best epoch" if config.overfit_guard else "")
            + f". To avoid it: lower lr (now {config.lr:g}; --lr, or 'lr' in the training section)"
            + (", or train with method pgd or nfgsm (--method) instead of fgsm_rs" if config.method == "fgsm_rs"
               else ", or use a multi-step attack (method pgd)" if config.method == "nfgsm" else "")
            + ("; in an ADMM phase, a smaller rho (--admm '{rho: ...}') pulls the weights less hard"
               if hooks else ""), stacklevel=3)
    return collapsed and config.overfit_guard


def _print_record(record: dict, config: TrainConfig, name: str | None = None) -> None:
    if not config.progress:
        return
    text = (f"{name + ': ' if name else ''}epoch {record['epoch']:>3}/{config.epochs}  loss {record['train_loss']:.4f}  "
            f"adv-acc {record['train_adv_acc']:.4f}  lr {record['lr']:.4g}  {record['images_per_second']:.0f} img/s")
    if "val_pgd" in record:
        text += f"  check: clean {record['val_clean']:.3f} pgd{config.check_steps} {record['val_pgd']:.3f}"
    if "admm_residual_mean" in record:
        text += f"  ADMM residual {record['admm_residual_mean']:.4f} (rho {record['admm_rho']:.3g})"
    print(text, flush=True)


def _check_resumable(state: dict, model: nn.Module, config: TrainConfig, path: Path) -> None:
    """One line, before anything is loaded, when the checkpoint belongs to another model or optimiser."""
    weights = state.get("model")
    problem = (state_mismatch(model, {k: v.shape for k, v in weights.items()}) if isinstance(weights, dict)
               else "no weights")
    if problem:
        saved = (state.get("model_config") or {}).get("name", "another architecture")
        raise CstarError(f"{path} holds a {saved} that does not fit this model ({problem}): resume with the "
                         "model the run started with, or start a new run in another --out")
    saved_optimizer = (state.get("config") or {}).get("optimizer")
    if saved_optimizer not in (None, config.optimizer):
        raise CstarError(f"{path} was trained with optimizer {saved_optimizer}, this run asks for "
                         f"{config.optimizer}: resume with optimizer {saved_optimizer}, or start a new run")
