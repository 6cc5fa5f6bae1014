"""Old names still accepted everywhere they were, each use noted once (a FutureWarning); records written
before a rename read as today's, silently: the training attack's old name ``method``, the MACs' old name
``flops``, a rank plan's targets and achieved ratios, and compress's first training phase ``admm_train``."""

import json
import shutil
import warnings

import pytest
import torch
import yaml
from helpers import tiny_compress
from torch import nn

import cstar
from cstar import CompressConfig, RankPlan, RankSpec, TrainConfig, select_ranks
from cstar._core.errors import CstarError
from cstar.cli import parse_args
from cstar.evaluation.counting import count_macs

RENAMED = r"'method' in .* is now 'attack'"


def test_train_config_takes_method_as_the_old_name_of_attack():
    with pytest.warns(FutureWarning, match=r"'method' in TrainConfig\(\) is now 'attack'"):
        config = TrainConfig(method="fgsm_rs", eps=0.1)
    assert config.attack == "fgsm_rs" and config.step_size() == pytest.approx(0.125)


def test_train_config_from_dict_takes_the_old_key():
    with pytest.warns(FutureWarning, match=r"'method' in the training settings is now 'attack'"):
        config = TrainConfig.from_dict({"method": "nfgsm", "epochs": 2})
    assert (config.attack, config.epochs) == ("nfgsm", 2)


def test_both_names_at_once_are_refused():
    with pytest.raises(CstarError, match=r"both 'method' and 'attack'.*keep only 'attack'"):
        TrainConfig.from_dict({"method": "pgd", "attack": "nfgsm"})
    with pytest.raises(CstarError, match="keep only 'attack'"):
        TrainConfig(method="pgd", attack="nfgsm")


def test_reading_config_method_gives_the_attack_with_a_note():
    config = TrainConfig(attack="trades")
    with pytest.warns(FutureWarning, match=r"TrainConfig\.method is now TrainConfig\.attack"):
        assert config.method == "trades"


def test_the_new_name_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert TrainConfig(attack="clean").attack == "clean"
        assert TrainConfig.from_dict({"attack": "clean"}).attack == "clean"


@pytest.mark.parametrize("flag", [["--method", "clean"], ["--method=clean"]])
def test_the_method_flag_still_sets_the_attack(flag):
    with pytest.warns(FutureWarning, match="--method is now --attack"):
        args = parse_args(["train", "--model", "small_cnn", "--data", "digits", *flag])
    assert args.attack == "clean"


def test_a_config_file_with_method_sets_the_attack(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("method: nfgsm\nratios: 4\n")
    with pytest.warns(FutureWarning, match=r"'method' in config file .*old\.yaml is now 'attack'"):
        args = parse_args(["compare", "--config", str(cfg), "--data", "digits", "--out", str(tmp_path / "run")])
    assert args.attack == "nfgsm"


def _old_run(tmp_path, command_record: dict):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(command_record))
    return out


def test_a_run_recorded_with_method_resumes_silently_with_its_attack(tmp_path):
    out = _old_run(tmp_path, {"model": "small_cnn", "data": "digits", "method": "nfgsm", "ratios": "4",
                              "methods": "dense,cstar", "search": {"epochs": 1, "method": "nfgsm"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = parse_args(["compare", "--resume", "--out", str(out)])
    assert args.attack == "nfgsm" and args.search == {"epochs": 1, "attack": "nfgsm"}


def test_a_run_recorded_with_method_refuses_another_attack_on_resume(tmp_path):
    out = _old_run(tmp_path, {"model": "small_cnn", "data": "digits", "method": "nfgsm"})
    with pytest.raises(CstarError, match=r"--attack pgd \(the run has nfgsm\)"):
        parse_args(["compare", "--resume", "--out", str(out), "--attack", "pgd"])


def test_a_cell_trained_before_the_rename_counts_as_trained_alike():
    from cstar.pipeline.compare import CompareConfig, _check_same_training, _training_settings

    now = _training_settings("magnitude", CompareConfig(), seed=0)
    before = {key: ({("method" if k == "attack" else k): v for k, v in value.items()} if isinstance(value, dict)
                    else value) for key, value in now.items()}
    assert "method" in before["search"] and "attack" not in before["search"]
    _check_same_training("magnitude-4x", {"training": before}, now)  # no error: the same settings
    before["search"]["method"] = "clean"
    with pytest.raises(CstarError, match=r"search\.attack differ"):
        _check_same_training("magnitude-4x", {"training": before}, now)


# ----------------------------------------------------------------------------- MACs, rank plans, the search phase


def notes(call) -> tuple:
    """(what ``call()`` returns, the messages of the FutureWarnings it gave, every one of them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 5))


SHAPE = (3, 8, 8)


def test_count_flops_is_the_old_name_of_count_macs():
    model = small_model()
    macs, said = notes(lambda: cstar.count_flops(model, SHAPE))
    assert macs == count_macs(model, SHAPE) == 8 * 8 * 16 * 3 * 9 + 8 * 8 * 16 * 16 * 9 + 64 * 32 + 32 * 5
    assert len(said) == 1 and "count_flops is now count_macs" in said[0]


@pytest.mark.parametrize("build", [
    lambda: RankSpec(2, budget="flops", input_shape=SHAPE),
    lambda: select_ranks(small_model(), 2, budget="flops", input_shape=SHAPE),
    lambda: CompressConfig(budget="flops"),
], ids=["RankSpec", "select_ranks", "CompressConfig"])
def test_the_flops_budget_is_the_macs_budget_with_one_note(build):
    made, said = notes(build)
    assert made.budget == "macs"
    assert len(said) == 1 and "budget='flops'" in said[0] and "budget='macs'" in said[0]


@pytest.mark.parametrize("build, read", [
    (lambda: RankSpec(2, budget="joint", flops_ratio=1.5, input_shape=SHAPE), lambda spec: spec.macs_ratio),
    (lambda: select_ranks(small_model(), 2, budget="joint", flops_ratio=1.5, input_shape=SHAPE),
     lambda plan: plan.target_macs_ratio),
    (lambda: CompressConfig(budget="joint", flops_ratio=1.5), lambda config: config.macs_ratio),
], ids=["RankSpec", "select_ranks", "CompressConfig"])
def test_flops_ratio_is_the_old_name_of_macs_ratio_with_one_note(build, read):
    made, said = notes(build)
    assert read(made) == 1.5
    assert len(said) == 1 and "'flops_ratio'" in said[0] and "'macs_ratio'" in said[0]


def test_flops_ratio_beside_macs_ratio_is_refused():
    with pytest.raises(CstarError, match="keep only 'macs_ratio'"):
        RankSpec(2, budget="joint", flops_ratio=1.5, macs_ratio=1.5)


def test_the_new_names_give_no_note():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = select_ranks(small_model(), 2, budget="joint", macs_ratio=1.5, input_shape=SHAPE)
        config = CompressConfig(budget="macs", search=TrainConfig(epochs=2))
        RankPlan.from_dict(plan.to_dict())
    assert plan.target_ratio == 2 and plan.target_macs_ratio == 1.5 and config.search.epochs == 2


@pytest.mark.parametrize("old, new", [("target", "target_ratio"), ("flops_target", "target_macs_ratio"),
                                      ("ratio", "achieved_ratio"), ("flops_ratio", "achieved_macs_ratio")])
def test_a_plans_old_attribute_gives_the_new_one_with_one_note(old, new):
    plan = select_ranks(small_model(), 2, budget="joint", macs_ratio=1.5, input_shape=SHAPE)
    value, said = notes(lambda: getattr(plan, old))
    assert value == getattr(plan, new) and value is not None
    assert said == [f"RankPlan.{old} is now RankPlan.{new}; the old name still works for now"]


def test_the_achieved_ratios_are_the_plans_costs_and_not_its_targets():
    plan = select_ranks(small_model(), 2, budget="joint", macs_ratio=1.5, input_shape=SHAPE)
    assert plan.achieved_ratio == plan.dense_params / plan.params != plan.target_ratio
    assert plan.achieved_macs_ratio == plan.dense_macs / plan.macs != plan.target_macs_ratio


def test_a_plan_json_is_written_with_the_new_names(tmp_path):
    plan = select_ranks(small_model(), 2, budget="macs", input_shape=SHAPE)
    written = json.loads(plan.save(tmp_path / "plan.json").read_text())
    assert written["target_ratio"] == 2 and written["budget"] == "macs"
    assert written["achieved_ratio"] == plan.achieved_ratio and written["achieved_macs_ratio"] >= 2
    assert not {"target", "flops_target", "ratio", "flops_ratio"} & set(written)


def test_a_plan_json_written_before_the_renames_loads_silently(tmp_path):
    plan = select_ranks(small_model(), 2, budget="macs", input_shape=SHAPE)
    old = {{"target_ratio": "target", "target_macs_ratio": "flops_target", "achieved_ratio": "ratio",
            "achieved_macs_ratio": "flops_ratio"}.get(key, key): value for key, value in plan.to_dict().items()}
    old["budget"] = "flops"
    (tmp_path / "plan.json").write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = RankPlan.load(tmp_path / "plan.json")
    assert loaded == plan and loaded.budget == "macs"


COMPRESS = ["compress", "--model", "small_cnn", "--data", "digits"]


@pytest.mark.parametrize("flags, option, value, note", [
    (["--flops-ratio", "1.5"], "macs_ratio", 1.5, "--flops-ratio is now --macs-ratio"),
    (["--budget", "flops"], "budget", "macs", "budget='flops' in the command line is now budget='macs'"),
    (["--admm-train", "{epochs: 1}"], "search", {"epochs": 1}, "--admm-train is now --search"),
])
def test_an_old_flag_sets_the_new_option_with_one_note(flags, option, value, note):
    args, said = notes(lambda: parse_args([*COMPRESS, *flags]))
    assert getattr(args, option) == value
    assert len(said) == 1 and said[0].startswith(note)


def test_a_config_file_with_the_old_names_sets_the_new_options_with_a_note_each(tmp_path):
    cfg = tmp_path / "old.yaml"
    cfg.write_text("admm_train: {epochs: 1}\nbudget: flops\nflops_ratio: 1.5\n")
    args, said = notes(lambda: parse_args([*COMPRESS, "--config", str(cfg)]))
    assert (args.search, args.budget, args.macs_ratio) == ({"epochs": 1}, "macs", 1.5)
    assert len(said) == 3 and all("old.yaml" in line for line in said)


def test_a_compress_run_recorded_with_the_old_names_resumes_silently(tmp_path):
    out = _old_run(tmp_path, {"model": "small_cnn", "data": "digits", "budget": "flops", "ratio": 2,
                              "admm_train": {"epochs": 1, "method": "clean"}})
    args, said = notes(lambda: parse_args(["compress", "--resume", "--out", str(out)]))
    assert said == [] and args.budget == "macs" and args.search == {"epochs": 1, "attack": "clean"}


def test_compress_settings_take_admm_train_as_the_old_name_of_search():
    config, said = notes(lambda: CompressConfig.from_dict({"admm_train": {"epochs": 2}}))
    assert config.search.epochs == 2
    assert len(said) == 1 and "'admm_train' in the compress settings is now 'search'" in said[0]
    section, said = notes(lambda: config.admm_train)
    assert section is config.search and said == ["CompressConfig.admm_train is now CompressConfig.search "
                                                 "(the first training phase); the old name still works for now"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    tiny_compress(out)
    return out


def _as_before_the_rename(run, tmp_path, keep: tuple[str, ...]):
    """A copy of ``run`` as cstar wrote it before the search phase had its name (phase and folder ``admm``),
    with only the phases ``keep`` recorded as done."""
    out = tmp_path / "old"
    shutil.copytree(run, out)
    (out / "search").rename(out / "admm")
    done = json.loads((out / "phases.json").read_text())
    done = {("admm" if name == "search" else name): info for name, info in done.items() if name in keep}
    (out / "phases.json").write_text(json.dumps(done))
    return out


def _stable(results: dict) -> dict:
    return {key: value for key, value in results.items() if key != "phases"}


def test_a_finished_run_of_old_names_resumes_without_training(finished_run, tmp_path):
    out = _as_before_the_rename(finished_run, tmp_path, ("dense", "ranks", "search", "decompose", "finetune",
                                                         "evaluate"))
    before = (out / "phases.json").read_text()
    results, said = notes(lambda: tiny_compress(out))
    assert said == [] and (out / "phases.json").read_text() == before  # no phase ran again
    assert not (out / "search").exists()
    assert results["phases"]["search"]["epochs"] == 1
    assert _stable(results) == _stable(json.loads((finished_run / "results.json").read_text()))


def test_a_run_of_old_names_stopped_in_its_search_phase_continues_from_the_old_folder(finished_run, tmp_path):
    out = _as_before_the_rename(finished_run, tmp_path, ("dense", "ranks"))
    results = tiny_compress(out)  # the old folder's checkpoint holds the phase's last epoch: nothing to train
    assert not (out / "search").exists() and "search" in json.loads((out / "phases.json").read_text())
    assert _stable(results) == _stable(json.loads((finished_run / "results.json").read_text()))
