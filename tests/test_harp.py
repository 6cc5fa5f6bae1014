"""HARP: keep rates learned with the channel scores, the size penalty, the exact budget, and the compare method."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cstar import CstarError, TrainConfig, count_macs, count_params, data
from cstar.pipeline.compare import compare
from cstar.prune import find_groups, harp_prune, hydra_prune
from cstar.prune._budget import CostModel, fit_counts
from cstar.prune._harp import RatedModel, SizePenalty

from test_compare import TRAIN, config, dense_model
from test_prune import _FAST, _loader, _model

SHAPE = (3, 8, 8)


class Chain(nn.Module):
    """conv1 (3 -> 8, 3x3, bias) -> BN -> conv2 (8 -> 6, 3x3, bias) -> pool -> fc (6 -> 4): two prunable groups.

    Pruned to c1 and c2 channels it has 30*c1 + 9*c1*c2 + 5*c2 + 4 parameters and, on 8x8 images,
    1728*c1 + 576*c1*c2 + 4*c2 MACs (padding 1 keeps 8x8: 64 positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# the size of Chain by hand, and its derivatives in c1 and c2
SIZES = {
    "params": (lambda c1, c2: 30 * c1 + 9 * c1 * c2 + 5 * c2 + 4, lambda c1, c2: (30 + 9 * c2, 9 * c1 + 5)),
    "macs": (lambda c1, c2: 1728 * c1 + 576 * c1 * c2 + 4 * c2, lambda c1, c2: (1728 + 576 * c2, 576 * c1 + 4)),
}


def _rated(shift: tuple[float, float], learn_rates: bool = True):
    """A RatedModel of Chain starting at (4, 3) channels (rates 1/2), its logits shifted by ``shift``."""
    torch.manual_seed(0)
    model = Chain()
    groups = find_groups(model, SHAPE)
    ids = [g.id for g in groups if g.prunable]
    init = {g: torch.rand(next(x.channels for x in groups if x.id == g)) for g in ids}
    rated = RatedModel(model, groups, dict(zip(ids, (4, 3))), init, learn_rates=learn_rates)
    with torch.no_grad():
        for g, s in zip(ids, shift):
            rated.rate_logits[str(g)].fill_(s)
    return rated, groups, ids


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_size_penalty_value_and_gradient_match_the_hand_computed_size(budget):
    rated, groups, ids = _rated((0.3, -0.2))
    cost = CostModel(Chain(), groups, SHAPE if budget == "macs" else None)
    size, derivative = SIZES[budget]
    assert cost.dense == size(8, 6)
    limit = size(8, 6) / 3
    penalty = SizePenalty(cost, limit, weight=2.5)
    value = penalty.value(rated)
    value.backward()
    rho = [torch.sigmoid(torch.tensor(0.3)).item(), torch.sigmoid(torch.tensor(-0.2)).item()]
    c1, c2 = 8 * rho[0], 6 * rho[1]
    gap = size(c1, c2) / limit - 1
    assert value.item() == pytest.approx(2.5 * gap ** 2, rel=1e-5)
    for g, d, n, r in zip(ids, derivative(c1, c2), (8, 6), rho):  # chain rule: size -> count -> rate -> logit
        expected = 2.5 * 2 * gap / limit * d * n * r * (1 - r)
        assert rated.rate_logits[str(g)].grad.item() == pytest.approx(expected, rel=1e-4)


def test_mask_keeps_the_rates_share_of_top_scores_and_passes_gradient_to_rate_and_scores():
    rated, _, ids = _rated((0.7, -0.9))
    masks = rated.masks()
    weights = {g: torch.randn(len(masks[g]), generator=torch.Generator().manual_seed(g)) for g in ids}
    sum(((masks[g] * weights[g]).sum() for g in ids)).backward()
    for g, shift, n in zip(ids, (0.7, -0.9), (8, 6)):
        score = rated.scores[str(g)].detach()
        rho = torch.sigmoid(torch.tensor(shift)).item()
        k = int(rho * n + 0.5)
        assert torch.equal(masks[g].detach(), (score >= score.sort(descending=True).values[k - 1]).float())
        rank = torch.empty(n).scatter_(0, score.argsort(descending=True), torch.arange(n, dtype=torch.float))
        step = torch.sigmoid(rho * n - rank - 0.5)
        expected = (weights[g] * step * (1 - step)).sum() * n * rho * (1 - rho)
        assert rated.rate_logits[str(g)].grad.item() == pytest.approx(expected.item(), rel=1e-4)
        assert torch.allclose(rated.scores[str(g)].grad, weights[g])  # straight through, as HYDRA's


@pytest.mark.parametrize("shift", [2.0, -2.0])
def test_rates_move_to_the_target_size_when_the_penalty_alone_is_trained(shift):
    rated, groups, _ = _rated((shift, shift))
    cost = CostModel(Chain(), groups)
    limit = cost.dense / 2.0  # 353 parameters: the shifted rates start at 576 (+2) or 42 (-2)
    penalty = SizePenalty(cost, limit, weight=1.0)
    gap = lambda: abs(cost.size(rated.wanted()).item() / limit - 1)  # noqa: E731
    before = gap()
    optimizer = torch.optim.SGD(rated.rate_logits.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        penalty.value(rated).backward()
        optimizer.step()
    assert before > 0.3 and gap() < 0.02


@pytest.mark.parametrize("wanted, limit, expected", [
    ((3.0, 3.0), 260, (4, 3)),  # scaled: (3, 3) = 190 (both step at once, to (4, 4) = 288); then c1 + 1: 247
    ((8.0, 6.0), 500, (6, 5)),  # scaled: (6, 5) = 479; neither (7, 5) = 554 nor (6, 6) = 538 fits
    ((7.2, 0.6), 300, (7, 1)),  # c2 held at min_channels: (7, 1) = 282; (8, 1) = 321
])
def test_fit_counts_rounds_wanted_counts_under_the_limit_with_no_room_left(wanted, limit, expected):
    groups = find_groups(Chain(), SHAPE)
    cost = CostModel(Chain(), groups)
    ids = [g.id for g in cost.groups]
    counts = fit_counts(cost, dict(zip(ids, wanted)), limit)
    size = SIZES["params"][0]
    assert tuple(counts[g] for g in ids) == expected
    c1, c2 = expected
    assert size(c1, c2) <= limit and size(c1 + 1, c2) > limit and (c2 == 6 or size(c1, c2 + 1) > limit)


def test_frozen_rates_select_exactly_the_channels_hydra_selects():
    model, shape = _model("user")
    settings = TrainConfig(**{**_FAST, "lr": 1.0})
    torch.manual_seed(1)
    hydra = hydra_prune(model, _loader(shape), 4, settings, input_shape=shape)
    torch.manual_seed(1)
    harp = harp_prune(model, _loader(shape), 4, settings, input_shape=shape, learn_rates=False)
    assert hydra.cstar_pruning["channels_moved_by_scores"] > 0  # the scores moved the selection: not magnitude's
    hydra_state, harp_state = hydra.state_dict(), harp.state_dict()
    assert hydra_state.keys() == harp_state.keys()
    assert all(torch.equal(hydra_state[k], harp_state[k]) for k in hydra_state)


@pytest.mark.parametrize("ratio", [4, 16])
@pytest.mark.parametrize("budget", ["params", "macs"])
def test_harp_prune_meets_its_budget_within_2_percent_and_never_above(budget, ratio):
    model, shape = _model("resnet20")
    pruned = harp_prune(model, _loader(shape, batches=1, size=4), ratio, TrainConfig(**_FAST), budget=budget)
    measure = count_params if budget == "params" else (lambda m: count_macs(m, shape))
    achieved = measure(model) / measure(pruned)
    assert ratio <= achieved <= 1.02 * ratio
    assert all(p.requires_grad for p in pruned.parameters())


def test_harp_prune_records_the_rates_it_learned_and_kept():
    model, shape = _model("resnet20")
    pruned = harp_prune(model, _loader(shape), 8, TrainConfig(**{**_FAST, "lr": 5.0}), budget="macs")
    record = pruned.cstar_pruning
    assert record["method"] == "harp" and record["budget"] == "macs" and record["target_ratio"] == 8
    assert record["macs_ratio"] == pytest.approx(count_macs(model, shape) / count_macs(pruned, shape))
    assert record["ratio"] == pytest.approx(count_params(model) / count_params(pruned))
    assert record["kept_rates"]["stages.1.0.conv1"] == round(pruned.stages[1][0].conv1.out_channels / 32, 4)
    assert record["kept_rates"]["conv1"] == round(pruned.conv1.out_channels / 16, 4)
    assert record["learned_rates"] != record["kept_rates"]  # learned rates are real numbers, kept ones whole channels


@pytest.mark.parametrize("options, message", [
    (dict(ratio=1.0), "ratio must be a number > 1"),
    (dict(budget="flops"), "budget must be one of params, macs"),
    (dict(rate_weight=-1.0), "rate_weight must be a number >= 0"),
    (dict(rate_weight=float("nan")), "rate_weight must be a number >= 0"),
    (dict(learn_rates=1), "learn_rates must be true or false"),
    (dict(config="fast"), "config must be a cstar.TrainConfig"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(options, message, tmp_path):
    model, shape = _model("user")
    options = {"ratio": 4, **options}
    with pytest.raises(CstarError, match=message) as info:
        harp_prune(model, _loader(shape), options.pop("ratio"), options.pop("config", TrainConfig(**_FAST)),
                   input_shape=shape, out_dir=tmp_path / "run", **options)
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_harp_runs_in_compare_at_the_parameter_ratio(tmp_path):
    train_set, test_set = data.load("digits", split="train").take(400), data.load("digits", split="test")
    quick = TrainConfig(epochs=1, **{**TRAIN, "attack": "clean"})
    results = compare(dense_model(train_set), train_set, test_set,
                      config(methods=["dense", "harp"], search=quick, finetune=quick, eval_attacks=["clean"], eval_n=60,
                             latency_runs=0), tmp_path / "run", val_size=100)
    cell = results["cells"]["harp-4x"]
    assert 4.0 <= cell["params_ratio"] <= 4.08
    assert cell["pruning"]["method"] == "harp" and set(cell["train_seconds"]) == {"search", "finetune"}
    search_log = (tmp_path / "run" / "cells" / "harp-4x" / "search" / "metrics.jsonl").read_text()
    assert "ratio_at_rates" in search_log  # the scores and rates trained in the search phase, with the penalty
