"""Models from outside the registry, named ``package.module:factory``, ``torchvision:NAME`` or ``timm:NAME``.

:func:`cstar.models.create` builds them as it builds the built-ins: images
(N, C, H, W) in [0, 1] go through a :class:`Normalize` front (the dataset's or
the caller's mean and std), then the network, which must return logits
(N, num_classes). The result is ``nn.Sequential(normalize=..., net=...)``, so
its layers are named ``net.<the network's own names>``.

Naming a factory imports and runs its module. cstar does so only for a name
the user typed (an argument, ``--model``); a name read from a checkpoint, a
save or a run record is never imported, and never reaches :func:`_factory`
(the one place that puts the working directory on ``sys.path``), unless the
user names it again (:func:`check_named`, through
:func:`cstar.models._recorded.recorded_config`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._core.errors import CstarError
from ._layers import Normalize

_HUBS = ("torchvision", "timm")  # model hubs named by their package


def is_external(name: object) -> bool:
    """True for a model name that points outside the registry (it holds a ``:``)."""
    return isinstance(name, str) and ":" in name


def check_named(name: str, named: str | None, source: str) -> None:
    """Refuse to import ``name``, read from ``source``, unless the user named it (``named``) too."""
    if is_external(name) and name != named:
        raise CstarError(f"{source} was built by the factory {name!r}, whose code cstar imports only when you name "
                         f"it: pass --model {name} (in Python: cstar.load(path, model=<a fresh instance>))")


def _import_hub(hub: str):
    try:
        return importlib.import_module(hub)
    except Exception as exc:  # noqa: BLE001 - a missing package or one that does not import beside this torch
        raise CstarError(f"--model {hub}:... needs {hub}, which does not import here ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:100]}): pip install 'cstar[{hub}]' with a matching torch") from None


def _factory(name: str) -> Callable[..., Any]:
    """The callable that ``name`` (``module:attribute``) points at, imported from the current directory too."""
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise CstarError(f"model {name!r}: write package.module:factory, torchvision:NAME or timm:NAME")
    if os.getcwd() not in sys.path:  # as `python -m` does: a factory beside the user's scripts imports
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise CstarError(f"model {name!r}: no module named {exc.name!r} (run from the directory that holds "
                         f"{module_name.split('.')[0]}, or install it)") from None
    target = module
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise CstarError(f"model {name!r}: {module_name} has no {attribute!r}; name a function or class in it")
    if not callable(target):
        raise CstarError(f"model {name!r}: {module_name}.{attribute} is not callable; name a function or class")
    return target


def _accepts(factory: Callable[..., Any], key: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return key in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _network(name: str, num_classes: int, in_channels: int, options: dict[str, Any]) -> nn.Module:
    """The bare network: the hub's or factory's, given ``num_classes`` (and the channels) unless in ``options``."""
    hub, _, model_name = name.partition(":")
    if hub in _HUBS:
        package = _import_hub(hub)
        if hub == "timm":
            options = {"num_classes": num_classes, "in_chans": in_channels, **options}
            return package.create_model(model_name, **options)
        importlib.import_module("torchvision.models")
        return package.models.get_model(model_name, **{"num_classes": num_classes, **options})
    factory = _factory(name)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key not in options and _accepts(factory, key):
            options = {**options, key: value}
    try:
        return factory(**options)
    except TypeError as exc:
        raise CstarError(f"model {name!r} does not take these arguments ({exc}): pass its own with "
                         "--model-arg KEY=VALUE") from None


def build(name: str, num_classes: int, in_channels: int, input_size: int, mean: Sequence[float],
          std: Sequence[float], options: dict[str, Any]) -> nn.Module:
    """``Sequential(normalize, net)`` of the network ``name`` names, checked on one (1, C, S, S) image of zeros."""
    net = _network(name, num_classes, in_channels, dict(options))
    if not isinstance(net, nn.Module):
        raise CstarError(f"model {name!r} returned a {type(net).__name__}, not an nn.Module: name a factory of models")
    model = nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, input_size, input_size))
    except Exception as exc:  # noqa: BLE001 - any failure here is the model's, to be named in one line
        raise CstarError(f"model {name!r} fails on a {in_channels}x{input_size}x{input_size} image "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}): build it for these images "
                         "(--model-arg) or use data of the size it takes") from None
    finally:
        model.train(was_training)
    if not torch.is_tensor(out) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise CstarError(f"model {name!r} returns {shape} for one image, not (1, {num_classes}) logits: make it "
                         f"predict {num_classes} classes (e.g. --model-arg num_classes={num_classes})")
    return model
