"""Shared pieces of the attacks: argument checks and the model-mode context."""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
from collections.abc import Iterator

import torch
from torch import nn

from cstar._core.errors import CstarError

NORMS = ("linf", "l2")
MODEL_MODES = ("eval", "train", "keep")
_range_checks_off = 0  # > 0 inside inputs_checked(): the caller has checked the value range itself


@contextlib.contextmanager
def inputs_checked() -> Iterator[None]:
    """Skip the scan of ``x``'s value range in the attacks called in the block.

    The scan costs a host sync per call (a GPU waits for it); a training loop
    that checked its batches' range once (:func:`check_inputs`) runs its
    attacks inside this block. Shapes and arguments are still checked.
    """
    global _range_checks_off
    _range_checks_off += 1
    try:
        yield
    finally:
        _range_checks_off -= 1


@contextlib.contextmanager
def training_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in ``mode`` ("eval", "train" or "keep") for the block.

    Every submodule's previous ``training`` flag is restored on exit, also when
    the block raises, so mixed states (e.g. frozen BatchNorm) survive.
    """
    flags = [(module, module.training) for module in model.modules()]
    if mode != "keep":
        model.train(mode == "train")
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def check_number(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a finite float, >= 0 (or > 0 when ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CstarError(f"{name} must be a number, got {value!r}; pass e.g. {name}=8/255")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise CstarError(f"{name} must be finite and {bound}, got {value}; pass e.g. {name}=8/255")
    return value


def check_count(name: str, value: object) -> int:
    """``value`` as an int >= 1."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)
    except TypeError:
        raise CstarError(f"{name} must be an integer >= 1, got {value!r}; pass e.g. {name}=10") from None
    if count < 1:
        raise CstarError(f"{name} must be an integer >= 1, got {count}; pass e.g. {name}=10")
    return count


def check_norm(norm: object) -> str:
    if norm not in NORMS:
        raise CstarError(f"unknown norm {norm!r}; use one of {', '.join(map(repr, NORMS))}")
    return norm


def check_inputs(x: object, y: object, clip: tuple[float, float]) -> tuple[float, float]:
    """Check a batch (x in [clip_min, clip_max], matching batch sizes); return clip as floats."""
    if not (isinstance(clip, tuple | list) and len(clip) == 2):
        raise CstarError(f"clip must be a pair (clip_min, clip_max), got {clip!r}; pass e.g. clip=(0.0, 1.0)")
    lo, hi = (float(bound) for bound in clip)
    if not lo < hi:
        raise CstarError(f"clip must satisfy clip_min < clip_max, got {clip!r}; pass e.g. clip=(0.0, 1.0)")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        raise CstarError("x must be a floating-point tensor with a batch dimension, e.g. shape (N, C, H, W)")
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0]:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CstarError(
            f"y must be a tensor with one entry per input ({x.shape[0]}), got {got}; pass labels of shape (N,)"
        )
    if x.numel() and not _range_checks_off:
        x_min, x_max = (v.item() for v in torch.aminmax(x.detach()))
        if not (lo - 1e-6 <= x_min and x_max <= hi + 1e-6):
            raise CstarError(
                f"x has values in [{x_min:.4g}, {x_max:.4g}], outside clip=({lo:g}, {hi:g}); "
                "pass images scaled to [0, 1] (normalisation belongs inside the model) or set clip"
            )
    return lo, hi


def check_model_mode(mode: object) -> str:
    if mode not in MODEL_MODES:
        raise CstarError(f"unknown model_mode {mode!r}; use one of {', '.join(map(repr, MODEL_MODES))}")
    return mode


def check_amp_dtype(amp_dtype: object) -> None:
    if amp_dtype is not None and not (isinstance(amp_dtype, torch.dtype) and amp_dtype.is_floating_point):
        raise CstarError(
            f"amp_dtype must be None or a floating torch.dtype, got {amp_dtype!r}; "
            "pass e.g. torch.float16 (CUDA) or torch.bfloat16 (CPU)"
        )
