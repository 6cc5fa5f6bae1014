"""The rank plan of a compression run: checked from shapes up front, selected once, or given beforehand."""

import json
import sys

import pytest
import torch
from digits_runs import PIPELINE

import cstar
from cstar import CompressConfig, CstarError, RankSpec, TrainConfig, data, models
from cstar.cli import main
from cstar.lowrank import RankPlan, select_ranks

RANKS = sys.modules["cstar.lowrank._ranks"]
PHASE = TrainConfig(epochs=1, batch_size=64, attack_steps=1, optimizer="adam", lr=1e-3, check_size=0, progress=False)


@pytest.fixture
def spectra(monkeypatch):
    """The layers whose spectra were computed (the SVD/HOSVD of rank selection), in order."""
    seen = []
    real = RANKS._add_spectra

    def recording(layer, module):
        seen.append(tuple(module.weight.shape))
        return real(layer, module)

    monkeypatch.setattr(RANKS, "_add_spectra", recording)
    return seen


def digits_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create("small_cnn", 10, in_channels=1, input_size=8)


def run_compress(out, plan=None, ratio=2.0):
    train_set = data.load("digits", split="train").take(400)
    test_set = data.load("digits", split="test").take(32)
    config = CompressConfig(ratio=ratio, search=PHASE, finetune=PHASE, eval_attacks=["clean"],
                            eval_phases=["final"])
    return cstar.compress(digits_model(), train_set, test_set, config, out, pretrained=True, val_size=100, plan=plan)


def test_a_pretrained_compress_computes_each_layers_spectrum_once_through_the_api(tmp_path, spectra):
    run_compress(tmp_path / "run")
    planned = RankPlan.load(tmp_path / "run" / "plan.json")
    assert len(spectra) == len(planned.layers)  # one selection: was three (two checks, then the ranks phase)


def test_a_pretrained_compress_computes_each_layers_spectrum_once_through_the_cli(tmp_path, trained, spectra):
    out = tmp_path / "run"
    assert main(["compress", "--checkpoint", str(trained / "model"), *PIPELINE, "--ratio", "2",
                 "--eval-attacks", "clean", "--eval-phases", "final", "--out", str(out)]) == 0
    assert len(spectra) == len(RankPlan.load(out / "plan.json").layers)


def test_the_up_front_check_refuses_an_unreachable_ratio_from_shapes_alone(spectra):
    with pytest.raises(CstarError, match=r"1000x on parameters is unreachable"):
        cstar.check_reachable(models.create("resnet20", 10), RankSpec(1000))
    with pytest.raises(CstarError, match=r"multiple_of=64, min_rank=1 is .*x on parameters for a 4x target"):
        cstar.check_reachable(digits_model(), RankSpec(4, multiple_of=64))
    cstar.check_reachable(models.create("resnet20", 10), RankSpec(4, multiple_of=8))
    assert spectra == []  # no SVD or HOSVD


def test_a_given_plan_is_recorded_instead_of_a_selection(tmp_path, spectra):
    model = digits_model()
    uniform = select_ranks(model, 2.0, method="uniform")  # not what the global allocation would choose
    assert uniform.layers != select_ranks(model, 2.0).layers
    spectra.clear()
    results = run_compress(tmp_path / "run", plan=uniform)
    assert spectra == []
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == uniform.to_dict()
    assert results["plan"]["achieved_ratio"] == pytest.approx(uniform.achieved_ratio)


@pytest.mark.parametrize("case, words", [
    ("another-target", ["made for 3x on params", "ask 2x on params"]),
    ("other-exclusions", ["lacks conv2"]),
    ("ranks-beyond-the-layer", ["conv2", "invalid", "mode sizes"]),
])
def test_a_plan_that_does_not_fit_is_refused_before_any_file(tmp_path, case, words):
    model = digits_model()
    if case == "another-target":
        plan = select_ranks(model, 3.0)
    elif case == "other-exclusions":
        plan = select_ranks(model, 2.0, exclude=["conv1", "conv2", "fc2"])
    else:
        plan = select_ranks(model, 2.0, method="uniform")
        plan.layers["conv2"].ranks = (65, 14)  # conv2 has 64 output channels
    with pytest.raises(CstarError) as refused:
        run_compress(tmp_path / "run", plan=plan)
    line = str(refused.value)
    assert "\n" not in line and all(w in line for w in words), line
    assert not (tmp_path / "run").exists()
