"""Presets: named YAML settings shipped with cstar, in ``cstar/presets/`` (``configs/`` in a clone).

``--config NAME`` reads ``cstar/presets/NAME.yaml`` when NAME is not a file.
:func:`dataset_defaults` gives the settings that ``cstar compress`` and
``cstar compare`` start from for a dataset and a kind of device: the training
sections, training attack and evaluation attacks of the measured CPU preset on
a CPU, and of the paper's setting on a GPU where the paper has one. Anything in
``--config`` or on the command line is layered over them, section key by key.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .._core.errors import CstarError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"  # cstar/presets/, shipped as package data
SECTIONS = ("dense", "search", "admm", "finetune")
_TAKEN = SECTIONS + ("attack", "eval_attacks", "eval_step")  # what a dataset default supplies

# (command, dataset) -> (preset on a CPU, preset on a GPU)
_BY_DATASET = {
    ("compress", "mnist"): ("mnist_small_cnn_cpu", "mnist_small_cnn_cpu"),
    ("compress", "fashion_mnist"): ("fmnist_small_cnn_cpu", "fmnist_small_cnn_cpu"),
    ("compress", "cifar10"): ("cifar10_resnet18w16_cpu", "cifar10_resnet18_paper"),
    ("compress", "cifar100"): ("cifar10_resnet18w16_cpu", "cifar10_resnet18_paper"),
    ("compress", "svhn"): ("cifar10_resnet18w16_cpu", "cifar10_resnet18_paper"),
    ("compress", "imagefolder"): (None, "imagenet_resnet18_paper"),
    ("compare", "mnist"): ("compare_mnist_cpu", "compare_mnist_cpu"),
    ("compare", "fashion_mnist"): ("compare_fmnist_cpu", "compare_fmnist_cpu"),
    ("compare", "cifar10"): ("compare_cifar10_cpu", "compare_cifar10_cpu"),
    ("compare", "cifar100"): ("compare_cifar10_cpu", "compare_cifar10_cpu"),
    ("compare", "svhn"): ("compare_cifar10_cpu", "compare_cifar10_cpu"),
}


def names() -> list[str]:
    """The shipped presets' names."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve(path_or_name: str) -> Path:
    """``path_or_name`` as a file: an existing path, or the shipped preset of that name."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir():
        raise CstarError(f"config file {path} is a directory: pass the path of a YAML or JSON file in it, or a "
                         "preset name")
    preset = PRESET_DIR / f"{path_or_name}.yaml"
    if preset.is_file():
        return preset
    raise CstarError(f"config file {path} does not exist: pass the path of a YAML or JSON file, or a preset name "
                     f"({', '.join(names())})")


def read(name: str) -> dict:
    """The option values of the shipped preset ``name``."""
    return yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text(encoding="utf-8")) or {}


def dataset_defaults(command: str, dataset: str | None, device_type: str) -> tuple[str | None, dict]:
    """(preset name, the values it supplies) for ``command`` on ``dataset`` on a ``device_type`` ("cpu" or
    "cuda"); (None, {}) where no preset applies (built-in defaults then)."""
    key = (dataset or "").lower().replace("-", "_")
    pair = _BY_DATASET.get((command, key))
    name = pair[device_type == "cuda"] if pair else None
    if name is None:
        return None, {}
    values = read(name)
    return name, {k: v for k, v in values.items() if k in _TAKEN}
