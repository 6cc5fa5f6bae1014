"""A model description read from a file, checked before anything is built from it.

A save's ``model.json`` and a checkpoint's ``model_config`` describe a model
as data: a registered name and its options. A file never decides what code
runs: a name outside the registry (``package.module:factory``) is accepted
only when the user named the same factory (:func:`check_named`), and nothing
is built from a description until its types and sizes are checked here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._core.errors import CstarError
from ._external import check_named, is_external
from ._registry import create, list_models

#: The largest value a file may give each size option (a crafted 10**9 classes would allocate terabytes).
LIMITS = {"num_classes": 1_000_000, "in_channels": 1024, "input_size": 16_384}


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a crafted value may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def recorded_config(config: Any, source: Any, *, named: str | None = None, builtin_only: bool = False) -> dict:
    """``config`` (read from ``source``) as a checked mapping for :func:`cstar.models.create`.

    Its ``name`` must be a registered model, or a factory the user ``named``
    (--model); ``builtin_only`` refuses factories outright (a save of a
    built-in model never names one). Size options must lie within :data:`LIMITS`.
    Raises :class:`CstarError` otherwise; nothing is imported or built.
    """
    if not isinstance(config, dict) or not all(isinstance(key, str) for key in config):
        raise CstarError(f"{source}: the model description is {short(config)}, not a mapping of options: the file "
                         "is corrupt or was not written by cstar; pass a file that cstar wrote")
    name = config.get("name")
    if not isinstance(name, str):
        raise CstarError(f"{source}: the model name is {short(name)}, not a text: the file is corrupt or was not "
                         "written by cstar; pass a file that cstar wrote")
    if is_external(name) and not builtin_only:
        check_named(name, named, source)
    elif name not in list_models():
        raise CstarError(f"{source}: names the model {short(name)}, which is not a registered model "
                         f"({', '.join(list_models())}); a file never names code for cstar to import: save the "
                         "model again with cstar.save, or pass --model with the factory that builds it")
    for key, limit in LIMITS.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit):
            raise CstarError(f"{source}: {key} is {short(value)}, not an integer from 1 to {limit:,}: the file is "
                             "corrupt or crafted; pass a file that cstar wrote")
    return config


def skeleton(config: dict, source: Any) -> nn.Module:
    """The model ``config`` describes, built on the meta device (no memory for weights) to check a file's tensor
    shapes before the real model is built; ``config`` must have passed :func:`recorded_config`."""
    try:
        with torch.device("meta"):
            return create(**config)
    except CstarError as exc:
        raise CstarError(f"{source}: cannot rebuild its model ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - whatever a crafted option breaks is the file's fault, in one line
        raise CstarError(f"{source}: cannot rebuild its model from the recorded options ({type(exc).__name__}: "
                         f"{short(str(exc), 120)}); the file is corrupt or crafted: pass a file that cstar wrote") from None
