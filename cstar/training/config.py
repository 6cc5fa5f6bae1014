"""The settings of an adversarial training run (:class:`TrainConfig`) and the extension point of
:func:`cstar.fit` (:class:`TrainHook`); both re-exported by :mod:`cstar.training.fit`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn

from .._core.checks import SEED, check_fields, check_mapping, flag, integer, number, one_of
from .._core.errors import CstarError, check_options
from .._core.renamed import TRAINING, accepting_old_names, old_attribute, renamed
from ..lowrank._condition import MAX_CONDITION

ATTACKS = ("pgd", "fgsm_rs", "nfgsm", "trades", "clean")
SCHEDULES = ("cosine", "onecycle", "multistep", "constant")
OPTIMIZERS = ("sgd", "adam")
AMP_DTYPES = ("auto", "bfloat16", "float16")
_EPOCHS = "a number of epochs >= 0 (0: off)"
# What each field of TrainConfig must be (cstar._core.checks); the command line's flags and sections land here too.
RULES = {
    "attack": one_of(ATTACKS), "schedule": one_of(SCHEDULES), "optimizer": one_of(OPTIMIZERS),
    "select": one_of(("last", "best")), "amp_dtype": one_of(AMP_DTYPES),
    "epochs": integer(1, fix="train at least 1 epoch"), "batch_size": integer(1, fix="at least 1 image a batch"),
    "attack_steps": integer(1, fix="at least 1 attack step"), "check_steps": integer(1, fix="at least 1 step"),
    "check_size": integer(0, fix="0 turns the per-epoch PGD check off"),
    "eps": number(at_least=0, at_most=1, optional=True,
                  fix=f"inputs are in [0, 1], so use 0 <= eps <= 1 (e.g. 8/255 = {8/255:.5f})"),
    "attack_step": number(above=0, optional=True, fix="or omit it for the attack's default"),
    "eps_warmup_epochs": number(at_least=0, fix=_EPOCHS), "warmup_epochs": number(at_least=0, fix=_EPOCHS),
    "trades_beta": number(at_least=0, fix="the weight of TRADES' robust term, e.g. 6"),
    "distill": number(at_least=0, at_most=1, message="{what}={value!r} must be in [0, 1]: the weight of the "
                      "distillation term (0 turns it off)"),
    "distill_temperature": number(above=0, message="{what}={value!r} must be positive (1 keeps the logits)"),
    "condition_weight": number(at_least=0, fix="the weight of the factorised layers' conditioning penalty (0: off)"),
    "max_condition": MAX_CONDITION,
    "lr": number(above=0, fix="the peak learning rate, e.g. 0.1"),
    "momentum": number(at_least=0, at_most=1, fix="e.g. 0.9"), "weight_decay": number(at_least=0, fix="e.g. 5e-4"),
    "grad_clip": number(above=0, optional=True, fix="or omit it to turn clipping off"),
    "seed": SEED, "amp": flag(), "channels_last": flag(), "overfit_guard": flag(), "progress": flag(),
    "sync_bn": flag(),
}
POLL_EVERY = 8  # optimiser steps between the checks that need a host sync (divergence; under torchrun also signals)


@dataclass
class TrainConfig:
    """Settings of an adversarial training run (defaults: PGD-10 AT with SGD, as for CIFAR-10).

    ``eps`` and ``attack_step`` are L-inf radii in input units ([0, 1] images);
    ``eps=None`` (default) is the training data's threat model, read by :func:`fit`
    from a loader of :func:`cstar.data.make_loader` (MNIST 0.3, Fashion-MNIST 0.1,
    CIFAR and SVHN 8/255, ImageNet folders 4/255), as the command line does.
    ``attack`` is the training attack or objective: ``"pgd"`` (PGD-AT),
    ``"fgsm_rs"``, ``"nfgsm"``, ``"trades"`` or ``"clean"`` (its old name
    ``method=`` still works, with a :class:`FutureWarning`).
    ``attack_step=None`` picks the attack's usual step: ``2.5 * eps / attack_steps``
    for PGD and TRADES, ``1.25 * eps`` for FGSM-RS, ``eps`` for N-FGSM.
    ``eps_warmup_epochs`` ramps eps linearly from 0 (helps MNIST at eps 0.3).
    ``distill`` in [0, 1] (default 0, off) mixes adversarial distillation from a
    robust teacher into the loss, as ARD and RSLAD do (Goldblum et al. 2020;
    Zi et al. 2021): ``(1 - distill) * attack loss + distill * T^2 *
    KL(teacher(x) / T || student(x_adv) / T)`` with ``T = distill_temperature``,
    the teacher's soft labels taken on the clean batch and the student's on the
    attack's adversarial one; :func:`fit` needs ``teacher=`` (``compress`` and
    ``compare`` pass the dense model to every phase after it).
    ``condition_weight`` (default 0, off) adds ``condition_weight *``
    :func:`cstar.lowrank.conditioning_penalty` ``(model, max_condition)`` to the
    loss: the factorised layers' factors kept near orthonormal and their
    operators' condition numbers at ``max_condition`` (> 1, default 10) or
    below, as CondLR keeps low-rank layers robust; a model without factorised
    layers is untouched. In the ADMM phase of :func:`cstar.compress` the weights
    are dense: there :class:`cstar.ADMM` bounds, with the phase's two settings,
    the condition number of each constrained weight's leading singular values
    (those its projection keeps). Each step it costs a QR of every factor and
    an SVD of every reduced core (of every constrained weight under ADMM),
    which on a GPU synchronise with the host, as ``torch.linalg.svd`` does.
    ``lr`` is the peak learning rate; ``warmup_epochs`` ramps it linearly first.
    ``amp`` trains under ``torch.autocast`` in ``amp_dtype``: "auto" (default)
    is bfloat16 on GPUs that support it (no loss scaling needed) and float16
    with a GradScaler on older GPUs, bfloat16 on a CPU that computes it natively
    (AVX512-BF16 or AMX), and nothing on other CPUs (a warning says so);
    "bfloat16" or "float16" forces that type on any device. Under float16 the
    attacks rescale each example's loss gradient so that it cannot underflow
    (see :mod:`cstar.attacks`), and a step whose gradients overflow is skipped
    (the learning-rate schedule and the hooks' ``after_step`` then wait). The
    type used is recorded in every epoch record (``amp``).
    ``channels_last`` trains in NHWC memory format (1.3x faster for a width-16
    ResNet-18 on 2 CPU cores here; the same arithmetic); on the CPU it is turned
    off, with a warning, for models that oneDNN mis-trains in NHWC
    (:func:`cstar._core.memory_format.channels_last_unsafe_convs`).
    ``check_size`` images of the validation set get a PGD-``check_steps`` check
    after every epoch; ``select="best"`` keeps the epoch with the best check.
    Under torchrun (:mod:`cstar.distributed`) ``batch_size`` is per process (the
    global batch is ``batch_size * world_size``) and BatchNorm statistics are per
    process unless ``sync_bn`` (CUDA only) computes them over the global batch.
    """

    attack: str = "pgd"
    epochs: int = 10
    batch_size: int = 128
    eps: float | None = None
    attack_steps: int = 10
    attack_step: float | None = None
    eps_warmup_epochs: float = 0.0
    trades_beta: float = 6.0
    distill: float = 0.0
    distill_temperature: float = 1.0
    condition_weight: float = 0.0
    max_condition: float = 10.0
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

    def validate(self) -> None:
        """Raise :class:`CstarError` on a value that cannot work (each field's :data:`RULES`, then eps against
        the attack)."""
        check_fields(self, RULES)
        if self.attack != "clean" and self.eps == 0:
            raise CstarError(f"eps=0 with attack '{self.attack}' is clean training: pass --attack clean or a positive --eps")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """Build from a dict (e.g. a YAML config); unknown keys are an error, the old key ``method`` a
        :class:`FutureWarning` (it is ``attack`` now)."""
        check_mapping(values, "the training settings", "{epochs: 3, lr: 0.01}")
        values = renamed(values, "the training settings")
        check_options(values, [f.name for f in fields(cls)], "training")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_eps_of(self, spec) -> "TrainConfig":
        """This config, with ``eps`` from dataset ``spec`` (a :class:`cstar.data.DatasetSpec`) when it is None."""
        return self if self.eps is not None else replace(self, eps=spec.eps)

    def summary(self) -> str:
        """One line for reports, e.g. ``"2 epoch(s) of pgd-5 (eps 0.3, adam lr 0.001, cosine)"``."""
        attack = f"{self.attack}-{self.attack_steps}" if self.attack in ("pgd", "trades") else self.attack
        eps = "" if self.eps is None else f"eps {self.eps:.4g}, "
        distill = f", distilled {self.distill:g} at T {self.distill_temperature:g}" if self.distill else ""
        condition = (f", conditioned {self.condition_weight:g} to {self.max_condition:g}" if self.condition_weight
                     else "")
        return (f"{self.epochs} epoch(s) of {attack} ({eps}{self.optimizer} lr {self.lr:g}, {self.schedule}{distill}"
                f"{condition})")

    def step_size(self) -> float:
        if self.eps is None:
            raise CstarError("TrainConfig.eps is not set: pass eps= (fit sets it from a cstar.data loader's dataset)")
        if self.attack_step is not None:
            return self.attack_step
        if self.attack in ("pgd", "trades"):
            return 2.5 * self.eps / self.attack_steps
        if self.attack == "fgsm_rs":
            return 1.25 * self.eps
        return self.eps

    method = old_attribute("TrainConfig", "method", "attack")


TrainConfig.__init__ = accepting_old_names(TrainConfig.__init__, TRAINING, "TrainConfig()")


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



