"""Evaluation has its own radius, ``eval_eps`` (default: the training eps): every evaluation of a compression or
a comparison attacks at it, and the results and reports say so."""

import json

import pytest
import torch
from digits_runs import refused
from helpers import tiny_compress
from torch import nn

from cstar import CompareConfig, CompressConfig, TrainConfig, attacks, compare, data, evaluate, load
from cstar._core.errors import CstarError
from cstar.cli import parse_args
from cstar.pipeline.phases import with_data_eps


def test_an_attack_at_eps_0_returns_its_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    for name in ("pgd3", "fgsm", "nfgsm"):
        assert torch.equal(attacks.parse_attack(name, 0.0)(model, x, y), x), name


@pytest.mark.parametrize("kind, keys", [(CompressConfig, ("dense", "search", "finetune")),
                                        (CompareConfig, ("dense", "search", "finetune"))])
def test_eval_eps_defaults_to_the_training_eps_and_a_given_one_is_kept(kind, keys):
    spec = data.DATASETS["fashion_mnist"]
    assert with_data_eps(kind(), spec, keys).eval_eps == pytest.approx(0.1)  # the data's, as training's
    trained_at = kind(finetune=TrainConfig(eps=0.05))
    assert with_data_eps(trained_at, spec, keys).eval_eps == 0.05
    assert with_data_eps(kind(eval_eps=0.02), spec, keys).eval_eps == 0.02


def test_a_bad_eval_eps_is_refused_naming_it():
    with pytest.raises(CstarError, match=r"eval_eps.*0 <= eps <= 1"):
        CompressConfig(eval_eps=2)
    with pytest.raises(CstarError, match="eval_eps"):
        CompareConfig(eval_eps=float("nan"))


@pytest.mark.parametrize("command", ["compress", "compare"])
def test_the_eval_eps_flag_reads_a_fraction(command):
    args = parse_args([command, "--model", "small_cnn", "--data", "digits", "--eval-eps", "8/255"])
    assert args.eval_eps == pytest.approx(8 / 255)


def test_eval_eps_in_a_config_file_reads_a_fraction(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("eval_eps: 4/255\n")
    args = parse_args(["compress", "--model", "small_cnn", "--data", "digits", "--config", str(cfg)])
    assert args.eval_eps == pytest.approx(4 / 255)


def test_an_eval_eps_outside_the_unit_interval_is_refused_before_any_work(capsys, tmp_path):
    line = refused(capsys, "compress", "--model", "small_cnn", "--data", "digits", "--eval-eps", "2",
                   "--out", tmp_path / "run")
    assert "--eval-eps" in line and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def evaluated_at_0(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    return out, tiny_compress(out, eval_eps=0.0)


def test_compress_evaluates_at_eval_eps_and_records_it(evaluated_at_0):
    out, results = evaluated_at_0
    assert results["attacks"]["pgd3"]["eps"] == 0.0
    assert results["accuracy"]["final"]["pgd3"] == results["accuracy"]["final"]["clean"]  # nothing to attack in
    assert results["threat_model"]["eps"] == 0.0 and results["threat_model"]["train_eps"] == pytest.approx(0.2)
    assert results["config"]["eval_eps"] == 0.0 and results["config"]["finetune"]["eps"] == pytest.approx(0.2)
    assert "L-inf eps 0 (trained at eps 0.2)" in (out / "report.md").read_text()


def test_at_the_training_eps_the_same_model_is_attacked(evaluated_at_0):
    out, results = evaluated_at_0
    model = load(out / "model")
    test_set = data.load("digits", split="test").take(64)
    at_training_eps = evaluate(model, test_set, ["clean", "pgd3"], eps=0.2)["accuracy"]
    assert at_training_eps["clean"] == results["accuracy"]["final"]["clean"]
    assert at_training_eps["pgd3"] < at_training_eps["clean"]  # so equal figures at eps 0 are eval_eps's doing


def _dense_only(eval_eps=None):
    return CompareConfig(methods=["dense"], ratios=[2], eval_attacks=["clean", "pgd3"], eval_eps=eval_eps, eval_n=64,
                         latency_runs=0)


@pytest.fixture(scope="module")
def dense_model():
    spec = data.DATASETS["digits"]
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), spec


def test_compare_evaluates_at_eval_eps_and_says_so(dense_model, tmp_path):
    model, _ = dense_model
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    results = compare(model, train_set, test_set, _dense_only(0.0), tmp_path / "run", val_size=50)
    cell = results["cells"]["dense"]
    assert results["eps"] == 0.0 and results["train_eps"] == pytest.approx(0.2)
    assert cell["accuracy"]["pgd3"] == cell["accuracy"]["clean"] and cell["attacks"]["pgd3"]["eps"] == 0.0
    assert "L-inf eps 0 (trained at eps 0.2)" in (tmp_path / "run" / "comparison.md").read_text()


def test_a_comparison_resumed_with_another_eval_eps_evaluates_its_cells_again(dense_model, tmp_path, capsys):
    model, _ = dense_model
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    compare(model, train_set, test_set, _dense_only(), tmp_path / "run", val_size=50)
    path = tmp_path / "run" / "cells" / "dense" / "result.json"
    row = json.loads(path.read_text())
    del row["evaluation"]["eps"]  # a cell evaluated before eval_eps: at the training eps
    path.write_text(json.dumps(row))
    capsys.readouterr()
    compare(model, train_set, test_set, _dense_only(0.2), tmp_path / "run", val_size=50)
    assert "dense: done earlier\n" in capsys.readouterr().out  # the same radius: nothing to redo
    again = compare(model, train_set, test_set, _dense_only(0.0), tmp_path / "run", val_size=50)["cells"]["dense"]
    assert "evaluating its attacks" in capsys.readouterr().out
    assert again["attacks"]["pgd3"]["eps"] == 0.0 and again["evaluation"]["eps"] == 0.0
