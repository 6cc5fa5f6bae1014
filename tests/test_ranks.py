import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from cstar._core.errors import CstarError
from cstar.lowrank import LayerPlan, RankPlan, RankSpec, select_ranks
from cstar.models import create


class TinyNet(nn.Module):
    """Every kind of layer: stem, strided dilated conv, grouped conv, biased 1x1, non-square kernel, two linears."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self._build()

    def _build(self):
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(),
            nn.Conv2d(32, 48, 1, stride=2), nn.ReLU(),
            nn.Conv2d(48, 48, (3, 1), padding=(1, 0)), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(192, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.pool(self.body(self.stem(x)))
        return self.head(torch.relu(self.hidden(torch.flatten(x, 1))))


TINY_SHAPE = (3, 16, 16)


def _achieved(plan):
    return plan.achieved_ratio if plan.budget == "params" else plan.achieved_macs_ratio


def _assert_tight(plan, target):
    assert target <= _achieved(plan) <= 1.02 * target


@pytest.mark.parametrize("ratio", [2, 8, 64])
@pytest.mark.parametrize("budget", ["params", "macs"])
def test_resnet18_meets_ratio_within_two_percent(budget, ratio):
    model = create("resnet18", 10, width=16)
    _assert_tight(select_ranks(model, ratio, budget=budget, exclude=[] if ratio == 64 else None), ratio)


@pytest.mark.parametrize("ratio, budget", [(2, "params"), (16, "params"), (64, "params"), (64, "macs")])
def test_width64_resnet18_meets_ratio(ratio, budget):
    _assert_tight(select_ranks(create("resnet18", 10), ratio, budget=budget), ratio)


@pytest.mark.parametrize("name, ratio", [("resnet20", 4), ("resnet20", 16), ("vgg16", 8)])
@pytest.mark.parametrize("budget", ["params", "macs"])
def test_other_models_meet_ratio(name, ratio, budget):
    _assert_tight(select_ranks(create(name, 10), ratio, budget=budget), ratio)


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_model_defined_here_meets_ratio(budget):
    plan = select_ranks(TinyNet(), 2.5, budget=budget, input_shape=TINY_SHAPE, exclude=[])
    _assert_tight(plan, 2.5)


def test_joint_budget_meets_both_ratios():
    plan = select_ranks(create("resnet18", 10, width=16), 6, budget="joint", macs_ratio=4)
    assert plan.achieved_ratio >= 6 and plan.achieved_macs_ratio >= 4
    assert plan.achieved_ratio <= 6 * 1.02 or plan.achieved_macs_ratio <= 4 * 1.02


def test_global_ranks_differ_and_retain_more_energy_than_uniform():
    model = create("resnet20", 10)
    best = select_ranks(model, 4)
    uniform = select_ranks(model, 4, method="uniform")
    assert len({p.ranks for p in best.layers.values() if p.kind == "tucker2"}) > 3
    assert best.achieved_ratio >= 4 and uniform.achieved_ratio >= 4  # the same budget

    def log_energy(plan):
        return sum(math.log(p.energy) for p in plan.layers.values())

    assert log_energy(best) > log_energy(uniform) + 1
    assert sum(p.energy for p in best.layers.values()) > sum(p.energy for p in uniform.layers.values())


def test_uniform_keeps_the_same_rank_fraction_everywhere():
    plan = select_ranks(create("resnet20", 10), 3, method="uniform")
    # stage 2 (32 channels) and stage 3 (64 channels) ranks are one fraction of the mode sizes
    fractions = {round(r / c, 1) for p in plan.layers.values() if p.kind == "tucker2"
                 for r, c in zip(p.ranks, p.shape[:2])}
    assert len(fractions) == 1


def test_same_plan_twice():
    model = create("resnet20", 10)
    assert select_ranks(model, 5).to_dict() == select_ranks(model, 5).to_dict()


def test_default_exclusions_are_first_conv_and_classifier():
    model = create("resnet20", 10)
    plan = select_ranks(model, 2)
    assert plan.excluded == ["conv1", "fc"]
    assert "conv1" not in plan.layers and "fc" not in plan.layers
    everything = select_ranks(model, 2, exclude=[])
    assert everything.excluded == [] and {"conv1", "fc"} <= set(everything.layers)


def test_exclude_a_container_keeps_its_layers_dense():
    plan = select_ranks(create("resnet20", 10), 2, exclude=["stages.0"])
    assert all(name.startswith("stages.0.") for name in plan.excluded)
    assert not any(name.startswith("stages.0.") for name in plan.layers)


def test_layer_kinds_and_grouped_conv_skipped():
    plan = select_ranks(TinyNet(), 2, input_shape=TINY_SHAPE, exclude=[])
    assert "groups=4" in plan.skipped["body.3"]
    assert plan.layers["body.0"].kind == "tucker2" and len(plan.layers["body.0"].ranks) == 2
    assert plan.layers["body.5"].kind in ("svd", "dense") and len(plan.layers["body.5"].ranks) == 1
    assert plan.layers["body.7"].shape == (48, 48, 3, 1)


def test_layer_costs_are_exact():
    plan = select_ranks(TinyNet(), 2, input_shape=TINY_SHAPE, exclude=[])
    layer = plan.layers["body.0"]  # 16 -> 32, 3x3, stride 2: 16x16 input, 8x8 output, no bias
    if layer.kind == "tucker2":
        r_out, r_in = layer.ranks
        assert layer.params == 16 * r_in + r_out * r_in * 9 + r_out * 32
        assert layer.macs == 256 * 16 * r_in + 64 * (r_out * r_in * 9 + r_out * 32)
    assert layer.dense_macs == 64 * 32 * 16 * 9
    total = plan.dense_params - sum(p.dense_params - p.params for p in plan.layers.values())
    assert plan.params == total


def test_multiple_of_and_min_rank():
    plan = select_ranks(create("resnet20", 10), 3, multiple_of=8, min_rank=4)
    for p in plan.layers.values():
        if p.kind != "dense":
            assert all(r >= 4 and (r % 8 == 0 or r in (4, *p.shape[:2])) for r in p.ranks)


def test_params_plan_without_input_shape_has_no_macs():
    plan = select_ranks(TinyNet(), 2, exclude=[])
    assert plan.macs is None and plan.achieved_macs_ratio is None and plan.achieved_ratio >= 2
    assert "-" in plan.table()


@pytest.mark.parametrize("ratio", [1, 0.5, float("nan"), "4"])
def test_ratio_must_exceed_one(ratio):
    with pytest.raises(CstarError, match="ratio must be a number > 1"):
        select_ranks(create("resnet20", 10), ratio)


def test_unreachable_names_the_limit_and_the_default_exclusions():
    expected = r"500x on parameters is unreachable \(at most \d+\.\d+x\).*excluded by default.*exclude=\[\]"
    with pytest.raises(CstarError, match=expected):
        select_ranks(create("resnet20", 10), 500)
    with pytest.raises(CstarError, match="at most") as info:
        select_ranks(create("resnet20", 10), 5000, exclude=[])
    assert "exclude=[]" not in str(info.value)


def test_nothing_to_compress():
    with pytest.raises(CstarError, match="nothing to compress.*exclude=\\[\\]"):
        select_ranks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)), 2, input_shape=(3, 3, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": "macs"}, "needs input_shape"),
        ({"budget": "joint", "input_shape": TINY_SHAPE}, "needs macs_ratio"),
        ({"macs_ratio": 2}, "only used with budget='joint'"),
        ({"budget": "seconds"}, "unknown budget"),
        ({"budget": "latency"}, "times the layers on their inputs, which needs input_shape"),
        ({"runtime": "onnxruntime"}, "only applies to budget='latency'"),
        ({"budget": "latency", "runtime": "tensorrt"}, "unknown runtime"),
        ({"method": "best"}, "unknown method"),
        ({"exclude": ["nope"]}, "unknown module"),
        ({"min_rank": 0}, "min_rank"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(CstarError, match=message):
        select_ranks(TinyNet(), 2, **kwargs)


def test_a_rank_spec_gives_the_plan_its_keywords_give():
    spec = RankSpec(3, budget="joint", macs_ratio=2.5, multiple_of=4, exclude=["stages.0"])
    model = create("resnet20", 10)
    assert select_ranks(model, spec) == select_ranks(model, 3, budget="joint", macs_ratio=2.5, multiple_of=4,
                                                     exclude=["stages.0"])
    assert spec.to_dict()["exclude"] == ["stages.0"] and spec.exclude == ("stages.0",)


@pytest.mark.parametrize("kwargs, message", [
    ({"ratio": 1}, "must be a number > 1"),
    ({"ratio": 4, "multiple_of": 0}, "multiple_of must be an integer >= 1"),
    ({"ratio": 4, "exclude": "conv1"}, "exclude must be a list of module names"),
    ({"ratio": 4, "budget": "seconds"}, "unknown budget"),
])
def test_a_bad_rank_spec_is_refused_when_built(kwargs, message):
    with pytest.raises(CstarError, match=message):
        RankSpec(**kwargs)


def test_a_rank_spec_and_keywords_together_are_refused():
    with pytest.raises(CstarError, match="got a RankSpec and budget"):
        select_ranks(TinyNet(), RankSpec(2), budget="macs")


def test_dict_and_file_round_trip(tmp_path):
    plan = select_ranks(create("resnet20", 10), 3, budget="joint", macs_ratio=2.5)
    assert RankPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    path = plan.save(tmp_path / "plan.json")
    loaded = RankPlan.load(path)
    assert loaded == plan and isinstance(loaded.layers["stages.1.0.conv1"], LayerPlan)
    assert json.loads(path.read_text())["achieved_ratio"] == pytest.approx(plan.achieved_ratio)


def test_load_errors(tmp_path):
    with pytest.raises(CstarError, match="does not exist"):
        RankPlan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CstarError, match="not valid JSON"):
        RankPlan.load(tmp_path / "bad.json")
    with pytest.raises(CstarError, match="missing"):
        RankPlan.from_dict({"layers": {}})


def test_table_lists_layers_and_totals():
    plan = select_ranks(create("resnet20", 10), 4)
    text = plan.table()
    assert "stages.2.2.conv2" in text and "total" in text
    assert f"{plan.dense_params:,} -> {plan.params:,}" in text
    assert f"ratio {plan.achieved_ratio:.2f}x params, {plan.achieved_macs_ratio:.2f}x MACs" in text
    assert "excluded (kept dense): conv1, fc" in text


def test_plans_of_linear_layers_are_pinned():
    """Ranks chosen from the smaller Gram matrix only (fast for a 25088 x 4096 layer) are the ranks chosen before."""
    from cstar.models import create

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(600, 200), nn.ReLU(), nn.Linear(200, 300), nn.ReLU(),
                          nn.Linear(300, 10))
    plan = select_ranks(model, 3, exclude=["5"])
    assert {name: layer.ranks for name, layer in plan.layers.items()} == {"1": (39,), "3": (52,)}
    torch.manual_seed(0)
    plan = select_ranks(create("small_cnn", 10, in_channels=1, input_size=28), 8)
    assert plan.layers["fc1"].ranks == (83,) and plan.layers["conv2"].kind == "dense"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_inf_are_refused(bad):
    model = TinyNet()
    with torch.no_grad():
        model.hidden.weight[3, 5] = bad
    with pytest.raises(CstarError, match=r"NaN or Inf values \(tensor 'hidden.weight'\)"):
        select_ranks(model, 2, exclude=[])


def test_a_linear_wider_than_1024_has_the_energies_of_numpy_svd():
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(1100, 1030), nn.ReLU(), nn.Linear(1030, 10))
    with torch.no_grad():  # a decaying spectrum: rows scaled down the further they are from the first
        model[0].weight.copy_(torch.randn(1030, 1100, generator=g) * 0.995 ** torch.arange(1030.0)[:, None])
    plan = select_ranks(model, 8)
    layer = plan.layers["0"]
    squared = np.linalg.svd(model[0].weight.detach().double().numpy(), compute_uv=False) ** 2
    assert layer.kind == "svd" and 1 < layer.ranks[0] < 1030
    assert layer.energy == pytest.approx(squared[:layer.ranks[0]].sum() / squared.sum(), rel=1e-5)
