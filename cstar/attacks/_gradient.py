"""Gradient attacks: FGSM / FGSM-RS, PGD (L-inf and L2) and N-FGSM.

All take images ``x`` (float, shape (N, ...), values in ``clip``, by default
[0, 1]) and ``y`` (int64 labels (N,), or whatever ``loss_fn`` expects as its
second argument, with N rows), and return a detached tensor shaped and typed
like ``x``, clamped to ``clip``. ``eps`` and ``step`` are in input units
(8/255 means 8 grey levels). Gradients are taken w.r.t. the input only, so the
model's parameter ``.grad`` is never touched.

References: Goodfellow et al. 2015 (FGSM); Madry et al. 2018 (PGD);
Wong et al. 2020 (FGSM-RS); de Jorge et al. 2022 (N-FGSM).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cstar._core.errors import CstarError
from cstar._core.memory_format import attack_in_channels_last, to_channels_last
from cstar.attacks._common import (
    check_amp_dtype,
    check_count,
    check_inputs,
    check_model_mode,
    check_norm,
    check_number,
    training_mode,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _summed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


def _per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each sample, shaped (N, 1, ..., 1) to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def _random_ball(x: torch.Tensor, radius: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform sample from the ``norm`` ball of ``radius``, one per sample, like ``x``.

    Drawn on the generator's device (so a CPU generator works for CUDA inputs).
    """
    device = generator.device if generator is not None else x.device
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=device, dtype=x.dtype)
        return ((2 * u - 1) * radius).to(x.device)
    direction = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    direction = direction / _per_sample_norm(direction).clamp_min(1e-12)
    dim = x[0].numel()
    u = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=device, dtype=x.dtype)
    return (direction * radius * u ** (1.0 / dim)).to(x.device)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * (eps / _per_sample_norm(delta).clamp_min(1e-12)).clamp(max=1.0)


def _logits(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None) -> torch.Tensor:
    # amp_dtype=None runs in full precision, even inside a caller's autocast region.
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return model(x).float()


def _batchnorm_couples_examples(model: nn.Module) -> bool:
    """True when a BatchNorm layer is in training mode: each example's gradient then depends on the others."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _rescale_gradient(logits: torch.Tensor, per_example: bool) -> torch.Tensor:
    """``logits``, whose gradient is rescaled on the way back so that its largest entry is 1.

    Under float16 autocast the loss gradient of a confidently classified example
    (``1 - p_y`` near 1e-6) underflows to zero on its way back through the
    network, and ``sign(0) = 0`` leaves that input unattacked. The step's
    direction depends only on each example's gradient up to a positive factor
    (its sign for L-inf, its direction for L2), so scaling each example's logit
    gradient (the whole batch's when BatchNorm couples the examples) changes no
    step while keeping the values where float16 represents them.
    """
    def rescale(grad: torch.Tensor) -> torch.Tensor:
        flat = grad.flatten(1) if per_example else grad.reshape(1, -1)
        peak = flat.abs().amax(dim=1)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        return grad / (peak.view(-1, *[1] * (grad.dim() - 1)) if per_example else peak)

    logits.register_hook(rescale)
    return logits


def _single_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: str,
    start: float,
    project: bool,
    ascend: float,
    loss_fn: LossFn,
    clip: tuple[float, float],
    amp_dtype: torch.dtype | None,
    generator: torch.Generator | None,
    channels_last: bool,
) -> torch.Tensor:
    """One run: random start of radius ``start``, then ``steps`` steps (projected if ``project``),
    each forward pass on channels-last images if ``channels_last``."""
    x_adv = x
    if start > 0:
        x_adv = (x + _random_ball(x, start, norm, generator)).clamp(*clip)
    rescale = amp_dtype == torch.float16
    per_example = rescale and not _batchnorm_couples_examples(model)
    for _ in range(steps):
        x_adv = (to_channels_last(x_adv.detach()) if channels_last else x_adv.detach()).requires_grad_(True)
        logits = _logits(model, x_adv, amp_dtype)
        if rescale:
            logits = _rescale_gradient(logits, per_example)
        (grad,) = torch.autograd.grad(loss_fn(logits, y).sum(), x_adv)
        direction = grad.sign() if norm == "linf" else grad / _per_sample_norm(grad).clamp_min(1e-12)
        x_adv = x_adv.detach() + ascend * step * direction
        if project:
            x_adv = x + _project(x_adv - x, eps, norm)
        x_adv = x_adv.clamp(*clip)
    return x_adv


def _run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: str,
    start: float,
    project: bool,
    restarts: int,
    targeted: bool,
    loss_fn: LossFn | None,
    clip: tuple[float, float],
    model_mode: str,
    amp_dtype: torch.dtype | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Shared driver: works in float32 (or wider) and in channels-last where that is faster
    (:func:`cstar._core.memory_format.attack_in_channels_last`), handles model mode and restarts."""
    x_work = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    settings = dict(
        eps=eps, step=step, steps=steps, norm=norm, start=start, project=project,
        ascend=-1.0 if targeted else 1.0, loss_fn=loss_fn or _summed_cross_entropy,
        clip=clip, amp_dtype=amp_dtype, generator=generator,
        channels_last=attack_in_channels_last(model, x_work),
    )
    with training_mode(model, model_mode), torch.enable_grad():
        x_adv = _single_run(model, x_work, y, **settings)
        for _ in range(restarts - 1):
            with torch.no_grad():
                matches = _logits(model, x_adv, amp_dtype).argmax(dim=1) == y
            left = (~matches if targeted else matches).nonzero().squeeze(1)
            if left.numel() == 0:
                break
            x_adv[left] = _single_run(model, x_work[left], y[left], **settings)
    return torch.empty_like(x).copy_(x_adv.detach())  # typed and laid out like x


def _check_common(x, y, eps, clip, model_mode, amp_dtype) -> tuple[float, tuple[float, float]]:
    clip = check_inputs(x, y, clip)
    check_model_mode(model_mode)
    check_amp_dtype(amp_dtype)
    return check_number("eps", eps), clip


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    random_start: bool = False,
    step: float | None = None,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    model_mode: str = "eval",
    amp_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fast gradient sign method (one step), or FGSM-RS with ``random_start=True``.

    Without random start: one step of size ``step`` (default ``eps``) along the
    gradient sign (L-inf) or the per-sample unit gradient (L2). With random
    start (Wong et al. 2020): start uniform in the ``eps``-ball, step default
    ``1.25 * eps``. The result is projected onto the ``eps``-ball around ``x``
    and clamped to ``clip``. See :func:`pgd` for the other arguments.
    """
    eps, clip = _check_common(x, y, eps, clip, model_mode, amp_dtype)
    norm = check_norm(norm)
    if step is None:
        step = 1.25 * eps if random_start else eps
    else:
        step = check_number("step", step, positive=True)
    return _run(
        model, x, y, eps=eps, step=step, steps=1, norm=norm, start=eps if random_start else 0.0,
        project=True, restarts=1, targeted=targeted, loss_fn=loss_fn, clip=clip,
        model_mode=model_mode, amp_dtype=amp_dtype, generator=generator,
    )


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    step: float,
    steps: int,
    *,
    norm: str = "linf",
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    model_mode: str = "eval",
    amp_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018), L-inf or L2.

    Args:
        model: maps ``x`` to logits (N, K).
        x: inputs (N, ...) in ``clip``; y: labels (N,) int64 (target labels if
            ``targeted``), or any (N, ...) tensor ``loss_fn`` accepts.
        eps: radius of the ball around ``x`` (input units, e.g. 8/255 for L-inf).
        step: step size per iteration (e.g. ``eps / 4``); steps: iterations.
        norm: "linf" (signed-gradient steps, clamp to ``[x-eps, x+eps]``) or
            "l2" (per-sample unit-gradient steps, projection onto the L2 ball).
        random_start: start uniform in the ``eps``-ball (per sample; for L2
            uniform in the ball's volume) instead of at ``x``.
        restarts: independent runs; per sample the first run that fools the
            model (prediction != y, or == y if targeted) is kept, else the
            last. Needs integer labels and ``random_start``.
        targeted: minimise the loss (reach class ``y``) instead of maximising it.
        loss_fn: ``loss_fn(logits, y)`` -> per-sample (N,) or summed loss;
            default summed cross-entropy, so each sample's step is independent
            of the batch size. Computed in float32.
        clip: valid input range; the result is clamped to it.
        model_mode: "eval" (default), "train" or "keep"; each submodule's
            training flag is restored afterwards.
        amp_dtype: run the forward pass under ``torch.autocast`` with this
            dtype (e.g. torch.bfloat16, or torch.float16 on GPUs without
            bfloat16); the input and its gradient stay float32. Under float16
            each example's loss gradient is rescaled so that it cannot
            underflow (the steps are unchanged). ``None``: full precision.
        generator: ``torch.Generator`` for the random start (reproducible runs).

    Returns:
        Adversarial inputs, detached, same shape, dtype, device and memory
        format as ``x``. On the CPU the attack itself runs with images in
        channels-last (1.2-1.3x faster, the same arithmetic up to the order of
        float32 sums; see :mod:`cstar._core.memory_format`).
    """
    eps, clip = _check_common(x, y, eps, clip, model_mode, amp_dtype)
    norm = check_norm(norm)
    step = check_number("step", step, positive=True)
    steps = check_count("steps", steps)
    restarts = check_count("restarts", restarts)
    if restarts > 1 and not random_start:
        raise CstarError("restarts > 1 repeats the same deterministic run; pass random_start=True or restarts=1")
    if restarts > 1 and (y.dim() != 1 or y.is_floating_point()):
        raise CstarError("restarts > 1 needs integer labels y of shape (N,) to tell which runs fooled the model")
    return _run(
        model, x, y, eps=eps, step=step, steps=steps, norm=norm, start=eps if random_start else 0.0,
        project=True, restarts=restarts, targeted=targeted, loss_fn=loss_fn, clip=clip,
        model_mode=model_mode, amp_dtype=amp_dtype, generator=generator,
    )


def nfgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    noise: float | None = None,
    step: float | None = None,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    clip: tuple[float, float] = (0.0, 1.0),
    model_mode: str = "eval",
    amp_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022), L-inf: a cheap training attack.

    Adds uniform noise in ``[-noise, noise]`` (default ``2 * eps``) and takes
    one signed-gradient step of size ``step`` (default ``eps``) from the noisy
    point. No projection onto the ``eps``-ball: the perturbation can reach
    ``noise + step`` (3 * eps by default); only clamped to ``clip``.
    See :func:`pgd` for the other arguments.
    """
    eps, clip = _check_common(x, y, eps, clip, model_mode, amp_dtype)
    noise = 2 * eps if noise is None else check_number("noise", noise)
    step = eps if step is None else check_number("step", step, positive=True)
    return _run(
        model, x, y, eps=eps, step=step, steps=1, norm="linf", start=noise, project=False,
        restarts=1, targeted=targeted, loss_fn=loss_fn, clip=clip,
        model_mode=model_mode, amp_dtype=amp_dtype, generator=generator,
    )
