"""Thin adapter over the optional ``pyautoattack`` package (Croce & Hein 2020): AutoAttack, and its
gradient-free Square attack on its own (:func:`square`), for models without gradients (an INT8 graph)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from cstar._core.errors import CstarError
from cstar.attacks._common import check_count, check_inputs, check_norm, check_number, training_mode

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
_NORM_NAMES = {"linf": "Linf", "l2": "L2"}
_LOGGER = "auto-attack"  # the logger pyautoattack writes to
SQUARE_QUERIES = 5000  # AutoAttack's budget of the Square attack (queries per image)


def require_autoattack(what: str = "AutoAttack") -> None:
    """One line naming the extra when ``pyautoattack`` is not installed (checked before any work)."""
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        raise CstarError(f"{what} needs the optional extra: pip install 'cstar[autoattack]'") from None


class _ForwardTo(logging.Handler):
    def __init__(self, log: Callable[[str], object]):
        super().__init__(logging.DEBUG)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        self._log(record.getMessage())


@contextlib.contextmanager
def _isolated(model: nn.Module, device: torch.device, log: Callable[[str], object] | None) -> Iterator[None]:
    """Contain pyautoattack's side effects for the block.

    It reseeds the global RNGs, calls ``backward`` (filling parameter
    ``.grad``), replaces ``sys.settrace`` (which would stop coverage or a
    debugger) and logs to the "auto-attack" logger. Here parameters are frozen,
    RNG states and the trace function restored, and logging forwarded to
    ``log`` or dropped.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    logger = logging.getLogger(_LOGGER)
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    logger.handlers = [_ForwardTo(log)] if log is not None else []
    logger.propagate = False
    logger.setLevel(logging.DEBUG if log is not None else logging.CRITICAL + 1)
    trace = sys.gettrace()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), training_mode(model, "eval"):
            for p in params:
                p.requires_grad_(False)
            yield
    finally:
        for p in params:
            p.requires_grad_(True)
        sys.settrace(trace)
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    log: Callable[[str], object] | None = None,
) -> torch.Tensor:
    """AutoAttack (Croce & Hein 2020) via ``pyautoattack``; returns x_adv.

    Args:
        model: maps ``x`` to logits (N, K); run in eval mode (restored after).
        x: inputs (N, C, H, W) in [0, 1]; y: int64 labels (N,).
        eps: radius of the ball around ``x`` (input units, e.g. 8/255).
        norm: "linf" or "l2".
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus", "rand",
            or "custom" with ``attacks`` a subset of ``ATTACKS``.
        batch_size: inputs per forward pass inside AutoAttack.
        seed: seed of its random starts (``None``: time-based). The caller's
            global RNG state is left as it was.
        log: called with each progress message; ``None`` silences them.

    Returns:
        Adversarial inputs, detached, same shape, dtype and device as ``x``
        (inputs no attack fooled are returned unchanged).

    Needs the optional extra: ``pip install 'cstar[autoattack]'``.
    """
    check_inputs(x, y, (0.0, 1.0))
    eps = check_number("eps", eps)
    norm = check_norm(norm)
    batch_size = check_count("batch_size", batch_size)
    if version not in VERSIONS:
        raise CstarError(f"unknown AutoAttack version {version!r}; use one of {', '.join(map(repr, VERSIONS))}")
    if (version == "custom") != (attacks is not None):
        raise CstarError("AutoAttack attacks=[...] goes with version='custom' and only with it; pass both or neither")
    if attacks is not None:
        attacks = list(attacks)
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks:
            raise CstarError(f"AutoAttack attacks must be a non-empty subset of {', '.join(ATTACKS)}; got {attacks!r}")
    return _run(model, x, y, eps, norm, version, attacks, batch_size, seed, log)


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    queries: int = SQUARE_QUERIES,
    batch_size: int = 256,
    seed: int | None = 0,
    log: Callable[[str], object] | None = None,
) -> torch.Tensor:
    """The Square attack (Andriushchenko et al. 2020), AutoAttack's gradient-free attack, via ``pyautoattack``.

    Random square-shaped updates at the corners of the eps-ball, each kept when
    it lowers the margin of the true class, at most ``queries`` forward passes
    per image (default 5000, AutoAttack's). It needs only the model's logits, so
    it attacks models without gradients (an exported INT8 graph,
    :func:`cstar.load_exported`) as they are. Arguments and return as
    :func:`autoattack` (``x`` (N, C, H, W) in [0, 1], int64 ``y`` (N,), eps in
    input units); needs ``pip install 'cstar[autoattack]'``.
    """
    check_inputs(x, y, (0.0, 1.0))
    eps = check_number("eps", eps)
    norm = check_norm(norm)
    queries = check_count("queries", queries)
    batch_size = check_count("batch_size", batch_size)
    require_autoattack("the Square attack")
    return _run(model, x, y, eps, norm, "custom", ["square"], batch_size, seed, log, queries)


def _run(model, x, y, eps, norm, version, attacks, batch_size, seed, log, queries=None) -> torch.Tensor:
    """pyautoattack's evaluation of ``attacks`` (``version``), its side effects contained; x_adv."""
    require_autoattack()
    from pyautoattack import AutoAttack

    with _isolated(model, x.device, log):
        adversary = AutoAttack(
            model, attacks=attacks, device=x.device, eps=eps, norm=_NORM_NAMES[norm], seed=seed, version=version,
        )
        if queries is not None:  # Square's budget (AutoAttack's versions set their own)
            adversary.square.n_queries = queries
        x_adv, _ = adversary.run_standard_evaluation(x.detach(), y, batch_size=batch_size)
    return x_adv.detach().to(device=x.device, dtype=x.dtype)
