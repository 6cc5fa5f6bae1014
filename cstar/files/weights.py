"""Weights files written by other programs, loaded into a model the caller built: :func:`load_weights`.

People arrive with whatever their training script wrote: a plain state dict,
one nested under ``state_dict``, ``model``, ``net``, ``ema``..., keys prefixed
by DataParallel (``module.``) or ``torch.compile`` (``_orig_mod.``), a
``.safetensors`` file, a RobustBench-style checkpoint. The file is data only
(``torch.load(weights_only=True)`` on the CPU, or safetensors); the model
always comes from the caller, never from the file, and every tensor name,
shape and value is checked before any weight is copied.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .._core.checks import check_finite
from .._core import log
from .._core.errors import CstarError
from .._core.io import load_checkpoint_file

#: Keys under which training scripts nest a state dict, most specific first.
NESTING_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model_state_dict", "model", "net", "network")
#: Key prefixes that wrappers add: DataParallel / DDP, torch.compile, Lightning and RobustBench wrappers.
PREFIXES = ("module.", "_orig_mod.", "model.")


def read_weights_file(path: str | os.PathLike) -> Any:
    """The object stored in ``path``: a ``.safetensors`` file's tensors, or what ``torch.load(weights_only=True)``
    returns, on the CPU (a file saved on a GPU loads on a machine without one)."""
    path = Path(path)
    if not path.is_file():
        raise CstarError(f"weights file {path} does not exist: pass the path of a .pt, .pth or .safetensors file")
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types for malformed files
            raise CstarError(f"{path} is not a valid safetensors file ({str(exc)[:100]}): pass the file your "
                             "training wrote") from None
    return load_checkpoint_file(path, map_location="cpu")


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in value.items())


def find_state_dict(obj: Any, source: Any) -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """(the state dict inside ``obj``, the keys it sits under): ``obj`` itself, or one nested under
    :data:`NESTING_KEYS` (two levels deep at most, e.g. ``{"model": {"state_dict": ...}}``)."""
    candidates = [((), obj)]
    for _ in range(3):
        for keys, candidate in candidates:
            if _is_state(candidate):
                return dict(candidate), keys
        candidates = [((*keys, key), c[key]) for keys, c in candidates if isinstance(c, Mapping)
                      for key in NESTING_KEYS if key in c]
    keys = sorted(map(str, obj))[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CstarError(f"{source} holds no state dict (a mapping of tensor names to tensors) at its top or under "
                     f"{', '.join(NESTING_KEYS)}; found {keys}: save model.state_dict() with torch.save")


def _stripped(keys: list[str]) -> list[tuple[str, ...]]:
    """Every sequence of :data:`PREFIXES` that all ``keys`` share, outermost first (the empty one included)."""
    out, current, prefixes = [()], list(keys), ()
    while True:
        shared = next((p for p in PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if shared is None:
            return out
        prefixes += (shared,)
        current = [k[len(shared):] for k in current]
        out.append(prefixes)


def _without(state: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    n = sum(map(len, prefixes))
    return {k[n:]: v for k, v in state.items()}


def _differences(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(how many names or shapes differ, one line naming the first of them) between ``state`` and ``model``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    if extra:
        parts.append(f"unexpected {', '.join(extra[:3])}" + (f" (+{len(extra) - 3} more)" if len(extra) > 3 else ""))
    if shapes:
        k = shapes[0]
        parts.append(f"{k} is {tuple(state[k].shape)} in the file, {expected[k]} in the model"
                     + (f" (+{len(shapes) - 1} more shapes)" if len(shapes) > 1 else ""))
    return len(missing) + len(extra) + len(shapes), "; ".join(parts)


def _target(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Where the weights go: ``model``, or the network inside the normalising front that
    :func:`cstar.models.create` puts around a factory's model, when the file holds that network alone."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(model, "normalize") and not any(k.startswith("net.") for k in state):
        return net
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the weights file ``path`` into ``model`` (which you built) and return ``model``.

    Reads a plain state dict, one nested under a common key
    (:data:`NESTING_KEYS`), keys prefixed by ``module.`` (DataParallel/DDP),
    ``_orig_mod.`` (torch.compile) or ``model.`` (:data:`PREFIXES`), and
    ``.safetensors`` files; only tensors and plain values are ever read
    (``weights_only=True``), on the CPU. For a model built by
    ``cstar.models.create("package.module:factory")`` the weights of the
    network alone go into its ``net``. Every name and shape is checked, and
    NaN/Inf values refused, before any weight is copied: a mismatch raises
    :class:`CstarError` naming the first differing keys. BatchNorm's
    ``num_batches_tracked`` may be absent (older files).
    """
    if not isinstance(model, nn.Module):
        raise CstarError(f"load_weights needs the nn.Module to load into, got {type(model).__name__}")
    state, keys = find_state_dict(read_weights_file(path), path)
    target = _target(model, state)
    tried = [(_differences(target, _without(state, p)), p) for p in _stripped(list(state))]
    ((count, problem), prefixes) = min(tried, key=lambda t: t[0][0])
    if count:
        where = "" if target is model else " (the network inside cstar's normalising front)"
        raise CstarError(f"{path} does not fit the model{where}: {problem}; pass the weights of this architecture, "
                         "built with the same arguments (--model-arg)")
    state = _without(state, prefixes)
    check_finite(state, path)
    if keys or prefixes:  # say which tensors were taken, where the file held more than one candidate
        under = f" under {'/'.join(repr(k) for k in keys)}" if keys else ""
        dropped = f", key prefix {''.join(prefixes)!r} dropped" if prefixes else ""
        log.info(f"{path}: the weights{under}{dropped}")
    for key, value in target.state_dict().items():  # older files lack BatchNorm's counters
        state.setdefault(key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target.load_state_dict(state)
    return model
