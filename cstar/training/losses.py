"""The loss of one training step: the attack's (PGD-AT, FGSM-RS, N-FGSM, TRADES, clean) and, when asked,
adversarial distillation from a robust teacher and the factorised layers' conditioning penalty."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import attacks, distributed
from ..lowrank._condition import conditioning_penalty
from .config import TrainConfig


def training_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, eps: float,
                   amp_dtype: torch.dtype | None, teacher: nn.Module | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The training attack's loss on one batch (distilled from ``teacher`` when ``config.distill``; plus
    ``config.condition_weight *`` :func:`cstar.lowrank.conditioning_penalty`), and the logits it was computed from.

    ``model`` may be a DistributedDataParallel wrapper: attacks then run on the
    plain module inside, so that only the loss forward goes through the wrapper
    (DDP sees one forward and one backward per step).
    """
    loss, logits = attack_loss(model, x, y, config, eps, amp_dtype)
    if config.distill:
        loss = distilled(loss, logits, x, config, amp_dtype, teacher)
    if config.condition_weight:
        loss = loss + config.condition_weight * conditioning_penalty(distributed.unwrap(model), config.max_condition)
    return loss, logits


def distilled(loss: torch.Tensor, logits: torch.Tensor, x: torch.Tensor, config: TrainConfig,
              amp_dtype: torch.dtype | None, teacher: nn.Module) -> torch.Tensor:
    """``(1 - distill) * loss + distill * T^2 * KL(teacher(x) / T || logits / T)``."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        soft = F.softmax(teacher(x).float() / config.distill_temperature, dim=1)
    t = config.distill_temperature
    kl = F.kl_div(F.log_softmax(logits.float() / t, dim=1), soft, reduction="batchmean") * t * t
    return (1 - config.distill) * loss + config.distill * kl


def attack_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, eps: float,
                 amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training attack's own loss on one batch, and the (adversarial) logits it was computed from."""
    step = config.step_size() * (eps / config.eps if config.eps else 1.0)
    raw = distributed.unwrap(model)
    if config.attack == "clean" or eps == 0:
        x_train = x
    elif config.attack == "pgd":
        x_train = attacks.pgd(raw, x, y, eps, step, config.attack_steps, amp_dtype=amp_dtype)
    elif config.attack == "fgsm_rs":
        x_train = attacks.fgsm(raw, x, y, eps, random_start=True, step=step, amp_dtype=amp_dtype)
    elif config.attack == "nfgsm":
        x_train = attacks.nfgsm(raw, x, y, eps, noise=2 * eps, step=step, amp_dtype=amp_dtype)
    else:  # trades
        return trades_loss(model, x, y, config, eps, step, amp_dtype)
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(x_train)
    return F.cross_entropy(logits.float(), y), logits


def trades_loss(model, x, y, config, eps, step, amp_dtype):
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
