"""A model's architecture as JSON (``model.json``) and the model rebuilt from it, with no pickled code.

A model :func:`cstar.models.create` built is described by its config plus the
modules that cstar replaced in it (factorised layers, pruned convs...); a model
of standard layers only by its module tree (:data:`SAVABLE` classes); any other
model is replayed on a fresh instance the caller gives.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .._core.errors import CstarError
from ..lowrank._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ..models import Normalize, create, list_models
from ..models._recorded import recorded_config, short


def _attrs(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {n: getattr(m, n) for n in names}


def _with_bias(*names: str) -> Callable[[nn.Module], dict]:
    return lambda m: {**{n: getattr(m, n) for n in names}, "bias": m.bias is not None}


def _tucker2_args(m: Tucker2Conv2d) -> dict:
    return {"in_channels": m.first.in_channels, "out_channels": m.last.out_channels,
            "kernel_size": m.core.kernel_size, "ranks": m.ranks, "stride": m.core.stride,
            "padding": m.core.padding, "dilation": m.core.dilation, "bias": m.last.bias is not None,
            "padding_mode": m.core.padding_mode}


def _lowrank_conv_args(m: LowRankConv1x1) -> dict:
    return {"in_channels": m.first.in_channels, "out_channels": m.last.out_channels, "rank": m.rank,
            "stride": m.first.stride, "padding": m.first.padding, "bias": m.last.bias is not None,
            "padding_mode": m.first.padding_mode}


def _lowrank_linear_args(m: LowRankLinear) -> dict:
    return {"in_features": m.first.in_features, "out_features": m.last.out_features, "rank": m.rank,
            "bias": m.last.bias is not None}


def _normalize_args(m: Normalize) -> dict:
    return {"mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()}


_POOL = ("kernel_size", "stride", "padding")
#: Module classes that :func:`save` can record (exact classes, not subclasses): name -> (class, constructor arguments).
SAVABLE: dict[str, tuple[type[nn.Module], Callable[[nn.Module], dict]]] = {
    "Sequential": (nn.Sequential, _attrs()),
    "Conv2d": (nn.Conv2d, _with_bias("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
                                     "groups", "padding_mode")),
    "Linear": (nn.Linear, _with_bias("in_features", "out_features")),
    "BatchNorm1d": (nn.BatchNorm1d, _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "BatchNorm2d": (nn.BatchNorm2d, _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")),
    "ReLU": (nn.ReLU, _attrs("inplace")),
    "ReLU6": (nn.ReLU6, _attrs("inplace")),
    "LeakyReLU": (nn.LeakyReLU, _attrs("negative_slope", "inplace")),
    "GELU": (nn.GELU, _attrs("approximate")),
    "SiLU": (nn.SiLU, _attrs("inplace")),
    "Sigmoid": (nn.Sigmoid, _attrs()),
    "Tanh": (nn.Tanh, _attrs()),
    "MaxPool2d": (nn.MaxPool2d, _attrs(*_POOL, "dilation", "return_indices", "ceil_mode")),
    "AvgPool2d": (nn.AvgPool2d, _attrs(*_POOL, "ceil_mode", "count_include_pad", "divisor_override")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, _attrs("output_size")),
    "Flatten": (nn.Flatten, _attrs("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, _attrs("p", "inplace")),
    "Identity": (nn.Identity, _attrs()),
    "Normalize": (Normalize, _normalize_args),
    "Tucker2Conv2d": (Tucker2Conv2d, _tucker2_args),
    "LowRankConv1x1": (LowRankConv1x1, _lowrank_conv_args),
    "LowRankLinear": (LowRankLinear, _lowrank_linear_args),
}
_NAME_OF = {cls: name for name, (cls, _) in SAVABLE.items()}
_FACTORISED = (Tucker2Conv2d, LowRankConv1x1, LowRankLinear)


# ----------------------------------------------------------------------------- describing a model


def _describe(module: nn.Module, name: str) -> dict:
    """JSON spec of ``module`` (at dotted ``name``): {"class", "args"} plus "children" for a Sequential."""
    cls = type(module)
    if cls not in _NAME_OF:
        raise CstarError(
            f"cannot save module {name or '<root>'!r} of class {cls.__module__}.{cls.__qualname__}: only built-in "
            "models, nn.Sequential of standard layers and cstar's factorised layers are saved without pickling "
            "code; use a built-in model (cstar.models.create), an nn.Sequential of standard layers, or "
            "export(model, path, format='torchscript')"
        )
    class_name = _NAME_OF[cls]
    spec = {"class": class_name, "args": SAVABLE[class_name][1](module)}
    if cls is nn.Sequential:
        spec["children"] = [[key, _describe(child, _join(name, key))] for key, child in module._modules.items()]
    return spec


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _replacements(model: nn.Module, fresh: nn.Module | None, name: str, out: dict[str, dict]) -> None:
    """Record in ``out`` (dotted name -> spec) every submodule of ``model`` that differs from ``fresh``."""
    for key, child in model._modules.items():
        child_name = _join(name, key)
        reference = None if fresh is None else fresh._modules.get(key)
        if reference is None or type(child) is not type(reference):
            out[child_name] = None if child is None else _describe(child, child_name)
        elif type(child) in _NAME_OF and _describe(child, child_name) != _describe(reference, child_name):
            out[child_name] = _describe(child, child_name)
        else:
            _replacements(child, reference, child_name, out)


def factorised(model: nn.Module) -> dict[str, dict]:
    """Dotted name -> {"class", "args"} of every factorised layer in ``model``."""
    return {name: _describe(m, name) for name, m in model.named_modules() if isinstance(m, _FACTORISED)}


def _standard_layers(module: nn.Module, name: str, out: dict[str, dict | None]) -> None:
    """Record in ``out`` (dotted name -> spec) every standard layer inside ``module``, containers walked through."""
    for key, child in module._modules.items():
        child_name = _join(name, key)
        if child is None:
            out[child_name] = None
        elif type(child) in _NAME_OF and type(child) is not nn.Sequential:
            out[child_name] = _describe(child, child_name)
        else:
            _standard_layers(child, child_name, out)


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def architecture(model: nn.Module, replay: bool = False) -> dict:
    """{"kind": "builtin", "config", "replacements"} for a built-in model; {"kind": "tree", "root"} for one of
    standard layers only; else, or with ``replay=True``, {"kind": "replay", "class", "layers"} (every standard
    layer inside it; reloaded into a freshly built instance)."""
    config = getattr(model, "cstar_config", None)
    if not replay and isinstance(config, dict) and config.get("name") in list_models():
        replaced: dict[str, dict] = {}
        _replacements(model, create(**config), "", replaced)
        return {"kind": "builtin", "config": config, "replacements": replaced}
    try:
        if not replay:
            return {"kind": "tree", "root": _describe(model, "")}
    except CstarError:  # a class cstar cannot build: record what compression and pruning change inside it
        pass
    layers: dict[str, dict | None] = {}
    _standard_layers(model, "", layers)
    foreign = sorted({type(m).__qualname__ for m in model.modules() if type(m) not in _NAME_OF})
    return {"kind": "replay", "class": _class_name(model), "foreign": foreign, "layers": layers}


def json_attributes(model: nn.Module) -> dict[str, Any]:
    """Root attributes named ``cstar_*`` holding plain JSON values (others are skipped with a warning)."""
    out = {}
    for key, value in vars(model).items():
        if key.startswith("cstar_"):
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                warnings.warn(f"save: attribute {key} is not plain JSON and is not saved", stacklevel=3)
                continue
            out[key] = value
    return out


# ----------------------------------------------------------------------------- building a model from JSON


#: The deepest nesting of Sequentials a model.json may describe (a crafted one could exhaust the stack).
MAX_DEPTH = 64


def _build(spec: Any, name: str, source: Path, depth: int = 0) -> nn.Module | None:
    """The module described by ``spec`` (see :func:`_describe`); ``source`` names the file in errors."""
    if spec is None:
        return None
    label = name or "<root>"
    if depth > MAX_DEPTH:
        raise CstarError(f"{source}: module {short(label)} is nested more than {MAX_DEPTH} levels deep: the file is "
                         "corrupt or crafted; save the model again with cstar.save")
    if not isinstance(spec, dict) or spec.get("class") not in SAVABLE:
        found = spec.get("class") if isinstance(spec, dict) else spec
        raise CstarError(
            f"{source}: module {short(label)} has unknown class {short(found)}; the file was edited or written by another "
            f"program: save the model again with cstar.save (known classes: {', '.join(SAVABLE)})"
        )
    args, children = spec.get("args", {}), spec.get("children", [])
    if not isinstance(args, dict) or not isinstance(children, list) or not all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children
    ):
        raise CstarError(f"{source}: module {short(label)} has malformed args or children; save the model again")
    try:
        module = SAVABLE[spec["class"]][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
        for key, child in children:
            module.add_module(key, _build(child, _join(name, key), source, depth + 1))
    except CstarError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever crafted arguments break is the file's fault, in one line
        raise CstarError(
            f"{source}: cannot build module {short(label)} ({spec['class']}) from its arguments "
            f"({type(exc).__name__}: {short(str(exc), 100)}); save the model again with cstar.save"
        ) from None
    return module


def _set_submodule(model: nn.Module, name: str, module: nn.Module | None, source: Path) -> None:
    parent_name, _, key = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        raise CstarError(
            f"{source}: replacement {name!r} has no parent module in the rebuilt model; save the model again"
        ) from None
    parent._modules[key] = module


def _replay(architecture: dict, fresh: nn.Module | None, source: Path) -> nn.Module:
    """``fresh`` with every recorded standard layer rebuilt from ``model.json`` in its place."""
    saved, layers, foreign = architecture.get("class"), architecture.get("layers"), architecture.get("foreign") or []
    if not isinstance(saved, str) or not isinstance(layers, dict) or not isinstance(foreign, list):
        raise CstarError(f"{source}: the replay record's class, layers or foreign entry is malformed: the file is "
                         "corrupt or crafted; save the model again with cstar.save")
    if fresh is None:
        why = (f"built of classes whose code a save does not hold ({short(', '.join(map(str, foreign)), 200)})"
               if foreign else "with state outside its standard layers, which a save describes alone")
        raise CstarError(f"{source.parent} holds a {saved} {why}: pass a freshly built instance, "
                         f"cstar.load(path, model={saved.rpartition('.')[2]}(...)), or deploy it through ONNX")
    if _class_name(fresh) != saved:
        raise CstarError(f"model= is a {_class_name(fresh)} but {source.parent} holds a {saved}: pass an instance "
                         "of the saved class")
    modules = dict(fresh.named_modules(remove_duplicate=False))
    for name, spec in layers.items():
        parent, _, key = name.rpartition(".")
        if parent not in modules or key not in modules[parent]._modules:
            raise CstarError(f"model= has no module {name!r}, which {source.parent} holds: pass an instance built "
                             "with the same arguments as the saved one")
        modules[parent]._modules[key] = _build(spec, name, source)
    return fresh


def rebuild(architecture: Any, source: Path, fresh: nn.Module | None = None) -> nn.Module:
    """The model that ``architecture`` (of ``model.json`` at ``source``) describes; ``fresh`` serves replay saves."""
    kind = architecture.get("kind") if isinstance(architecture, dict) else None
    if kind == "replay":
        return _replay(architecture, fresh, source)
    if kind == "tree":
        return _build(architecture.get("root"), "", source)
    if kind != "builtin":
        raise CstarError(f"{source}: unknown architecture kind {short(kind)}; save the model again with cstar.save")
    config = recorded_config(architecture.get("config"), source, builtin_only=True)  # a registered name, or refused
    replacements = architecture.get("replacements", {})
    if not isinstance(replacements, dict):
        raise CstarError(f"{source}: the replacements entry is not a mapping: the file is corrupt or crafted; save again")
    model = _create(config, source)
    for name, spec in replacements.items():
        _set_submodule(model, name, _build(spec, name, source), source)
    return model


def _create(config: dict, source: Path) -> nn.Module:
    """``create(**config)`` of a checked built-in config, any failure in one line."""
    try:
        return create(**config)
    except CstarError as exc:
        raise CstarError(f"{source}: cannot rebuild the built-in model ({exc}); save the model again") from None
    except Exception as exc:  # noqa: BLE001 - whatever crafted options break is the file's fault, in one line
        raise CstarError(f"{source}: cannot rebuild the built-in model ({type(exc).__name__}: {short(str(exc), 100)});"
                         " save the model again") from None


# ----------------------------------------------------------------------------- tied tensors
