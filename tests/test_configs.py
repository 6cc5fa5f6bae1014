"""The presets in configs/: every key is an option of its command and every section a valid setting."""

from pathlib import Path

import pytest
import yaml

from cstar.pipeline.admm import ADMMConfig
from cstar.cli import parse_args
from cstar.training.fit import TrainConfig

PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_and_its_sections_are_valid(path):
    command = "compare" if path.stem.startswith("compare") else "compress"
    args = parse_args([command, "--config", str(path)])
    assert args.data and args.model
    for section in ("dense", "admm_train", "search", "finetune"):
        values = getattr(args, section, None)
        if values:
            TrainConfig.from_dict(dict(values))
    if args.admm:
        ADMMConfig.from_dict(args.admm)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "each preset starts with a comment saying what it is for"
    assert "Usage:" in path.read_text()


def test_there_are_cpu_presets_for_mnist_fashion_mnist_and_cifar10():
    names = {p.stem for p in PRESETS}
    assert {"mnist_small_cnn_cpu", "fmnist_small_cnn_cpu", "cifar10_resnet18w16_cpu"} <= names
    for p in PRESETS:
        yaml.safe_load(p.read_text())
