"""Save, reload and export models without pickling code.

:func:`save` writes a directory holding two files:

- ``model.json``: the format name and version; the architecture: for a
  built-in model (one with ``cstar_config``) its config plus the modules that
  differ from a fresh ``create(**config)`` (a factorised layer, a BN-folded
  conv...); for a model made of standard layers only (:data:`SAVABLE`) the
  tree of them, class by class with constructor arguments; for any other
  model (a torchvision, timm or user class) its class name and every standard
  layer inside it with its constructor arguments, which is what compression
  and pruning change (a conv that became a Tucker-2 layer, fewer channels), to
  be replayed on a fresh instance (``load(path, model=...)``); ``factorised``, each factorised
  layer's dotted name, class and arguments (ranks), for reading; the tied
  tensors; root attributes named ``cstar_*`` that are plain JSON (such as
  ``cstar_config`` and ``cstar_lowrank``); the weights file's SHA-256.
- ``model.safetensors``: the state dict; a tensor tied to another (one
  parameter shared by two modules) is stored once and re-tied on load.

:func:`load` rebuilds the model from ``model.json`` alone (JSON and safetensors,
never pickle, never user code), or replays the recorded layers on the fresh
instance given as ``model=``, and checks every tensor name and shape before
copying any weight. :func:`export` writes TorchScript or ONNX for deployment.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ._version import __version__
from ._errors import CstarError
from ._io import atomic_write_bytes, state_mismatch, write_json
from .inference import folded_or_same
from .lowrank._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from .models import Normalize, create, list_models, input_shape as models_input_shape
from .models._external import is_external

FORMAT = "cstar-model"
VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"


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


def _factorised(model: nn.Module) -> dict[str, dict]:
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


def _architecture(model: nn.Module) -> dict:
    """{"kind": "builtin", "config", "replacements"} for a built-in model; {"kind": "tree", "root"} for one of
    standard layers only; else {"kind": "replay", "class", "layers"} (every standard layer inside it)."""
    config = getattr(model, "cstar_config", None)
    if isinstance(config, dict) and config.get("name") in list_models():
        replaced: dict[str, dict] = {}
        _replacements(model, create(**config), "", replaced)
        return {"kind": "builtin", "config": config, "replacements": replaced}
    try:
        return {"kind": "tree", "root": _describe(model, "")}
    except CstarError:  # a class cstar cannot build: record what compression and pruning change inside it
        layers: dict[str, dict | None] = {}
        _standard_layers(model, "", layers)
        foreign = sorted({type(m).__qualname__ for m in model.modules() if type(m) not in _NAME_OF})
        return {"kind": "replay", "class": _class_name(model), "foreign": foreign, "layers": layers}


def _json_attributes(model: nn.Module) -> dict[str, Any]:
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


def _build(spec: Any, name: str, source: Path) -> nn.Module | None:
    """The module described by ``spec`` (see :func:`_describe`); ``source`` names the file in errors."""
    if spec is None:
        return None
    label = name or "<root>"
    if not isinstance(spec, dict) or spec.get("class") not in SAVABLE:
        found = spec.get("class") if isinstance(spec, dict) else spec
        raise CstarError(
            f"{source}: module {label!r} has unknown class {found!r}; the file was edited or written by another "
            f"program: save the model again with cstar.save (known classes: {', '.join(SAVABLE)})"
        )
    args, children = spec.get("args", {}), spec.get("children", [])
    if not isinstance(args, dict) or not isinstance(children, list) or not all(
        isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) for c in children
    ):
        raise CstarError(f"{source}: module {label!r} has malformed args or children; save the model again")
    try:
        module = SAVABLE[spec["class"]][0](**{k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    except (TypeError, ValueError, RuntimeError) as exc:  # CstarError is a ValueError
        raise CstarError(
            f"{source}: cannot build module {label!r} ({spec['class']}) from its arguments ({exc}); "
            "save the model again with cstar.save"
        ) from None
    for key, child in children:
        module.add_module(key, _build(child, _join(name, key), source))
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
    saved, layers = architecture.get("class"), architecture.get("layers")
    if not isinstance(layers, dict):
        raise CstarError(f"{source}: the replay record has no layers; save the model again")
    if fresh is None:
        foreign = ", ".join(architecture.get("foreign") or [str(saved)])
        raise CstarError(f"{source.parent} holds a {saved} built of classes whose code a save does not hold "
                         f"({foreign}): pass a freshly built instance, cstar.load(path, model={saved.rpartition('.')[2]}"
                         "(...)), or deploy it through ONNX")
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


def _rebuild(architecture: Any, source: Path, fresh: nn.Module | None = None) -> nn.Module:
    """The model that ``architecture`` (of ``model.json`` at ``source``) describes; ``fresh`` serves replay saves."""
    kind = architecture.get("kind") if isinstance(architecture, dict) else None
    if kind == "replay":
        return _replay(architecture, fresh, source)
    if kind == "tree":
        return _build(architecture.get("root"), "", source)
    if kind != "builtin":
        raise CstarError(f"{source}: unknown architecture kind {kind!r}; save the model again with cstar.save")
    try:
        model = create(**architecture["config"])
    except (CstarError, TypeError, KeyError) as exc:
        raise CstarError(f"{source}: cannot rebuild the built-in model ({exc}); save the model again") from None
    for name, spec in architecture.get("replacements", {}).items():
        _set_submodule(model, name, _build(spec, name, source), source)
    return model


# ----------------------------------------------------------------------------- tied tensors


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(unique tensors, alias -> source name) for a state dict; exact aliases of one tensor are stored once."""
    unique, tied, seen = {}, {}, {}
    for key, tensor in state.items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.stride(), tensor.dtype)
        if tensor.numel() and ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            unique[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return unique, tied


def _slot(model: nn.Module, name: Any) -> tuple[dict, str] | None:
    """(the ``_parameters`` or ``_buffers`` dict holding tensor ``name``, its key), or None if there is none."""
    if not isinstance(name, str):
        return None
    owner_name, _, leaf = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError:
        return None
    return next(((t, leaf) for t in (owner._parameters, owner._buffers) if t.get(leaf) is not None), None)


def _retie(model: nn.Module, tied: dict[str, str], source: Path) -> None:
    """Make each alias tensor of ``model`` the very tensor (parameter or buffer) of its origin."""
    for alias, origin in tied.items():
        alias_slot, origin_slot = _slot(model, alias), _slot(model, origin)
        if alias_slot is None or origin_slot is None:
            raise CstarError(f"{source}: tied tensor {alias!r} -> {origin!r} does not exist in the model; save again")
        alias_slot[0][alias_slot[1]] = origin_slot[0][origin_slot[1]]


# ----------------------------------------------------------------------------- save / load


def _is_cstar_dir(path: Path) -> bool:
    try:
        return json.loads((path / MODEL_JSON).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def save(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model`` to directory ``path`` (``model.json`` + ``model.safetensors``); returns the path.

    The directory is created if needed; an existing non-empty directory must be
    an earlier cstar save (its two files are replaced, other files are kept).
    Any model can be saved; one of a class that cstar cannot build (a
    torchvision, timm or user class) is reloaded with ``load(path, model=fresh)``.
    Raises :class:`CstarError` when the standard layers and weights do not
    describe the model (modules whose state is not in their constructor arguments).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CstarError(f"save target {path} is a file: pass a directory path (it will hold model.json)")
    if path.is_dir() and any(path.iterdir()) and not _is_cstar_dir(path):
        raise CstarError(f"save target {path} is a non-empty directory that is not a cstar model: choose a new path")
    architecture = _architecture(model)
    unique, tied = _split_tied(model.state_dict())
    check = _rebuild(architecture, path / MODEL_JSON, copy.deepcopy(model) if architecture["kind"] == "replay" else None)
    _retie(check, tied, path / MODEL_JSON)
    problem = state_mismatch(check, {k: v.shape for k, v in unique.items()}, tied)
    if problem:
        raise CstarError(
            f"cannot save this {type(model).__name__}: its modules are not described by their constructor "
            f"arguments alone ({problem}); use export(model, path, format='torchscript')"
        )
    weights = safetensors.torch.save(unique, metadata={"format": FORMAT})
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CstarError(f"cannot create {path} ({exc.strerror}): choose a writable path") from None
    atomic_write_bytes(path / WEIGHTS, weights)
    write_json(path / MODEL_JSON, {
        "format": FORMAT,
        "version": VERSION,
        "cstar_version": __version__,
        "torch_version": torch.__version__,
        "architecture": architecture,
        "factorised": _factorised(model),
        "tied": tied,
        "attributes": _json_attributes(model),
        "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest()},
    })
    return path


def _read_record(path: Path) -> dict:
    """The parsed ``model.json`` of save directory ``path``, its format, version and entries checked."""
    if not path.is_dir() or not (path / MODEL_JSON).is_file():
        raise CstarError(
            f"{path} is not a cstar model directory (no {MODEL_JSON}): pass a directory written by "
            "cstar.serialize.save (a training checkpoint.pt is not one)"
        )
    try:
        record = json.loads((path / MODEL_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CstarError(f"{path / MODEL_JSON} is not valid JSON ({exc}): save the model again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CstarError(f"{path / MODEL_JSON} is not a cstar model file (format is not {FORMAT!r}): pass a cstar save")
    if record.get("version") != VERSION:
        raise CstarError(
            f"{path / MODEL_JSON} has format version {record.get('version')!r}, this cstar {__version__} reads version "
            f"{VERSION}: use the cstar version that wrote it"
        )
    if not all(isinstance(record.get(k), dict) for k in ("architecture", "tied", "attributes", "weights")):
        raise CstarError(f"{path / MODEL_JSON} lacks an architecture, tied, attributes or weights entry: save again")
    return record


def _factory_config(record: dict) -> dict | None:
    """The ``cstar_config`` of a saved model that a factory built and that :func:`load` needs ``model=`` for
    (its classes are not cstar's), else None."""
    config = record["attributes"].get("cstar_config") or {}
    replay = record["architecture"].get("kind") == "replay"
    return config if replay and is_external(config.get("name")) else None


def factory_config(path: str | os.PathLike) -> dict | None:
    """How the model in save ``path`` was built (its ``cstar_config``) when a factory built it and
    :func:`load` needs a fresh instance, ``cstar.models.create(**config)``; None otherwise. Reads
    ``model.json`` only: nothing is imported."""
    return _factory_config(_read_record(Path(path)))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
         model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`, in eval mode on ``map_location`` (default "cpu").

    A built-in model or one of standard layers rebuilds from the save alone
    (``model`` is not needed and not used). A model of another class needs
    ``model``: a freshly built instance of the saved class, built as the saved
    one was (e.g. ``torchvision.models.resnet50(num_classes=10)``); the
    recorded layers replace its own (factorised layers, pruned channels), then
    the weights are loaded into it and it is returned. Only JSON and
    safetensors are read. Raises :class:`CstarError` for a path that is not a
    cstar save, an unknown format version or class, a missing or different
    ``model``, or weights that are corrupt, truncated or do not match the architecture.
    """
    path = Path(path)
    record = _read_record(path)
    source = path / MODEL_JSON
    tied = record["tied"]
    factory = _factory_config(record)
    if model is None and factory is not None:
        built_by = factory["name"]
        raise CstarError(f"{path} holds a model of the factory {built_by!r}, whose code a save does not hold: pass "
                         f"model=cstar.models.create({built_by!r}, ...) built as the saved one was (its cstar_config "
                         f"attribute says how), or on the command line --model {built_by}")
    model = _rebuild(record["architecture"], source, model)
    _retie(model, tied, source)
    weights_path = path / WEIGHTS
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise CstarError(f"cannot read {weights_path} ({exc.strerror}): the save is incomplete; save again") from None
    if hashlib.sha256(data).hexdigest() != record["weights"].get("sha256"):
        raise CstarError(
            f"{weights_path} does not match the checksum in {MODEL_JSON}: it is corrupt, truncated or from another "
            "save; save the model again"
        )
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise CstarError(f"{weights_path} is not a valid safetensors file ({exc}); save the model again") from None
    problem = state_mismatch(model, {k: v.shape for k, v in tensors.items()}, tied)
    if problem and record["architecture"].get("kind") == "replay":
        raise CstarError(f"{weights_path} does not fit model= with the saved layers in place ({problem}): pass an "
                         "instance built with the same arguments as the saved one")
    if problem:
        raise CstarError(f"{weights_path} does not fit the architecture in {MODEL_JSON} ({problem}); save again")
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floating) == 1:
        model.to(floating.pop())
    state = {**tensors, **{alias: tensors[origin] for alias, origin in tied.items()}}
    model.load_state_dict(state)
    for key, value in record["attributes"].items():
        if key.startswith("cstar_"):
            setattr(model, key, value)
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- export


def _input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(v) for v in input_shape)
    shape = models_input_shape(model)
    if shape is not None:
        return shape
    raise CstarError("export needs the input shape of this model: pass input_shape=(C, H, W)")


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx",
           input_shape: tuple[int, ...] | None = None, opset: int | None = None, fold_bn: bool = True) -> Path:
    """Export ``model`` (a copy, in eval mode) to the file ``path``; returns the path.

    ``format`` "torchscript" traces with ``torch.jit.trace``; "onnx" uses torch's
    TorchScript-based ONNX exporter (``dynamo=False``: it needs only the ``onnx``
    package, not ``onnxscript``), with a dynamic batch dimension, input named
    "input" and output "logits"; ``opset`` defaults to torch's choice.
    ``input_shape`` (C, H, W) defaults to ``cstar_config``'s channels and size.
    ``fold_bn`` (default True): BatchNorm folded into the convs before export
    (:func:`cstar.inference.folded_or_same`; the same outputs within float
    rounding, fewer nodes for runtimes that do not fold it themselves).
    """
    if format not in ("onnx", "torchscript"):
        raise CstarError(f"unknown export format {format!r}: choose 'onnx' or 'torchscript'")
    path = Path(path)
    if path.is_dir() or not path.parent.is_dir():
        raise CstarError(f"export target {path} must be a file path in an existing directory")
    if format == "onnx" and importlib.util.find_spec("onnx") is None:
        raise CstarError("ONNX export needs the onnx package: pip install 'cstar[export]' (or pip install onnx)")
    shape = _input_shape(model, input_shape)
    model = copy.deepcopy(folded_or_same(model) if fold_bn else model).eval()
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = torch.rand(1, *shape, device=device)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates both TorchScript and this exporter
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), buffer)
        else:
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    return atomic_write_bytes(path, buffer.getvalue())
