"""What :func:`cstar.fit` keeps across epochs and restarts: the checkpoint of its stateful objects
(:class:`Checkpointer`), the best epoch and the collapse guard (:class:`BestEpoch`), the RNG states."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .._core import log
from .._core.errors import CstarError
from .._core.io import load_checkpoint, previous_checkpoint, save_checkpoint, state_mismatch
from .._core.signals import Interrupted
from .config import TrainConfig, TrainHook

EMPTY_PARTIAL = {"batches": 0, "seen": 0, "correct": 0, "loss_sum": 0.0, "seconds": 0.0}  # of an interrupted epoch


def rng_state() -> dict:
    """The CPU generator's state, and every GPU's."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`'s states wherever the checkpoint's tensors were loaded.

    RNG states must be CPU byte tensors; a checkpoint written with more GPUs
    than this machine has restores the generators of the GPUs it has.
    """
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


class Progress:
    """Where a run stands: its log records, the best epoch, the next epoch and an interrupted epoch's counts."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.best = {"epoch": -1, "robust": -1.0}  # the epoch with the best PGD check
        self.epoch = 0
        self.partial = dict(EMPTY_PARTIAL)

    def take_partial(self) -> dict:
        """The interrupted epoch's counts (once: the next epoch starts from zero)."""
        partial, self.partial = self.partial, dict(EMPTY_PARTIAL)
        return partial


class Checkpointer:
    """Saves and restores one state dict of a run's stateful objects as ``<out>/checkpoint.pt``.

    Saved (atomically, the one before kept as ``checkpoint.prev.pt``): the
    model, optimiser, scheduler and GradScaler states, every hook's state, the
    RNG states, and the run's :class:`Progress` with the settings. Only the
    main process writes; without ``out`` nothing is written.
    """

    def __init__(self, out: Path | None, main: bool, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, scaler: torch.amp.GradScaler, hooks: list[TrainHook]) -> None:
        self.path = out / "checkpoint.pt" if out is not None else None
        self.main = main
        self.model, self.optimizer, self.scheduler, self.scaler, self.hooks = model, optimizer, scheduler, scaler, hooks

    def exists(self) -> bool:
        return self.path is not None and (self.path.exists() or previous_checkpoint(self.path).exists())

    def save(self, progress: Progress, config: TrainConfig, epoch: int, partial: dict | None = None) -> None:
        """The state after ``epoch`` finished epochs (and ``partial``'s batches of the next one)."""
        if not self.main or self.path is None:
            return
        save_checkpoint(self.path, {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "epoch": epoch, "partial": partial, "config": config.to_dict(), "history": progress.history,
            "best": progress.best, "rng": rng_state(), "model_config": getattr(self.model, "cstar_config", None),
            "hooks": dict(zip(hook_names(self.hooks), (hook.state_dict() for hook in self.hooks)))},
            keep_previous=True)

    def restore(self, state: dict) -> Progress:
        """Load a checkpoint's ``state`` (read on the CPU) into the objects; the run's progress at that point."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):  # a run started without float16 AMP saved none
            self.scaler.load_state_dict(state["scaler"])
        progress = Progress()
        progress.history, progress.best, progress.epoch = state["history"], state["best"], state["epoch"]
        progress.partial = state.get("partial") or progress.partial
        if not self.main:  # rank 0's checkpoint holds the interrupted epoch's counts of all ranks
            progress.partial = {**progress.partial, "seen": 0, "correct": 0, "loss_sum": 0.0}
        set_rng_state(state["rng"])
        saved = state.get("hooks") or {}
        if isinstance(saved, list):  # a checkpoint written before hooks were named: their order is all it has
            saved = dict(zip(hook_names(self.hooks), saved))
        for name, hook in zip(hook_names(self.hooks), self.hooks):
            hook.load_state_dict(saved[name])
        return progress


def hook_names(hooks: list[TrainHook]) -> list[str]:
    """A name for each hook's state in a checkpoint: its class, numbered from the second of a class on
    (``ADMM``, ``ADMM#2``)."""
    names, seen = [], {}
    for hook in hooks:
        kind = type(hook).__name__
        seen[kind] = seen.get(kind, 0) + 1
        names.append(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
    return names


def check_resumable(state: dict, model: nn.Module, config: TrainConfig, path: Path,
                    hooks: list[TrainHook]) -> None:
    """One line, before anything is loaded, when the checkpoint belongs to another model, optimiser or list of
    hooks (each hook's state is restored by its name, :func:`hook_names`)."""
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
    saved, now = state.get("hooks") or {}, hook_names(hooks)
    same = sorted(saved) == sorted(now) if isinstance(saved, dict) else len(saved) == len(now)
    if not same:
        before = ", ".join(sorted(saved)) if isinstance(saved, dict) else f"{len(saved)} unnamed ones"
        raise CstarError(f"{path} holds the states of the hooks [{before or 'none'}], this run has "
                         f"[{', '.join(now) or 'none'}]: resume with the hooks the run started with (each state "
                         "goes back to its own hook), or start a new run in another --out")


class BestEpoch:
    """The epoch with the best PGD check (``progress.best``), its weights, and the catastrophic-overfitting
    guard: a check below half the best stops the run and restores the best epoch."""

    def __init__(self, progress: Progress, config: TrainConfig, out: Path | None, main: bool) -> None:
        self.progress, self.config, self.out, self.main = progress, config, out, main
        self.state: dict | None = None  # the best epoch's weights, when this process saw that epoch

    def update(self, record: dict, model: nn.Module, hooks: list) -> bool:
        """Note an epoch's record (with its check); True when training must stop (a collapse, guarded)."""
        best = self.progress.best
        if record["val_pgd"] > best["robust"]:
            best.update(epoch=record["epoch"], robust=record["val_pgd"])
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.out is not None and self.main:
                save_checkpoint(self.out / "best.pt", {"model": self.state, "epoch": record["epoch"],
                                                       "val_pgd": best["robust"]})
        return _robustness_collapsed(record, best, self.config, hooks)

    def restore_if_chosen(self, model: nn.Module, stopped_early: bool) -> None:
        """Load the best epoch's weights when ``config.select`` is "best" or a collapse stopped the run."""
        best, history = self.progress.best, self.progress.history
        if not ((self.config.select == "best" or stopped_early) and best["epoch"] > 0
                and best["epoch"] != history[-1]["epoch"]):
            return
        device = next(model.parameters()).device
        model.load_state_dict(self.state if self.state is not None else
                              load_checkpoint(self.out / "best.pt", map_location=device)["model"])
        if self.main:
            log.info(f"restored the weights of epoch {best['epoch']} (best PGD check {best['robust']:.3f})")


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
            + (", or train with the multi-step method pgd or with nfgsm (--attack) instead of fgsm_rs"
               if config.attack == "fgsm_rs"
               else ", or train with the multi-step method pgd (--attack pgd)" if config.attack == "nfgsm" else "")
            + ("; in an ADMM phase, a smaller rho (--admm '{rho: ...}') pulls the weights less hard"
               if hooks else ""), stacklevel=4)
    return collapsed and config.overfit_guard


def interrupt(path: Path | None, save_partial, epoch: int, batches: int, steps_per_epoch: int, signum: int) -> None:
    """Write the mid-epoch checkpoint (``save_partial()``, when given) and raise :class:`Interrupted`."""
    if path is not None and save_partial is not None:
        save_partial()
    where = (f"checkpoint written to {path}; continue with --resume" if path is not None
             else "no output directory, so no checkpoint was written")
    raise Interrupted(f"stopped by signal {signal.Signals(signum).name} at epoch {epoch + 1}, batch "
                      f"{batches}/{steps_per_epoch}: {where}", signum)
