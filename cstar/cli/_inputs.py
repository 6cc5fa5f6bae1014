"""What a command starts from: datasets, models and checkpoints, each checked before any work is done."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml

from .. import data, models
from .._core.errors import CstarError
from ..files.serialize import is_unbuilt_class, model_of_checkpoint
from ..files.weights import load_weights, read_weights_file
from ..pipeline.phases import split_held_out
from .._core.checks import check_radius
from ..models._external import is_external
from ..models._recorded import recorded_config, short
from ._options import model_kwargs, require
from ._parser import parse_normalize

# ----------------------------------------------------------------------------- data


def first_n(train_set, n: int | None):
    """The first ``n`` training images (--train-n), or all of them."""
    if n is None:
        return train_set
    if not hasattr(train_set, "take"):
        raise CstarError("--train-n needs an in-memory dataset (not an image folder): drop it")
    if not 0 < n <= len(train_set):
        raise CstarError(f"--train-n {n} must be between 1 and {len(train_set)}")
    return train_set.take(n)


def train_and_test(args: argparse.Namespace):
    """(training set cut to --train-n, test set, eps: --eps or the dataset's threat model)."""
    require(args, "data")
    train_set = first_n(data.load(args.data, args.root, split="train", download=args.download), args.train_n)
    test_set = data.load(args.data, args.root, split="test", download=args.download)
    eps = train_set.spec.eps if args.eps is None else args.eps
    return train_set, test_set, eps


def validation(train_set, test_set, val_size: int, check_size: int, where: torch.device):
    """Split the training set into (training part, validation tensors) for ``cstar train``'s per-epoch check
    (:func:`cstar.pipeline.phases.split_held_out`: a folder dataset's check takes ``check_size`` images of its
    validation folder)."""
    if val_size <= 0 or check_size <= 0:
        return train_set, None
    return split_held_out(train_set, check_size if isinstance(train_set, data.FolderData) else val_size, where,
                          test_set)


# ----------------------------------------------------------------------------- models


def normalization(args: argparse.Namespace, spec: data.DatasetSpec, *, trained_elsewhere: bool = False
                  ) -> tuple[list[float], list[float], str]:
    """(mean, std, what was chosen) of ``--normalize``: ``data`` (the dataset's mean and std), ``none`` (inputs
    stay in [0, 1]) or ``MEAN,STD`` (one pair for every channel, or C means then C stds). Default: ``data`` for
    a model cstar builds and trains, ``none`` for weights trained elsewhere (their normalisation, if any, is
    inside their model)."""
    c = spec.image_shape[0]
    text = getattr(args, "normalize", None) or ("none" if trained_elsewhere else "data")
    if text == "data":
        return list(spec.mean), list(spec.std), f"data ({spec.name} mean {_floats(spec.mean)}, std {_floats(spec.std)})"
    if text == "none":
        return [0.0] * c, [1.0] * c, "none (inputs in [0, 1])"
    values = parse_normalize(text)  # checked when the options were read: numbers, positive stds
    if len(values) == 2:
        values = [values[0]] * c + [values[1]] * c
    if len(values) != 2 * c:
        raise CstarError(f"--normalize {text!r} gives {len(values) // 2} channels, {spec.name} has {c}: write "
                         f"MEAN,STD or {c} means then {c} stds")
    return values[:c], values[c:], f"mean {_floats(values[:c])}, std {_floats(values[c:])}"


def _floats(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def build_model(args: argparse.Namespace, spec: data.DatasetSpec, num_classes: int, *,
                trained_elsewhere: bool = False) -> torch.nn.Module:
    """A fresh ``--model`` (with ``--width`` and ``--model-arg``) for ``spec``'s images, normalised as
    :func:`normalization` says (``mean``/``std`` in --model-arg win); ``model.cstar_normalize`` says which."""
    kwargs = model_kwargs(getattr(args, "model_arg", None))
    if getattr(args, "width", None) is not None:
        kwargs["width"] = args.width
    c, h, _ = spec.image_shape
    mean, std, chosen = normalization(args, spec, trained_elsewhere=trained_elsewhere)
    if "mean" in kwargs or "std" in kwargs:
        chosen = "--model-arg mean/std"
    mean, std = kwargs.pop("mean", mean), kwargs.pop("std", std)
    for key, value in (("num_classes", num_classes), ("in_channels", c)):
        given = kwargs.pop(key, value)
        if given != value:
            what = "classes" if key == "num_classes" else "input channels"
            raise CstarError(f"--model-arg {key}={given} contradicts the {value} {what} of {spec.name}: drop it "
                             "(cstar passes the data's)")
    model = models.create(args.model, num_classes, in_channels=c, input_size=h, mean=mean, std=std, **kwargs)
    model.cstar_normalize = chosen
    return model


def model_and_state(args: argparse.Namespace, path: str, where: torch.device, spec: data.DatasetSpec | None = None,
                    num_classes: int | None = None) -> tuple[torch.nn.Module, dict | None]:
    """(model, what it records of its training) of ``path``: a cstar.save directory (the ``model`` of ``cstar
    train`` or ``compress``), the ``model.pt`` an older ``cstar train`` wrote (or a training ``checkpoint.pt``),
    or, with ``--model FACTORY``, weights trained elsewhere (any file :func:`cstar.load_weights` reads) or a save
    of the user's own class, loaded into a fresh ``--model`` for ``spec``'s images (``--data``). The record is
    ``{"dataset", "eps"}`` as far as recorded (a save's ``cstar_trained_on`` attribute, a model.pt's entries;
    ``{}`` when none), None for weights trained elsewhere."""
    if Path(path).is_dir():
        if is_external(args.model) and is_unbuilt_class(path):  # the user's own network, saved as it is
            return own_model(args, path, where, spec, num_classes), None
        _no_normalize(args, path)
        model = load_save(path, where, args.model)
        return model, dict(getattr(model, "cstar_trained_on", {}))  # a mapping: checked by load
    state = read_weights_file(path)
    if isinstance(state, dict) and "model_config" in state and "model" in state:  # an older model.pt, a checkpoint.pt
        _no_normalize(args, path)
        model = model_of_checkpoint(state, path, named=args.model).to(where)
        return model, {key: state[key] for key in ("dataset", "eps") if key in state}
    if not args.model:
        raise CstarError(f"{path} holds weights without cstar's model description: name the model they belong to "
                         "with --model package.module:factory (and --data for its images)")
    return own_model(args, path, where, spec, num_classes), None


def _no_normalize(args: argparse.Namespace, path: str) -> None:
    """Refuse --normalize for a model cstar saved: its normalising front is part of it, trained with it."""
    if getattr(args, "normalize", None) is not None:
        raise CstarError(f"--normalize {args.normalize} would change {path}, a model cstar saved with its own "
                         "normalisation (trained with it): drop --normalize (it applies to a model built here with "
                         "--model, or to weights trained elsewhere)")


def own_model(args: argparse.Namespace, path: str, where: torch.device, spec: data.DatasetSpec | None,
              num_classes: int | None) -> torch.nn.Module:
    """A fresh ``--model`` for ``spec``'s images with the weights of ``path`` (a file, or a save of the user's own
    class); says which normalisation it chose."""
    if spec is None:
        raise CstarError(f"{path} holds a model of your own: pass --data, the dataset whose images it takes, so "
                         f"that --model {args.model} is built for them")
    model = build_model(args, spec, num_classes or spec.num_classes, trained_elsewhere=True)
    if getattr(args, "normalize", None) is None:
        args.normalize = "none"  # what was chosen, so that the run's config.yaml records it
    if Path(path).is_dir():
        from ..files.serialize import load

        load(path, model=model.net)
    else:
        load_weights(model, path)  # both readers refuse NaN/Inf weights before copying any
    print(f"note: {path} loaded into --model {args.model}; normalisation: {model.cstar_normalize} "
          "(--normalize data|none|MEAN,STD to choose)", flush=True)
    return model.to(where)


def load_save(path: str, where: torch.device, named: str | None = None) -> torch.nn.Module:
    """The model of a cstar.save directory; one of a factory (recorded in its ``cstar_config``) is rebuilt
    fresh, then loaded, only when the user ``named`` that factory (--model)."""
    from ..files.serialize import factory_config, load

    config = factory_config(path)
    if config is None:
        return load(path, map_location=where)
    config = recorded_config(config, Path(path) / "model.json", named=named)
    return load(path, map_location=where, model=models.create(**config))


def _model_and_dataset(args: argparse.Namespace, where: torch.device, spec: data.DatasetSpec, num_classes: int
                       ) -> tuple[torch.nn.Module, str | None]:
    """(the model of --checkpoint, the dataset it records or its run's record names, if any)."""
    model, state = model_and_state(args, args.checkpoint, where, spec, num_classes)
    return model, trained_on(args.checkpoint, state)[0]


def trained_on(path: str, state: dict | None) -> tuple[str | None, str | None]:
    """(dataset, data root) that a model of cstar (its training record ``state``, see :func:`model_and_state`) or
    the run beside it (its config.yaml) records, each checked to be a plain name or path; (None, None) for weights
    trained elsewhere (``state`` None), whose folder's files are not cstar's to read."""
    if state is None:
        return None, None
    run = run_config_beside(path)
    root = run.get("root")
    if root is not None and not isinstance(root, str):
        raise CstarError(f"{Path(path).parent / 'config.yaml'} records the data root {short(root)}, not a path: "
                         "the file is corrupt or crafted; pass --root")
    return recorded_dataset(state.get("dataset") or run.get("data"), path), root


def run_config_beside(path: str) -> dict:
    """The config.yaml of the run a checkpoint belongs to, if there is one."""
    cfg = Path(path).parent / "config.yaml"
    if not cfg.is_file():
        return {}
    try:
        record = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CstarError(f"{cfg}, the record of the run {path} belongs to, is not valid YAML ({short(str(exc), 80)}): "
                         "restore it, or move the checkpoint out of that directory") from None
    if not isinstance(record, dict):
        raise CstarError(f"{cfg}, the record of the run {path} belongs to, is not a mapping of options: restore it, "
                         "or move the checkpoint out of that directory")
    return record


def recorded_dataset(name, source: str) -> str | None:
    """The dataset name a checkpoint or its run records, checked to be a plain name (None: none recorded)."""
    if name is not None and not (isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum()):
        raise CstarError(f"{source} records the dataset {short(name)}, not a dataset name: the file is corrupt or "
                         "crafted; pass --data")
    return name


def recorded_eps(eps, source: str) -> float:
    """The eps a checkpoint records, checked as --eps is (:func:`cstar._core.checks.check_radius`)."""
    try:
        return check_radius("eps", eps)
    except CstarError as exc:
        raise CstarError(f"{source} records a radius that is not one ({exc}); the file is corrupt or crafted: "
                         "pass --eps") from None


def input_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of one input image, from the model's ``cstar_config``."""
    shape = models.input_shape(model)
    if shape is None:
        raise CstarError("the model has no cstar_config, so its input shape is unknown: use a built-in model")
    return shape


def model_for_reading(args: argparse.Namespace) -> torch.nn.Module:
    """The model of ``args.checkpoint`` for decompose and export (no dataset read: ``--data`` only says which
    images a model of the user's own class takes)."""
    spec = dataset_spec(args.data)
    model = model_and_state(args, args.checkpoint, torch.device("cpu"), spec, spec and spec.num_classes)[0]
    check_model_options(args, model)
    return model


def dataset_spec(name: str | None) -> data.DatasetSpec | None:
    """The :class:`cstar.data.DatasetSpec` of dataset ``name`` (None for None), without reading any image."""
    if name is None:
        return None
    key = name.lower().replace("-", "_")
    if key not in data.DATASETS:
        raise CstarError(f"unknown dataset '{name}': choose one of {', '.join(sorted(data.DATASETS))}")
    return data.DATASETS[key]


def model_for_planning(args: argparse.Namespace) -> torch.nn.Module:
    """The checkpoint's model, or a randomly initialised ``--model`` for ``--data`` (default cifar10)."""
    spec = dataset_spec(getattr(args, "data", None) or "cifar10")
    num_classes = getattr(args, "num_classes", None) or spec.num_classes
    if args.checkpoint:
        model = model_and_state(args, args.checkpoint, torch.device("cpu"),
                                dataset_spec(getattr(args, "data", None)), num_classes)[0]
        check_model_options(args, model)
        return model
    if not args.model:
        raise CstarError("give a checkpoint or --model NAME")
    return build_model(args, spec, num_classes)


def check_fits_data(model: torch.nn.Module, source: str, name: str, spec: data.DatasetSpec, num_classes: int) -> None:
    """One line when ``model`` (from ``source``) cannot take ``name``'s images or predict its classes."""
    cfg = getattr(model, "cstar_config", None) or {}
    if cfg.get("num_classes") not in (None, num_classes):
        raise CstarError(f"{source} predicts {cfg['num_classes']} classes but {name} has {num_classes}: "
                         "pass the dataset it was trained on")
    c, h, w = spec.image_shape
    wants = (cfg.get("in_channels"), cfg.get("input_size"))
    if None not in wants and (wants[0] != c or (wants[1] != h and name != "imagefolder")):
        raise CstarError(f"{source} takes {wants[0]}x{wants[1]}x{wants[1]} images but {name} has {c}x{h}x{w}: "
                         f"pass the dataset it was trained on, or a model built for {name}")


def check_model_options(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """--model / --width given beside a checkpoint must describe the checkpoint's architecture."""
    cfg = getattr(model, "cstar_config", None) or {}
    if args.model and cfg.get("name") and args.model != cfg["name"]:
        raise CstarError(f"--model {args.model} contradicts {args.checkpoint}, a {cfg['name']}: drop --model "
                         "(the checkpoint says its architecture)")
    if getattr(args, "width", None) is not None and cfg.get("width") not in (None, args.width):
        raise CstarError(f"--width {args.width} contradicts {args.checkpoint}, of width {cfg['width']}: drop --width")


def starting_model(args: argparse.Namespace, train_set, where: torch.device) -> torch.nn.Module:
    """The dense model of --checkpoint, or a fresh --model (seeded with --seed) to be trained first."""
    if args.checkpoint:
        model, trained_on = _model_and_dataset(args, where, train_set.spec, train_set.num_classes)
        check_model_options(args, model)
        check_fits_data(model, args.checkpoint, args.data, train_set.spec, train_set.num_classes)
        if trained_on is not None and trained_on.lower().replace("-", "_") != train_set.spec.name:
            print(f"note: {args.checkpoint} was trained on {trained_on}; {args.command} goes on with "
                  f"{train_set.spec.name} (at eps {train_set.spec.eps:g} unless --eps)", flush=True)
        return model
    require(args, "model")
    torch.manual_seed(args.seed)  # the initial weights
    return build_model(args, train_set.spec, train_set.num_classes).to(where)
