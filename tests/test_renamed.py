"""The training attack's old name ``method``: still accepted everywhere it was, each use noted; records
written before the rename read as today's."""

import warnings

import pytest
import yaml

from cstar import TrainConfig
from cstar._core.errors import CstarError
from cstar.cli import parse_args

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
