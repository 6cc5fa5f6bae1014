"""What every compression pipeline shares below :func:`cstar.compress` and :func:`cstar.compare`.

Settings dataclasses with training sections (the data's eps, the evaluation's
eps, nested dicts from YAML), the ledger of finished phases (``phases.json``), the held-out split of
the training set, and one training phase (a :func:`cstar.fit` into a folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .. import data as data_module
from .._core import log
from .. import attacks, distributed
from ..attacks._spec import steps_by_attack
from .._core.checks import COUNT, SEED, integer
from .._core.errors import CstarError, check_options
from .._core.io import write_json
from .._core.renamed import PHASES, renamed
from .admm import ADMMConfig
from ..training.config import RULES as TRAIN_RULES
from ..training.fit import TrainConfig, fit


def attack_names(what: str, value: object) -> list:
    """``value`` as a list of evaluation attacks: ``"clean"``, names :func:`cstar.attacks.parse_attack` reads
    (``"pgd20"``, ``"aa"``...) or :class:`cstar.attacks.AttackSpec` objects; else one line naming ``what``."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, (str, attacks.AttackSpec)) for a in value):
        raise CstarError(f"{what} must be a list of attack names, got {value!r}; e.g. ['clean', 'pgd20']")
    for name in value:
        if isinstance(name, str) and name != "clean":
            attacks.parse_attack(name, 1.0)  # one line naming an unknown form
    return list(value)


# What the evaluation settings of CompressConfig and CompareConfig must be (cstar._core.checks).
def _eval_steps(what: str, value: object) -> object:
    """None (each attack's default step), one step for every PGD attack, or ``{attack: step}``, as
    :func:`cstar.attacks._spec.steps_by_attack` reads it (a preset's step reaches only the attacks it names)."""
    if value is not None:
        try:
            steps_by_attack(value)
        except CstarError as exc:
            raise CstarError(f"{what}: {exc}") from None
    return value


EVALUATION_RULES = {
    "eval_attacks": attack_names, "eval_eps": TRAIN_RULES["eps"],
    "eval_step": _eval_steps,
    "eval_n": integer(1, optional=True, fix="evaluate at least 1 test image, or none for all of them"),
    "autoattack_n": integer(0, fix="test images AutoAttack runs on (0: off)"),
}


def check_sections(config, train_keys: tuple[str, ...]) -> None:
    """Refuse a ``config`` whose ``train_keys`` sections are not :class:`TrainConfig` or whose ``admm`` is not an
    :class:`ADMMConfig` (a dict there belongs in ``from_dict``)."""
    kinds = {**dict.fromkeys(train_keys, TrainConfig), "admm": ADMMConfig}
    for key, kind in kinds.items():
        if not isinstance(getattr(config, key), kind):
            raise CstarError(f"{type(config).__name__}.{key} must be a {kind.__name__}, got "
                             f"{type(getattr(config, key)).__name__}; build the settings from nested dicts with "
                             f"{type(config).__name__}.from_dict")


def check_run(config, kind: type, train_set, test_set, out_dir, val_size: object, seed: object) -> Path:
    """The checks of a pipeline call's arguments (:func:`cstar.compress`, :func:`cstar.compare`), before any
    work: ``config`` a ``kind``, the datasets :mod:`cstar.data` ones (``test_set`` may be None), ``out_dir`` a
    path that is not a file, ``val_size`` an integer >= 0, ``seed`` a seed. Returns ``out_dir`` as a Path."""
    if not isinstance(config, kind):
        raise CstarError(f"config must be a {kind.__name__}, got {type(config).__name__}; build one from a dict "
                         f"with {kind.__name__}.from_dict")
    datasets = (data_module.TensorData, data_module.FolderData)
    for what, dataset in (("train_set", train_set), ("test_set", test_set)):
        if not isinstance(dataset, datasets) and not (what == "test_set" and dataset is None):
            raise CstarError(f"{what} must be a cstar.data dataset, got {type(dataset).__name__}; use "
                             "cstar.data.load(name, split=...) or cstar.data.TensorData(images, labels, spec)")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise CstarError(f"out_dir must be a path, got {type(out_dir).__name__}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CstarError(f"out_dir {out} is a file, not a directory: pass a directory's path")
    COUNT("val_size", val_size)
    SEED("seed", seed)
    return out


def with_data_eps(config, spec, train_keys: tuple[str, ...]):
    """``config`` (a settings dataclass) with every ``train_keys`` section's ``eps=None`` set to ``spec.eps``,
    the threat model of the training data (a :class:`cstar.data.DatasetSpec`), and its ``eval_eps=None`` to
    :func:`evaluation_eps`'s."""
    config = replace(config, **{key: getattr(config, key).with_eps_of(spec) for key in train_keys})
    return replace(config, eval_eps=evaluation_eps(config.eval_eps, config.finetune.eps))


def eps_text(eps: float, train_eps: float | None = None) -> str:
    """``"L-inf eps 0.1"`` (the evaluation's radius), with ``" (trained at eps 0.3)"`` where training differs."""
    trained = f" (trained at eps {train_eps:.4g})" if train_eps is not None and train_eps != eps else ""
    return f"L-inf eps {eps:.4g}{trained}"


def evaluation_eps(eval_eps: float | None, train_eps: float) -> float:
    """The radius every evaluation of a run attacks at: ``eval_eps``, else (None) the training eps, that of
    the last training phase (``finetune``)."""
    return train_eps if eval_eps is None else eval_eps


def check_dense_not_distilled(dense: TrainConfig, later: str) -> None:
    """Refuse ``distill`` on the dense phase: the dense model is the teacher of the ``later`` phases and has none."""
    if isinstance(dense, TrainConfig) and dense.distill:
        raise CstarError(f"dense.distill: the dense model is the teacher of the phases after it and has none of its "
                         f"own; set distill in {later}")


def settings_from_dict(cls, values: dict, train_keys: tuple[str, ...], what: str,
                       names: dict[str, str] | None = None):
    """``cls(**values)`` for a settings dataclass whose ``train_keys`` sections are
    :class:`TrainConfig` and whose ``admm`` section is :class:`ADMMConfig`, given
    as nested dicts (a YAML preset); an unknown key at any level is an error, an
    old name of ``names`` (:mod:`cstar._core.renamed`) a :class:`FutureWarning`."""
    if isinstance(values, dict):
        values = renamed(values, f"the {what} settings", names=names or {})
    check_options(values, [f.name for f in fields(cls)], what)
    values = dict(values)
    for key in train_keys:
        if isinstance(values.get(key), dict):
            values[key] = TrainConfig.from_dict(values[key])
    if isinstance(values.get("admm"), dict):
        values["admm"] = ADMMConfig.from_dict(values["admm"])
    return cls(**values)


T = TypeVar("T")


class PhaseLedger:
    """``phases.json``: what is done, with each phase's seconds (training seconds for the training phases) and
    results; a phase recorded under its old name (:data:`cstar._core.renamed.PHASES`) reads as today's."""

    def __init__(self, out: Path, resume: bool) -> None:
        self.path = out / "phases.json"
        done = json.loads(self.path.read_text()) if resume and self.path.exists() else {}
        self.done: dict[str, dict] = renamed(done, str(self.path), note=False, names=PHASES)

    def finish(self, phase: str, **info) -> None:
        self.done[phase] = info
        if distributed.is_main():
            write_json(self.path, self.done)

    def run(self, phase: str, run: Callable[[], tuple[T, dict]], load: Callable[[], T]) -> T:
        """The result of ``phase``: ``load()`` when an earlier run finished it (``--resume``); else ``run()``,
        which returns the result and the phase's record (seconds first, then what it did), then recorded."""
        if phase in self.done:
            return load()
        result, info = run()
        self.finish(phase, **info)
        return result


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
    folder's name, e.g. "search"), distilled from ``teacher`` when ``config.distill``; returns (history,
    :func:`training_seconds`)."""
    loader = training_loader(train_part, config, next(model.parameters()).device, seed)
    history = fit(model, loader, config, val=val, out_dir=out, resume=resume, hooks=hooks, name=name or out.name,
                  teacher=teacher)
    return history, training_seconds(history)
