"""Checks of user-given numbers shared by the layers above (one line naming the value and the fix)."""

from __future__ import annotations

import math
import numbers

from ._errors import CstarError


def check_ratio(what: str, value: object) -> float:
    """``value`` as a float > 1, or one line naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 1:
        raise CstarError(
            f"{what} must be a number > 1 (dense size / compressed size), got {value!r}; e.g. 16 for 16x"
        )
    return float(value)


def check_positive_int(what: str, value: object) -> int:
    """``value`` as an int >= 1, or one line naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise CstarError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def check_radius(what: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float in [0, 1] (in (0, 1] when ``positive``): a radius or step in the units of images
    scaled to [0, 1], as ``--eps``, ``--step`` and :func:`cstar.evaluate` take them; or one line naming ``what``."""
    low = "0 <" if positive else "0 <="
    example = f"(e.g. 8/255 = {8 / 255:.5f})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise CstarError(f"{what}={value!r} is not a number: pass a number with {low} {what} <= 1 {example}")
    if not math.isfinite(value) or not 0 <= value <= 1 or (positive and value == 0):
        raise CstarError(f"{what}={value!r} is out of range: inputs are in [0, 1], so use {low} {what} <= 1 {example}")
    return float(value)


def check_finite(tensors, source: object) -> None:
    """One line naming the first tensor of ``tensors`` (a state dict, or a model) that holds NaN or Inf:
    such a model predicts class 0 for every image, so an accuracy of it would be a figure of nothing."""
    state = tensors.state_dict() if hasattr(tensors, "state_dict") else tensors
    for name, tensor in state.items():
        if hasattr(tensor, "is_floating_point") and tensor.is_floating_point() and tensor.device.type != "meta" \
                and not bool(tensor.isfinite().all()):
            raise CstarError(f"{source} holds NaN or Inf values (tensor {name!r}): the model diverged or the file is "
                             "corrupt; pass a model with finite weights (e.g. the last good checkpoint)")
