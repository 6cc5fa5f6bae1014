"""Save, reload and export models without pickling code.

:func:`save` writes a directory holding two files:

- ``model.json``: the format name and version; the architecture: for a
  built-in model (one with ``cstar_config``) its config plus the modules that
  differ from a fresh ``create(**config)`` (a factorised layer, a BN-folded
  conv...); for a model made of standard layers only (``_architecture.SAVABLE``) the
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
copying any weight. (:func:`cstar.export` writes TorchScript or ONNX for deployment: ``_export.py``.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from .._version import __version__
from .._core.errors import CstarError
from .._core.checks import check_finite
from .._core.io import atomic_write_bytes, load_checkpoint, state_mismatch, write_json
from .architecture import architecture as describe_architecture, factorised, json_attributes, rebuild
from ..models._external import is_external
from ..models import create, list_models
from ..models._recorded import recorded_config, short, skeleton

FORMAT = "cstar-model"
VERSION = 1
MODEL_JSON = "model.json"
WEIGHTS = "model.safetensors"
MAX_RECORD_BYTES = 64 * 2**20  # a model.json of ~100k layers is ~30 MB


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


def check_save_target(path: str | os.PathLike) -> None:
    """Refuse a ``path`` that :func:`save` may not write: a file, or a non-empty directory that is not a save."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CstarError(f"save target {path} is a file: pass a directory path (it will hold model.json)")
    if path.is_dir() and any(path.iterdir()) and not _is_cstar_dir(path):
        raise CstarError(f"save target {path} is a non-empty directory that is not a cstar model: choose a new path")


def _described(model: nn.Module, source: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(architecture, unique tensors, tied aliases) of ``model``, checked to rebuild it: a model whose modules are
    not described by their constructor arguments alone is refused."""
    unique, tied = _split_tied(model.state_dict())
    architecture = describe_architecture(model)
    problem = _rebuild_problem(model, architecture, unique, tied, source)
    if problem and architecture["kind"] == "tree":  # state outside the standard layers (e.g. a bare Parameter)
        architecture = describe_architecture(model, replay=True)  # reloaded into a fresh instance, which has it
        problem = _rebuild_problem(model, architecture, unique, tied, source)
    if problem:
        raise CstarError(
            f"cannot save this {type(model).__name__}: its modules are not described by their constructor "
            f"arguments alone ({problem}); use export(model, path, format='torchscript')"
        )
    return architecture, unique, tied


def _rebuild_problem(model: nn.Module, architecture: dict, unique: dict[str, torch.Tensor], tied: dict[str, str],
                     source: Path) -> str | None:
    """How the model that ``architecture`` rebuilds fails to hold ``model``'s weights, or None."""
    check = rebuild(architecture, source, copy.deepcopy(model) if architecture["kind"] == "replay" else None)
    _retie(check, tied, source)
    return state_mismatch(check, {k: v.shape for k, v in unique.items()}, tied)


def check_savable(model: nn.Module) -> None:
    """Refuse now a ``model`` that :func:`save` could not write (e.g. before training it, so that a run does not
    end unable to keep its result); nothing is written."""
    _described(model, Path(MODEL_JSON))


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
    check_save_target(path)
    architecture, unique, tied = _described(model, path / MODEL_JSON)
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
        "factorised": factorised(model),
        "tied": tied,
        "attributes": json_attributes(model),
        "weights": {"file": WEIGHTS, "sha256": hashlib.sha256(weights).hexdigest()},
    })
    return path


def record_trained_on(model: nn.Module, dataset: str | None, eps: float) -> None:
    """Record on ``model`` the dataset name and L-inf ``eps`` it was (last) adversarially trained on, as its
    ``cstar_trained_on`` attribute: :func:`save` keeps it, and ``cstar eval`` evaluates there by default."""
    model.cstar_trained_on = {"dataset": dataset, "eps": eps}


def _read_record(path: Path) -> dict:
    """The parsed ``model.json`` of save directory ``path``, its format, version and entries checked."""
    if not path.is_dir() or not (path / MODEL_JSON).is_file():
        raise CstarError(
            f"{path} is not a cstar model directory (no {MODEL_JSON}): pass a directory written by "
            "cstar.files.serialize.save (a training checkpoint.pt is not one)"
        )
    size = (path / MODEL_JSON).stat().st_size
    if size > MAX_RECORD_BYTES:
        raise CstarError(f"{path / MODEL_JSON} is {size:,} bytes, more than the {MAX_RECORD_BYTES:,} a model "
                         "description needs: the file is corrupt or crafted; save the model again")
    try:
        record = json.loads((path / MODEL_JSON).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CstarError(f"{path / MODEL_JSON} is not valid JSON ({short(str(exc), 100)}): save the model again") from None
    except RecursionError:
        raise CstarError(f"{path / MODEL_JSON} is nested too deeply to be a model description: the file is corrupt "
                         "or crafted; save the model again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CstarError(f"{path / MODEL_JSON} is not a cstar model file (format is not {FORMAT!r}): pass a cstar save")
    if record.get("version") != VERSION:
        raise CstarError(
            f"{path / MODEL_JSON} has format version {record.get('version')!r}, this cstar {__version__} reads version "
            f"{VERSION}: use the cstar version that wrote it"
        )
    if not all(isinstance(record.get(k), dict) for k in ("architecture", "tied", "attributes", "weights")):
        raise CstarError(f"{path / MODEL_JSON} lacks an architecture, tied, attributes or weights entry: save again")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in record["tied"].items()):
        raise CstarError(f"{path / MODEL_JSON}: the tied entry must map tensor names to tensor names: save again")
    if not isinstance(record["weights"].get("sha256"), str):
        raise CstarError(f"{path / MODEL_JSON} records no SHA-256 of its weights: save the model again")
    _check_attributes(record["attributes"], path / MODEL_JSON)
    return record


def _check_attributes(attributes: dict, source: Path) -> None:
    """The ``cstar_*`` attributes that cstar reads back (config, what it was trained on, factorised layers) have the
    shapes it wrote."""
    config = attributes.get("cstar_config")
    if config is not None and not (isinstance(config, dict) and isinstance(config.get("name"), str)):
        raise CstarError(f"{source}: the cstar_config attribute is {short(config)}, not a model description: the file "
                         "is corrupt or crafted; save the model again")
    trained_on = attributes.get("cstar_trained_on", {})
    if not isinstance(trained_on, dict):
        raise CstarError(f"{source}: the cstar_trained_on attribute is {short(trained_on)}, not a mapping of dataset "
                         "and eps: the file is corrupt or crafted; save the model again")
    lowrank = attributes.get("cstar_lowrank", {})
    if not isinstance(lowrank, dict) or not all(
            isinstance(layer, dict) and isinstance(layer.get("kind"), str) and isinstance(layer.get("ranks"), list)
            and all(isinstance(r, int) and not isinstance(r, bool) for r in layer["ranks"]) for layer in lowrank.values()):
        raise CstarError(f"{source}: the cstar_lowrank attribute is not a mapping of layer -> kind and ranks: the "
                         "file is corrupt or crafted; save the model again")


def _factory_config(record: dict) -> dict | None:
    """The ``cstar_config`` of a saved model that a factory built and that :func:`load` needs ``model=`` for
    (its classes are not cstar's), else None."""
    config = record["attributes"].get("cstar_config") or {}
    replay = record["architecture"].get("kind") == "replay"
    return config if replay and is_external(config.get("name")) else None


def _read_weights(path: Path, record: dict) -> dict[str, torch.Tensor]:
    """The tensors of save ``path``, read only once their file matches the checksum in ``model.json``."""
    weights_path = path / WEIGHTS
    try:
        data = weights_path.read_bytes()
    except OSError as exc:
        raise CstarError(f"cannot read {weights_path} ({exc.strerror}): the save is incomplete; save again") from None
    if hashlib.sha256(data).hexdigest() != record["weights"]["sha256"]:
        raise CstarError(
            f"{weights_path} does not match the checksum in {MODEL_JSON}: it is corrupt, truncated or from another "
            "save; save the model again"
        )
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error type for malformed files
        raise CstarError(f"{weights_path} is not a valid safetensors file ({short(str(exc), 100)}); "
                         "save the model again") from None


def _shape_problem(record: dict, source: Path, fresh: nn.Module | None, shapes: dict[str, torch.Size]) -> str | None:
    """What differs between the weights' ``shapes`` and the recorded architecture, found on a copy built on
    the meta device: a crafted description costs no memory before it is refused."""
    meta_fresh = None if fresh is None else copy.deepcopy(fresh).to("meta")
    with torch.device("meta"):
        skeleton = rebuild(record["architecture"], source, meta_fresh)
    _retie(skeleton, record["tied"], source)
    return state_mismatch(skeleton, shapes, record["tied"])


def factory_config(path: str | os.PathLike) -> dict | None:
    """How the model in save ``path`` was built (its ``cstar_config``) when a factory built it and
    :func:`load` needs a fresh instance, ``cstar.models.create(**config)``; None otherwise. Reads
    ``model.json`` only: nothing is imported."""
    return _factory_config(_read_record(Path(path)))


def is_unbuilt_class(path: str | os.PathLike) -> bool:
    """Whether save ``path`` holds a model of a class cstar cannot build and records no factory for (a user's
    own network saved as it is): only a fresh instance of that class, ``load(path, model=...)``, reads it.
    Reads ``model.json`` once; nothing is imported."""
    record = _read_record(Path(path))
    return record["architecture"].get("kind") == "replay" and _factory_config(record) is None


def model_of_checkpoint(state: dict, source: str | os.PathLike, *, named: str | None = None,
                        model: nn.Module | None = None) -> nn.Module:
    """The model of a checkpoint ``cstar train`` wrote (``model.pt``, ``{"model": state dict, "model_config": ...}``;
    it now writes a save directory, ``model``).

    Its description is checked first (:func:`cstar.models._recorded.recorded_config`): a registered model is
    built from it, a factory's only when the user ``named`` that factory or passes ``model``, a fresh instance;
    then every tensor's name, shape and value is checked, on a weightless (meta-device) copy where there is
    one, before any weight is copied. Raises :class:`CstarError` otherwise.
    """
    if state.get("model_config") is None:
        raise CstarError(f"{source} has no model description (model_config): it was not written by 'cstar train'")
    recorded = state["model_config"]
    given = recorded.get("name") if model is not None and isinstance(recorded, dict) else named
    config = recorded_config(recorded, source, named=given)
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in weights.items()):
        raise CstarError(f"{source}: its 'model' entry is not a mapping of tensor names to tensors: the file is "
                         "corrupt or edited; pass the checkpoint that 'cstar train' wrote")
    shapes = {k: v.shape for k, v in weights.items()}
    if model is None and config["name"] in list_models():  # checked weightless, before any memory is taken
        problem = state_mismatch(skeleton(config, source), shapes)
        if problem:
            raise CstarError(f"{source} does not match its architecture '{config['name']}' ({problem}): the file "
                             "is corrupt or edited; pass the checkpoint that 'cstar train' wrote")
    check_finite(weights, source)
    model = create(**config) if model is None else model
    problem = state_mismatch(model, shapes)
    if problem:
        raise CstarError(f"{source} does not fit the model of '{config['name']}' ({problem}): pass the checkpoint "
                         "written for it, or build the model as it was trained")
    model.load_state_dict(weights)
    return model


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
         model: nn.Module | None = None) -> nn.Module:
    """Rebuild a model saved by :func:`save`, in eval mode on ``map_location`` (default "cpu").

    A built-in model or one of standard layers rebuilds from the save alone
    (``model`` is not needed and not used). A model of another class needs
    ``model``: a freshly built instance of the saved class, built as the saved
    one was (e.g. ``torchvision.models.resnet50(num_classes=10)``); the
    recorded layers replace its own (factorised layers, pruned channels), then
    the weights are loaded into it and it is returned. ``path`` may also be the
    checkpoint ``model.pt`` that ``cstar train`` wrote before it wrote a save
    (``model``): its recorded model is built (a factory's only into ``model``). Only JSON, safetensors and
    ``weights_only`` checkpoints are read. Raises :class:`CstarError` for a path that is not a
    cstar save, an unknown format version or class, a missing or different
    ``model``, or weights that are corrupt, truncated or do not match the architecture.
    """
    path = Path(path)
    if path.is_file():  # the model.pt of an older 'cstar train': tensors and plain values only
        state = load_checkpoint(path, map_location="cpu")
        return model_of_checkpoint(state, path, model=model).to(map_location).eval()
    record = _read_record(path)
    source = path / MODEL_JSON
    tied = record["tied"]
    factory = _factory_config(record)
    if model is None and factory is not None:
        built_by = factory["name"]
        raise CstarError(f"{path} holds a model of the factory {built_by!r}, whose code a save does not hold: pass "
                         f"model=cstar.models.create({built_by!r}, ...) built as the saved one was (its cstar_config "
                         f"attribute says how), or on the command line --model {built_by}")
    tensors = _read_weights(path, record)
    problem = _shape_problem(record, source, model, {k: v.shape for k, v in tensors.items()})
    weights_path = path / WEIGHTS
    if problem and record["architecture"].get("kind") == "replay":
        raise CstarError(f"{weights_path} does not fit model= with the saved layers in place ({problem}): pass an "
                         "instance built with the same arguments as the saved one")
    if problem:
        raise CstarError(f"{weights_path} does not fit the architecture in {MODEL_JSON} ({problem}); save again")
    check_finite(tensors, weights_path)
    model = rebuild(record["architecture"], source, model)
    _retie(model, tied, source)
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floating) == 1:
        model.to(floating.pop())
    state = {**tensors, **{alias: tensors[origin] for alias, origin in tied.items()}}
    model.load_state_dict(state)
    for key, value in record["attributes"].items():
        if key.startswith("cstar_"):
            setattr(model, key, value)
    return model.to(map_location).eval()
