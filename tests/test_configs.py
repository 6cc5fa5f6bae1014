"""The presets in configs/: every key is an option of its command and every section a valid setting."""

import json
from pathlib import Path

import pytest
import yaml
from digits_runs import DATA, ROOT, refused, run

from cstar.cli import parse_args
from cstar.pipeline.admm import ADMMConfig
from cstar.training.fit import TrainConfig

PRESETS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_and_its_sections_are_valid(path):
    command = "compare" if path.stem.startswith("compare") else "compress"
    args = parse_args([command, "--config", str(path)])
    assert args.data and args.model
    for section in ("dense", "search", "finetune"):
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


def test_a_section_flag_beside_a_preset_changes_only_the_keys_it_names():
    preset_path = ROOT / "configs" / "mnist_small_cnn_cpu.yaml"
    args = parse_args(["compress", "--config", str(preset_path), "--search", "{epochs: 1}"])
    preset = yaml.safe_load(preset_path.read_text())["search"]
    assert args.search == {**preset, "epochs": 1}  # was {epochs: 1}: PGD-10 with SGD at lr 0.1 silently


def test_compress_on_mnist_without_settings_starts_from_the_measured_mnist_preset():
    args = parse_args(["compress", "--data", "mnist"])
    preset = yaml.safe_load((ROOT / "cstar" / "presets" / "mnist_small_cnn_cpu.yaml").read_text())
    assert args.defaults_preset == "mnist_small_cnn_cpu"
    for key in ("dense", "search", "admm", "finetune"):
        assert getattr(args, key) == preset[key], key  # was: PGD-10 with SGD at lr 0.1, which diverged here
    assert args.eval_attacks == "clean,pgd40" and args.eval_step == {"pgd40": 0.01}  # MNIST's threat model (METHOD.md)


def test_options_given_layer_over_the_dataset_preset_key_by_key():
    args = parse_args(["compress", "--data", "fashion_mnist", "--finetune", "{epochs: 3}", "--eval-attacks", "clean"])
    preset = yaml.safe_load((ROOT / "cstar" / "presets" / "fmnist_small_cnn_cpu.yaml").read_text())
    assert args.finetune == {**preset["finetune"], "epochs": 3}
    assert args.eval_attacks == "clean"


def test_on_a_gpu_the_cifar10_default_is_the_papers_setting():
    args = parse_args(["compress", "--data", "cifar10", "--device", "cuda"])
    assert args.defaults_preset == "cifar10_resnet18_paper" and args.search["epochs"] == 50
    assert parse_args(["compare", "--data", "cifar10", "--device", "cpu"]).defaults_preset == "compare_cifar10_cpu"


def test_no_preset_applies_to_a_dataset_none_was_measured_on():
    args = parse_args(["compress", "--data", "digits"])
    assert args.defaults_preset is None and args.search is None


def test_a_preset_is_found_by_name(capsys):
    args = parse_args(["compare", "--config", "compare_mnist_cpu"])
    assert args.data == "mnist" and args.search["epochs"] >= 1
    line = refused(capsys, "compare", "--config", "no_such_preset")
    assert "no_such_preset" in line and "compare_mnist_cpu" in line


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_the_dataset_preset_used_is_printed_and_recorded(capsys, tmp_path):
    out = tmp_path / "run"
    code, printed, err = run(capsys, "compress", "--model", "small_cnn", "--data", "mnist", "--root", DATA,
                             "--train-n", "300", "--val-size", "100", "--eval-n", "50", "--eval-attacks", "clean",
                             "--dense", "{epochs: 1}", "--search", "{epochs: 1}", "--finetune", "{epochs: 1}",
                             "--no-progress", "--out", out)
    assert code == 0, err
    assert "the mnist preset for CPU 'mnist_small_cnn_cpu'" in printed
    assert json.loads((out / "env.json").read_text())["defaults_preset"] == "mnist_small_cnn_cpu"
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["search"]["optimizer"] == "adam" and recorded["search"]["epochs"] == 1


@pytest.mark.parametrize("config, named", [(None, False), ("compare_mnist_cpu", False),
                                           ("configs/compare_mnist_4x_budget.yaml", True)])
def test_the_printed_preset_names_a_config_laid_over_it(capsys, config, named):
    import argparse

    import torch

    from cstar.cli import _runs

    args = argparse.Namespace(data="mnist", defaults_preset="compare_mnist_cpu", config=config)
    _runs.print_defaults(args, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert "the mnist preset for CPU 'compare_mnist_cpu'" in printed
    assert ("--config configs/compare_mnist_4x_budget.yaml" in printed) == named
    assert printed.rstrip().endswith("the options given")
