"""How much the adversarial loss depends on each layer: weights for a robustness-aware rank allocation.

Truncating a layer's weight ``W`` to ``W_r`` changes the loss by about
``1/2 sum_i F_i (W - W_r)_i^2`` (second order; the first-order term averages
out at a trained model), with ``F`` the diagonal Fisher information of the
loss. Taking the removed part to have the layer's mix of entries, the change
is ``1/2 c (1 - energy(r))`` with ``c = sum_i F_i W_i^2``: the layer's
*sensitivity*. :func:`layer_sensitivity` estimates ``c`` on the adversarial
loss, with ``F`` the empirical Fisher over a few batches (squared batch
gradients, as Taylor importance scores for pruning do), and the global rank
allocation weighs each layer's log-energy by it (``layer_weights``): near full
energy, ``-c log(energy)`` is the loss change itself, and far from it the log
still keeps every layer off rank zero.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import attacks
from .._core.errors import CstarError
from ..evaluation.counting import eval_mode


def layer_sensitivity(model: nn.Module, batches: Iterable, eps: float, *, steps: int = 5,
                      step: float | None = None, max_batches: int = 8) -> dict[str, float]:
    """``{name: c}`` for every ``nn.Conv2d`` and ``nn.Linear`` of ``model``, normalised to mean 1.

    ``c = mean over batches of sum_i (g_i * W_i)^2`` with ``g`` the gradient of
    the cross-entropy on PGD-``steps`` examples at L-inf radius ``eps`` (input
    units; step ``step``, default ``2.5 * eps / steps``; ``eps=0``: the clean
    loss), the model in eval mode, over the first ``max_batches`` ``(x, y)`` of
    ``batches`` (e.g. a :func:`cstar.data.make_loader` loader). Nothing of the
    model changes (weights, modes, ``.grad``). Pass the result as
    ``select_ranks(..., layer_weights=...)``.
    """
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and 0 <= eps <= 1):
        raise CstarError(f"eps={eps} must be in [0, 1] (input units, e.g. 8/255)")
    if not (isinstance(max_batches, int) and max_batches >= 1) or not (isinstance(steps, int) and steps >= 1):
        raise CstarError(f"steps={steps} and max_batches={max_batches} must be integers >= 1")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise CstarError("layer_sensitivity: the model has no Conv2d or Linear layer")
    device = next(model.parameters()).device
    weights = [m.weight for _, m in layers]
    totals = torch.zeros(len(layers), dtype=torch.float64, device=device)
    seen = 0
    with eval_mode(model):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            x_adv = attacks.pgd(model, x, y, eps, step or 2.5 * eps / steps, steps) if eps > 0 else x
            loss = F.cross_entropy(model(x_adv), y)
            grads = torch.autograd.grad(loss, weights)
            totals += torch.stack([(g * w.detach()).double().pow(2).sum() for g, w in zip(grads, weights)])
            seen += 1
            if seen == max_batches:
                break
    if seen == 0:
        raise CstarError("layer_sensitivity got no batch: pass a loader with at least one (x, y) batch")
    mean = totals.cpu() / seen
    if not bool(torch.isfinite(mean).all()) or float(mean.sum()) <= 0:
        raise CstarError("layer_sensitivity: the adversarial loss has no finite, non-zero gradient on these "
                         "batches; check the model's outputs and the labels")
    mean = mean.clamp_min(float(mean.max()) * 1e-12)  # a layer without gradient still gets a positive weight
    mean = mean / mean.mean()
    return {name: float(c) for (name, _), c in zip(layers, mean)}
