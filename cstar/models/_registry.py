"""Model registry: ``register`` a builder by name, ``create`` a model from a name.

A builder is a function taking the keyword arguments ``num_classes``,
``in_channels``, ``input_size``, ``mean`` and ``std`` (already validated;
``mean``/``std`` are lists of ``in_channels`` floats) plus its own keyword-only
options with defaults, and returning an ``nn.Module``.
"""

import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from .._core.errors import CstarError
from ._external import build, is_external

Builder = Callable[..., nn.Module]

_COMMON = ("num_classes", "in_channels", "input_size", "mean", "std")
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator adding a builder to the registry under ``name``."""

    def decorate(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise CstarError(f"model name {name!r} is already registered; register under another name")
        params = inspect.signature(builder).parameters
        bad = [k for k in _COMMON if k not in params] + [
            k for k, p in params.items()
            if k not in _COMMON and (p.default is p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        ]
        if bad:
            raise CstarError(
                f"builder for {name!r} must take keyword arguments {', '.join(_COMMON)} and options with "
                f"defaults only; fix: {', '.join(bad)}"
            )
        _BUILDERS[name] = builder
        return builder

    return decorate


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_BUILDERS)


def check_int(what: str, value: Any, minimum: int) -> int:
    """Return ``value`` as an int, or raise CstarError unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise CstarError(f"{what} must be an integer >= {minimum}, got {value!r}; pass a valid {what}")
    return int(value)


def _channel_floats(what: str, values: Sequence[float] | None, in_channels: int) -> list[float]:
    if values is None:
        return [0.5] * in_channels
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise CstarError(f"{what} must be a list of {in_channels} numbers, got {values!r}") from None
    if len(floats) != in_channels:
        raise CstarError(
            f"{what} has {len(floats)} values but in_channels={in_channels}; pass one value per channel"
        )
    return floats


def _options(builder: Builder) -> dict[str, Any]:
    """The builder's own options and their defaults."""
    params = inspect.signature(builder).parameters
    return {k: p.default for k, p in params.items() if k not in _COMMON}


def create(
    name: str,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    input_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kw: Any,
) -> nn.Module:
    """Build the registered model ``name``, or the one a factory name points at.

    Inputs of the model are (N, in_channels, input_size, input_size) in [0, 1];
    outputs are logits (N, num_classes). ``mean``/``std`` (default 0.5 per
    channel) feed the model's first layer, :class:`Normalize`. ``kw`` are the
    model's own options (e.g. ``width``). ``name`` may also be
    ``package.module:factory``, ``torchvision:NAME`` or ``timm:NAME``
    (:mod:`cstar.models._external`: imports that code; ``kw`` go to the
    factory, which gets ``num_classes`` and ``in_channels`` where it takes
    them). The model gets a ``cstar_config``
    dict (all options, defaults included) such that ``create(**model.cstar_config)``
    rebuilds it. Bad arguments raise :class:`CstarError`.
    """
    if name not in _BUILDERS and not is_external(name):
        raise CstarError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}, or name a factory "
                         "(package.module:factory, torchvision:NAME, timm:NAME)")
    num_classes = check_int("num_classes", num_classes, 2)
    in_channels = check_int("in_channels", in_channels, 1)
    input_size = check_int("input_size", input_size, 1)
    mean_l = _channel_floats("mean", mean, in_channels)
    std_l = _channel_floats("std", std, in_channels)
    common = {"name": name, "num_classes": num_classes, "in_channels": in_channels, "input_size": input_size,
              "mean": mean_l, "std": std_l}
    if is_external(name):
        model = build(name, num_classes, in_channels, input_size, mean_l, std_l, kw)
        model.cstar_config = {**common, **kw}
        return model
    builder = _BUILDERS[name]
    options = _options(builder)
    unknown = sorted(set(kw) - set(options))
    if unknown:
        valid = ", ".join(sorted(options)) or "none"
        raise CstarError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; valid options: {valid}")
    options.update(kw)
    model = builder(
        num_classes=num_classes, in_channels=in_channels, input_size=input_size,
        mean=mean_l, std=std_l, **options,
    )
    model.cstar_config = {**common, **options}
    return model


def input_shape(model: nn.Module) -> tuple[int, int, int] | None:
    """(channels, height, width) of one input image of a model :func:`create` built (read from its
    ``cstar_config``); None for any other model (then pass the shape where it is asked for)."""
    config = getattr(model, "cstar_config", None)
    if isinstance(config, dict) and "in_channels" in config and "input_size" in config:
        return (config["in_channels"], config["input_size"], config["input_size"])
    return None
