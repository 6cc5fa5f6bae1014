"""An attack's settings cannot overstate robustness: each attack's step is its own, every report states it, a step
too short to cross the eps-ball is warned about, and a resumed evaluation continues only the same model's counts."""

import json
import warnings

import pytest
import torch

import cstar
from cstar import data, models
from cstar.pipeline.compare import CompareConfig, _evaluate_attacks
from cstar.pipeline.compare_report import format_comparison
from cstar._core.errors import CstarError
from cstar.evaluation.evaluate import attack_specs, evaluate
from cstar.attacks import parse_attack
from cstar.cli import main, parse_args
from cstar.cli._options import names
from cstar.pipeline.report import write_report
from cstar.lowrank import RankSpec, select_ranks

EPS = 0.2  # the digits threat model


def tiny_cnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.create("small_cnn", 10, in_channels=1, input_size=8).eval()


@pytest.fixture(scope="module")
def test_set():
    return data.load("digits", split="test")


def steps_of(attack_names: list[str], eps: float, step) -> dict[str, float]:
    return {spec.label: spec.step_size for spec in attack_specs(attack_names, eps, step=step) if spec != "clean"}


# --- whose step is it ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["compress", "--data", "mnist", "--eval-attacks", "clean,pgd5"],  # the dataset's preset under the flag
    ["compress", "--config", "mnist_small_cnn_cpu", "--eval-attacks", "clean,pgd5"],
    ["compare", "--config", "compare_mnist_cpu", "--eval-attacks", "clean,pgd5"],
], ids=["dataset-default", "compress-preset", "compare-preset"])
def test_a_presets_step_for_pgd40_does_not_reach_pgd5(argv):
    args = parse_args(argv)
    steps = steps_of(names(args.eval_attacks), 0.3, args.eval_step)
    assert steps["pgd5"] == pytest.approx(0.15)  # 2.5 * eps / 5: five steps cross the 0.3 ball (was 0.01 x 5)


def test_the_presets_step_still_applies_to_the_attack_it_names():
    args = parse_args(["compress", "--data", "mnist", "--eval-attacks", "clean,pgd40,pgd5"])
    assert steps_of(names(args.eval_attacks), 0.3, args.eval_step) == pytest.approx({"pgd40": 0.01, "pgd5": 0.15})


def test_a_step_the_user_gives_applies_to_every_pgd_attack_or_to_those_named():
    one = parse_args(["compress", "--data", "mnist", "--eval-attacks", "clean,pgd5,pgd40,fgsm", "--eval-step", "0.1"])
    assert steps_of(names(one.eval_attacks), 0.3, one.eval_step) == pytest.approx(
        {"pgd5": 0.1, "pgd40": 0.1, "fgsm": 0.3})  # FGSM keeps its own step (was: 0.1, a third of the ball)
    each = parse_args(["eval", "m.pt", "--attacks", "pgd5,pgd40", "--step", "pgd5=0.1,pgd40=1/100"])
    assert steps_of(["pgd5", "pgd40"], 0.3, each.step) == pytest.approx({"pgd5": 0.1, "pgd40": 0.01})


def test_pgd_default_step_follows_its_number_of_steps():
    assert parse_attack("pgd20", 8 / 255).step_size == pytest.approx(2 / 255)  # eps/4 from 10 steps on, as before
    assert parse_attack("pgd2", 0.3).step_size == pytest.approx(0.375)  # was eps/4: two steps reached half the ball
    for k in range(1, 60):
        spec = parse_attack(f"pgd{k}", 0.3)
        assert spec.step_size * k >= 0.3 and spec.short_reach() is None


# --- a step that cannot cross the ball is warned about ------------------------------------------------------------

def test_a_step_too_short_to_cross_the_ball_is_warned_about_in_one_line(test_set):
    with pytest.warns(UserWarning) as caught:
        evaluate(tiny_cnn(), test_set, ["clean", "pgd5"], eps=0.3, step=0.01, n=32)
    messages = [str(w.message) for w in caught if "overstates" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "pgd5" in messages[0] and "0.05" in messages[0] and "default (0.15)" in messages[0]


def test_default_steps_are_not_warned_about(test_set):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(tiny_cnn(), test_set, ["clean", "fgsm", "pgd2", "pgd40"], eps=0.3, n=32)


def test_the_command_line_warns_before_training(capsys, tmp_path):
    with pytest.warns(UserWarning, match=r"pgd5 with step 0.01 moves at most 0.05 .* default \(0.1\)"):
        code = main(["train", "--model", "small_cnn", "--data", "digits", "--out", str(tmp_path / "run"),
                     "--eval-attacks", "clean,pgd5", "--eval-step", "0.01", "--train-n", "100", "--val-size", "50",
                     "--batch-size", "64"])
    assert code == 2 and "50 training images" in capsys.readouterr().err  # warned, then refused before training


# --- every report states eps, step and steps per attack ------------------------------------------------------------

def test_the_eval_card_and_its_printed_table_state_each_attacks_eps_step_and_steps(capsys, tmp_path):
    cstar.save(tiny_cnn(), tmp_path / "model")
    card_path = tmp_path / "card.json"
    code = main(["eval", str(tmp_path / "model"), "--data", "digits", "--attacks", "clean,pgd5,pgd40", "--n", "32",
                 "--step", "pgd40=0.01", "--json", str(card_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "pgd5: eps 0.2, step 0.1, 5 steps" in out and "pgd40: eps 0.2, step 0.01, 40 steps" in out
    card = json.loads(card_path.read_text())
    assert card["attacks"]["pgd5"] == {"eps": EPS, "norm": "linf", "step": pytest.approx(0.1), "steps": 5,
                                       "restarts": 1}
    assert card["attacks"]["pgd40"]["step"] == 0.01 and card["attacks"]["pgd40"]["steps"] == 40


def test_the_compression_report_states_each_attacks_settings(test_set, tmp_path):
    model = tiny_cnn()
    result = evaluate(model, test_set, ["clean", "pgd3"], eps=EPS, n=32)
    plan = select_ranks(model, RankSpec(2.0))
    results = {"params": {"dense": 10, "compressed": 5, "ratio": 2.0}, "accuracy": {"final": result["accuracy"]},
               "eval_subset": {"final": result["subset"]}, "phases": {}, "attacks": result["attacks"],
               "threat_model": {"dataset": "digits", "eps": EPS, "budget": "1 epoch"}}
    report = write_report(tmp_path, results, plan, []).read_text()
    assert "Attacks: pgd3: eps 0.2, step 0.1667, 3 steps." in report


def test_compress_records_the_attacks_it_evaluated_with():
    from cstar.pipeline.compress import CompressConfig, _results

    evaluation = {"accuracy": {"clean": 0.5, "pgd5": 0.1}, "subset": "all 10 examples",
                  "attacks": {"pgd5": {"eps": 0.3, "norm": "linf", "step": 0.15, "steps": 5, "restarts": 1}}}
    model = tiny_cnn()
    plan = select_ranks(model, RankSpec(2.0))
    results = _results({"evaluate": {"results": {"final": evaluation}}}, plan, model, model, CompressConfig())
    assert results["attacks"] == evaluation["attacks"]


def _cell(**extra) -> dict:
    return {"method": "dense", "target_ratio": 1.0, "params": 10, "params_ratio": 1.0, "macs": 10, "macs_ratio": 1.0,
            "accuracy": {"clean": 0.9, "pgd40": 0.5}, "subset": "all 10 examples", "train_seconds": {}, **extra}


def test_a_comparison_records_and_tabulates_each_attacks_settings(test_set):
    config = CompareConfig(eval_attacks=["clean", "pgd5"], eval_step={"pgd40": 0.01}, eval_n=32)
    figures, _ = _evaluate_attacks(tiny_cnn(), test_set, config, 0.3)
    assert figures["attacks"]["pgd5"]["step"] == pytest.approx(0.15) and figures["attacks"]["pgd5"]["steps"] == 5
    recorded = {"pgd40": {"eps": 0.3, "norm": "linf", "step": 0.01, "steps": 40, "restarts": 1}}
    results = {"config": {"eval_attacks": ["clean", "pgd40"], "eval_step": 0.01}, "eps": 0.3, "budget": "1 epoch",
               "cells": {"dense": _cell(attacks=recorded)}}
    assert "Attacks: pgd40: eps 0.3, step 0.01, 40 steps." in format_comparison(results)
    before_the_record = {**results, "cells": {"dense": _cell()}}  # a cell from before: its settings, from the config
    assert "Attacks: pgd40: eps 0.3, step 0.01, 40 steps." in format_comparison(before_the_record)


# --- a resumed evaluation continues only the same model, data and settings -----------------------------------------

class _Killed(Exception):
    pass


def killed_after_one_batch(monkeypatch, model, test_set, path, **options) -> None:
    """An evaluation into ``path`` that dies after saving its first batch's counts."""
    import importlib

    module = importlib.import_module("cstar.evaluation.evaluate")
    real = module.write_json

    def write_then_die(target, obj):
        real(target, obj)
        raise _Killed

    monkeypatch.setattr(module, "write_json", write_then_die)
    with pytest.raises(_Killed):
        evaluate(model, test_set, ["clean", "pgd3"], eps=EPS, out_path=path, **options)
    monkeypatch.setattr(module, "write_json", real)
    assert path.with_name(path.name + ".partial").exists()


@pytest.mark.parametrize("change, named", [
    (dict(model=tiny_cnn(1)), "the model's weights"),
    (dict(step={"pgd3": 0.1}), "the attacks or their eps/step/steps"),
    (dict(data=lambda test_set: (test_set.images.flip(0), test_set.labels.flip(0))), "the test data"),
], ids=["other-weights", "other-step", "other-data"])
def test_resuming_with_another_model_data_or_step_is_refused(monkeypatch, test_set, tmp_path, change, named):
    path = tmp_path / "card.json"
    killed_after_one_batch(monkeypatch, tiny_cnn(0), test_set, path, batch_size=64)
    model = change.get("model", tiny_cnn(0))
    test_data = change["data"](test_set) if "data" in change else test_set
    with pytest.raises(CstarError) as refused:
        evaluate(model, test_data, ["clean", "pgd3"], eps=EPS, batch_size=64, out_path=path, resume=True,
                 **({"step": change["step"]} if "step" in change else {}))
    assert named in str(refused.value) and "\n" not in str(refused.value)
    assert not path.exists()
    resumed = evaluate(tiny_cnn(0), test_set, ["clean", "pgd3"], eps=EPS, batch_size=64, out_path=path, resume=True)
    assert resumed["n_examples"] == len(test_set) and path.exists()


def test_cstar_eval_resume_with_another_checkpoint_is_refused(monkeypatch, capsys, test_set, tmp_path):
    for name, seed in (("a", 0), ("b", 1)):
        cstar.save(tiny_cnn(seed), tmp_path / name)
    path = tmp_path / "card.json"
    killed_after_one_batch(monkeypatch, cstar.load(tmp_path / "a"), test_set, path)
    resume = ["--data", "digits", "--attacks", "clean,pgd3", "--json", str(path), "--resume"]
    assert main(["eval", str(tmp_path / "b"), *resume]) == 2  # was: b's counts added to a's first batch
    err = capsys.readouterr().err
    assert "the model's weights" in err and len(err.strip().splitlines()) == 1 and not path.exists()
    assert main(["eval", str(tmp_path / "a"), *resume]) == 0 and path.exists()
