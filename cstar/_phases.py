"""What every compression pipeline shares below :func:`cstar.compress` and :func:`cstar.compare`.

Settings dataclasses with training sections (the data's eps, nested dicts from
YAML), the ledger of finished phases (``phases.json``), the held-out split of
the training set, and one training phase (a :func:`cstar.fit` into a folder).
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import torch
from torch import nn

from . import data as data_module
from . import _log as log
from . import distributed
from ._errors import CstarError, check_options
from ._io import write_json
from .admm import ADMMConfig
from .train import TrainConfig, fit


def with_data_eps(config, spec, train_keys: tuple[str, ...]):
    """``config`` (a settings dataclass) with every ``train_keys`` section's ``eps=None`` set to ``spec.eps``,
    the threat model of the training data (a :class:`cstar.data.DatasetSpec`)."""
    return replace(config, **{key: getattr(config, key).with_eps_of(spec) for key in train_keys})


def check_dense_not_distilled(dense: TrainConfig, later: str) -> None:
    """Refuse ``distill`` on the dense phase: the dense model is the teacher of the ``later`` phases and has none."""
    if isinstance(dense, TrainConfig) and dense.distill:
        raise CstarError(f"dense.distill: the dense model is the teacher of the phases after it and has none of its "
                         f"own; set distill in {later}")


def settings_from_dict(cls, values: dict, train_keys: tuple[str, ...], what: str):
    """``cls(**values)`` for a settings dataclass whose ``train_keys`` sections are
    :class:`TrainConfig` and whose ``admm`` section is :class:`ADMMConfig`, given
    as nested dicts (a YAML preset); an unknown key at any level is an error."""
    check_options(values, [f.name for f in fields(cls)], what)
    values = dict(values)
    for key in train_keys:
        if isinstance(values.get(key), dict):
            values[key] = TrainConfig.from_dict(values[key])
    if isinstance(values.get("admm"), dict):
        values["admm"] = ADMMConfig.from_dict(values["admm"])
    return cls(**values)


class PhaseLedger:
    """``phases.json``: what is done, with each phase's seconds (training seconds for the training phases) and results."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.path = out / "phases.json"
        self.done: dict[str, dict] = json.loads(self.path.read_text()) if resume and self.path.exists() else {}

    def finish(self, phase: str, **info) -> None:
        self.done[phase] = info
        if distributed.is_main():
            write_json(self.path, self.done)


def split_held_out(train_set, val_size: int, device, test_set=None):
    """(training part, (x, y) on ``device`` for the per-epoch checks, or None).

    In-memory datasets hold out their last ``val_size`` training images. An
    image-folder dataset cannot be split cheaply, so its check takes the first
    ``val_size`` images of ``test_set`` (its validation folder; said in the
    log), and has none without it.
    """
    if val_size <= 0:
        return train_set, None
    if isinstance(train_set, data_module.FolderData):
        if test_set is None:
            return train_set, None
        log.info(f"per-epoch check on the first {val_size} images of the validation folder")
        xs, ys, seen = [], [], 0
        for x, y in data_module.make_loader(test_set, min(256, val_size), train=False, device=device):
            xs.append(x)
            ys.append(y)
            seen += len(y)
            if seen >= val_size:
                break
        return train_set, (torch.cat(xs)[:val_size], torch.cat(ys)[:val_size])
    if not hasattr(train_set, "split_off"):
        return train_set, None
    if val_size >= len(train_set):
        raise CstarError(f"val_size {val_size} (--val-size) leaves no training data ({len(train_set)} images): "
                         "use a smaller value")
    return train_set.split_off(val_size, device)


def training_loader(train_part, config: TrainConfig, device, seed: int = 0):
    """The shuffled, augmented loader of ``train_part`` for ``config`` (this process's shard under torchrun)."""
    return data_module.make_loader(train_part, config.batch_size, train=True, device=device, seed=seed,
                                   rank=distributed.rank(), world_size=distributed.world_size())


def training_seconds(history: list[dict]) -> float:
    """Seconds the epochs of a :func:`cstar.fit` history trained (per-epoch checks excluded); a resumed run's
    history holds its epochs from before the resume too, so this is the phase's whole training time."""
    return sum(record.get("train_seconds", 0.0) for record in history)


def train_phase(model, train_part, val, config: TrainConfig, out: Path, resume: bool, hooks=(), seed: int = 0,
                name: str | None = None, teacher: nn.Module | None = None):
    """:func:`cstar.fit` of ``model`` on ``train_part`` into ``out``, its log lines named ``name`` (default: the
    folder's name, e.g. "admm"), distilled from ``teacher`` when ``config.distill``; returns (history,
    :func:`training_seconds`)."""
    loader = training_loader(train_part, config, next(model.parameters()).device, seed)
    history = fit(model, loader, config, val=val, out_dir=out, resume=resume, hooks=hooks, name=name or out.name,
                  teacher=teacher)
    return history, training_seconds(history)
