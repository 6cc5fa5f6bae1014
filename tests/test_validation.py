"""cstar._core.checks: one rule per value, shared by flags, config files, sections and the Python configs."""

import math

import numpy as np
import pytest

from cstar import CompareConfig, CompressConfig, models
from cstar._core.checks import RATIO, flag, integer, number
from cstar._core.errors import CstarError
from cstar.cli import parse_args
from cstar.lowrank import RankSpec, select_ranks
from cstar.prune import magnitude_prune
from cstar.training.fit import TrainConfig


def test_bools_ints_and_numbers_are_kept_apart():
    with pytest.raises(CstarError, match="must be an integer >= 1, got True"):
        integer(1)("epochs", True)
    with pytest.raises(CstarError, match="must be true or false, got 1"):
        flag()("amp", 1)
    for bad in (math.nan, math.inf, "0.1", 10**400):
        with pytest.raises(CstarError, match="lr must be a number > 0"):
            number(above=0)("lr", bad)


def test_values_come_back_as_plain_ints_and_floats():
    config = TrainConfig(epochs=np.int64(3), lr=1, seed=np.int32(7))
    assert type(config.epochs) is int and config.epochs == 3
    assert type(config.lr) is float and type(config.seed) is int


def test_ratio_above_one_is_one_rule_everywhere():
    """RankSpec, CompressConfig, CompareConfig and pruning refuse a ratio of inf (CompressConfig took it) alike."""
    expected = RATIO.requirement()
    for call in (lambda: RankSpec(math.inf), lambda: CompressConfig(ratio=math.inf),
                 lambda: CompareConfig(ratios=[math.inf]),
                 lambda: magnitude_prune(models.create("resnet20"), math.inf)):
        with pytest.raises(CstarError, match=f"must be {expected}, got inf"):
            call()


def test_a_config_files_model_arg_is_one_key_value_pair_and_its_numbers_are_typed(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model_arg: width=16\nepochs: 2\nlr: 0.05\n")
    args = parse_args(["train", "--model", "resnet18", "--data", "digits", "--config", str(config)])
    assert args.model_arg == ["width=16"] and args.epochs == 2 and args.lr == 0.05


def test_a_coarse_plan_near_its_target_is_kept_and_a_far_one_is_refused():
    model = models.create("resnet20", 10)
    assert select_ranks(model, 4, multiple_of=16).achieved_ratio < 4 * 1.25
    with pytest.raises(CstarError, match="multiple_of=64, min_rank=1 is .*x on parameters for a 4x target"):
        select_ranks(models.create("small_cnn", 10, in_channels=1, input_size=8), 4, multiple_of=64)
