"""Channel pruning baselines: dependency groups, physical removal, masks, budgets, magnitude and HYDRA scores."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cstar import CstarError, TrainConfig, count_params, load, save
from cstar.models import Normalize, create
from cstar.prune import (ChannelMask, channel_scores, find_groups, keep_masks, learn_channel_scores, magnitude_plan,
                         magnitude_prune, prune_channels, robust_prune, select_channels)

from helpers import randomise_bn


class TwoBranch(nn.Module):
    """Residual-style sum of two convs, a sigmoid (maps a zeroed channel to 0.5), a flatten of 6 x 4 x 4."""

    def __init__(self) -> None:
        super().__init__()
        self.normalize = Normalize([0.5] * 3, [0.25] * 3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(12)
        self.b = nn.Conv2d(8, 12, 1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(12, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(self.normalize(x))))
        x = self.pool(F.relu(self.bn_a(self.a(x)) + self.b(x)))
        x = self.pool(torch.sigmoid(self.head(x)))
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


class Blocked(nn.Module):
    """conv1 (3 -> 8) followed by one construct that channel pruning must not follow."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2 if kind == "grouped" else 1)
        self.fc = nn.Linear(16 if kind == "cat" else 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if self.kind == "cat":
            y = torch.cat([y, self.conv2(y)], 1)
        elif self.kind == "slice":
            y = self.conv2(y[:, :4].repeat(1, 2, 1, 1))
        elif self.kind == "reshape":
            y = self.conv2(y.reshape(y.shape[0], 8, 16, 4))
        else:
            y = self.conv2(y)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def _user_model() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(TwoBranch())


def _model(name: str) -> tuple[nn.Module, tuple[int, int, int]]:
    torch.manual_seed(0)
    if name == "user":
        return _user_model(), (3, 16, 16)
    model = create(name, width=8) if name == "resnet18" else create(name)
    return randomise_bn(model), (3, 32, 32)


def _by_producer(groups) -> dict:
    return {g.producers[0]: g for g in groups if g.producers}


def _random_keep(groups, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {g.id: torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 3)]
            for g in groups if g.prunable}


def _loader(shape: tuple[int, int, int], batches: int = 2, size: int = 8):
    gen = torch.Generator().manual_seed(0)
    return [(torch.rand(size, *shape, generator=gen), torch.randint(0, 5, (size,), generator=gen))
            for _ in range(batches)]


_FAST = dict(epochs=1, attack_steps=1, eps=8 / 255, check_size=0, progress=False, lr=0.5)


# ----------------------------------------------------------------------------- groups


def test_resnet20_residual_stream_is_one_group_and_io_groups_are_not_prunable():
    groups = find_groups(create("resnet20"))
    stream = _by_producer(groups)["conv1"]
    assert stream.producers == ("conv1", "stages.0.0.conv2", "stages.0.1.conv2", "stages.0.2.conv2")
    assert stream.norms == ("bn1", "stages.0.0.bn2", "stages.0.1.bn2", "stages.0.2.bn2")
    assert set(stream.consumers) == {"stages.0.0.conv1", "stages.0.1.conv1", "stages.0.2.conv1",
                                     "stages.1.0.conv1", "stages.1.0.shortcut.conv"}
    assert sum(g.prunable for g in groups) == 12  # 3 residual streams + 9 inner block channels
    assert "model input" in groups[0].reason and not groups[0].prunable
    assert "model output" in _by_producer(groups)["fc"].reason


def test_resnet18_last_stream_joins_shortcut_projection_and_feeds_classifier():
    groups = find_groups(create("resnet18", width=8))
    last = _by_producer(groups)["stages.3.0.conv2"]
    assert {"stages.3.0.shortcut.conv", "stages.3.1.conv2"} <= set(last.producers)
    assert "stages.3.0.shortcut.bn" in last.norms and "fc" in last.consumers
    assert last.channels == 64 and last.prunable and sum(g.prunable for g in groups) == 12


def test_vgg16_has_one_prunable_chain_per_conv():
    groups = [g for g in find_groups(create("vgg16")) if g.prunable]
    assert len(groups) == 13 and all(len(g.producers) == 1 and len(g.consumers) == 1 for g in groups)
    assert groups[-1].consumers == ("fc",)


def test_user_model_groups_sum_flatten_and_hidden_units():
    groups = _by_producer(find_groups(_user_model(), (3, 16, 16)))
    assert groups["a"].producers == ("a", "b") and groups["a"].norms == ("bn_a",) and groups["a"].consumers == ("head",)
    assert groups["stem"].consumers == ("a", "b") and groups["stem"].bn_after == {"stem": "bn"}
    assert groups["head"].consumers == ("fc1",) and groups["head"].expand == {"fc1": 16}
    assert groups["fc1"].prunable and not groups["fc2"].prunable


@pytest.mark.parametrize("kind, reason", [("cat", "cat"), ("grouped", "grouped conv"), ("slice", "getitem"),
                                          ("reshape", "reshape")])
def test_unfollowed_constructs_make_the_group_not_prunable(kind, reason):
    group = _by_producer(find_groups(Blocked(kind), (3, 8, 8)))["conv1"]
    assert not group.prunable and reason in group.reason


def test_plain_blocked_model_control_is_prunable():
    assert _by_producer(find_groups(Blocked("plain"), (3, 8, 8)))["conv1"].prunable


def test_untraceable_model_names_the_fix():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(CstarError, match="torch.fx.*traceable"):
        find_groups(Branchy(), (3, 8, 8))


# ----------------------------------------------------------------------------- physical removal and masks


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "user"])
def test_pruned_model_equals_masked_model(name):
    model, shape = _model(name)
    groups = find_groups(model, shape)
    keep = _random_keep(groups)
    pruned = prune_channels(model, keep, groups).eval()
    x = torch.rand(4, *shape)
    with torch.no_grad(), ChannelMask(model, groups, keep_masks(groups, keep)):
        masked = model(x)
    assert count_params(pruned) < count_params(model)
    torch.testing.assert_close(pruned(x), masked, rtol=1e-5, atol=1e-5)


def test_pruned_model_equals_masked_model_in_train_mode():
    model, shape = _model("user")
    model.drop.p = 0.0
    groups = find_groups(model, shape)
    keep = _random_keep(groups, seed=3)
    pruned = prune_channels(model, keep, groups).train()
    x = torch.rand(6, *shape)
    with torch.no_grad(), ChannelMask(model.train(), groups, keep_masks(groups, keep)):
        masked = model(x)
    torch.testing.assert_close(pruned(x), masked, rtol=1e-5, atol=1e-5)


def test_prune_channels_leaves_input_untouched_and_slices_bn_statistics():
    model, _ = _model("resnet20")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = find_groups(model)
    stream = _by_producer(groups)["conv1"]
    pruned = prune_channels(model, {stream.id: torch.tensor([9, 2, 5])}, groups)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert pruned.conv1.out_channels == 3 and pruned.stages[1][0].shortcut.conv.in_channels == 3
    assert torch.equal(pruned.bn1.running_var, model.bn1.running_var[[2, 5, 9]])
    assert type(pruned) is type(model) and pruned.cstar_config == model.cstar_config


def test_pruned_builtin_model_saves_and_reloads(tmp_path):
    model, _ = _model("resnet20")
    pruned = magnitude_prune(model, 4).eval()
    loaded = load(save(pruned, tmp_path / "m"))
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), pruned(x))
    assert loaded.stages[2][1].conv1.weight.shape == pruned.stages[2][1].conv1.weight.shape
    assert loaded.cstar_pruning["method"] == "magnitude"


# ----------------------------------------------------------------------------- budgets and scores


@pytest.mark.parametrize("ratio", [2, 4, 16])
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_magnitude_prune_meets_the_parameter_ratio_within_2_percent(name, ratio):
    model, shape = _model(name)
    pruned = magnitude_prune(model, ratio, shape)
    achieved = count_params(model) / count_params(pruned)
    assert ratio <= achieved <= 1.02 * ratio


@pytest.mark.parametrize("ratio", [2, 4, 16])
def test_hydra_prune_meets_the_parameter_ratio_within_2_percent(ratio):
    model, shape = _model("resnet20")
    pruned = robust_prune(model, _loader(shape, batches=1, size=4), ratio, method="hydra",
                          score_config=TrainConfig(**_FAST))
    achieved = count_params(model) / count_params(pruned)
    assert ratio <= achieved <= 1.02 * ratio
    assert all(p.requires_grad for p in pruned.parameters())


def test_learned_scores_change_while_weights_stay_frozen():
    model, shape = _model("user")
    weights = {k: v.clone() for k, v in model.named_parameters()}
    _, plan = magnitude_plan(model, 4, shape)
    scored = learn_channel_scores(model, _loader(shape), 4, TrainConfig(**_FAST), input_shape=shape)
    start = channel_scores(model, find_groups(model, shape))  # the scores start at s / s.mean()
    assert any(not torch.allclose(scored.scores[str(g)].detach(), s / s.mean()) for g, s in start.items())
    assert all(torch.equal(weights[k], v) for k, v in scored.model.named_parameters())
    assert all(torch.equal(weights[k], v) and v.requires_grad for k, v in model.named_parameters())
    assert {g: len(k) for g, k in scored.keep().items()} == plan.counts


def test_scored_model_counts_the_kept_channels_that_differ_from_the_magnitude_selection():
    model, shape = _model("user")
    _, plan = magnitude_plan(model, 4, shape)
    scored = learn_channel_scores(model, _loader(shape), 4, TrainConfig(**{**_FAST, "lr": 1.0}), input_shape=shape)
    moved = sum(len(set(k.tolist()) - set(plan.keep[g].tolist())) for g, k in scored.keep().items())
    assert scored.moved() == moved > 0


def test_hydra_prune_records_how_many_kept_channels_the_scores_moved():
    model, shape = _model("user")
    _, plan = magnitude_plan(model, 4, shape)
    pruned = robust_prune(model, _loader(shape), 4, method="hydra", score_config=TrainConfig(**_FAST),
                          input_shape=shape)
    record = pruned.cstar_pruning
    assert record["channels_kept"] == sum(plan.counts.values())
    assert 0 <= record["channels_moved_by_scores"] <= record["channels_kept"]


def test_fold_bn_scores_a_channel_with_zero_gamma_as_zero():
    model, shape = _model("user")
    model.bn.weight.data[3] = 0.0
    groups = find_groups(model, shape)
    stem = _by_producer(groups)["stem"].id
    assert channel_scores(model, groups, fold_bn=True)[stem][3] == 0
    assert channel_scores(model, groups, fold_bn=False)[stem][3] > 0


def test_tiny_model_stays_within_budget_with_no_room_for_one_more_channel():
    model, shape = _model("user")  # 3527 parameters: one channel is several % of a 16x budget
    groups = find_groups(model, shape)
    plan = select_channels(model, groups, channel_scores(model, groups), 16)
    assert count_params(prune_channels(model, plan.keep, groups)) == plan.params <= count_params(model) / 16
    for group in groups:
        if group.prunable and plan.counts[group.id] < group.channels:
            grown = dict(plan.keep)
            grown[group.id] = torch.arange(plan.counts[group.id] + 1)
            assert count_params(prune_channels(model, grown, groups)) > count_params(model) / 16


def test_global_ranking_keeps_highest_scores_and_is_deterministic():
    model, shape = _model("user")
    groups = find_groups(model, shape)
    scores = channel_scores(model, groups, norm=1)
    first, second = (select_channels(model, groups, scores, 3) for _ in range(2))
    assert all(torch.equal(first.keep[g], second.keep[g]) for g in first.keep)
    for gid, kept in first.keep.items():  # within a group, no dropped channel outscores a kept one
        dropped = torch.ones(len(scores[gid]), dtype=torch.bool)
        dropped[kept] = False
        assert not dropped.any() or scores[gid][dropped].max() <= scores[gid][kept].min()


# ----------------------------------------------------------------------------- bad input


def _one_line_error(call, match: str) -> None:
    with pytest.raises(CstarError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("ratio", [1, 0.5, -2])
def test_ratio_at_most_one_is_refused(ratio):
    _one_line_error(lambda: magnitude_prune(create("resnet20"), ratio), "ratio must be a number > 1")


def test_unreachable_ratio_is_refused():
    _one_line_error(lambda: magnitude_prune(create("resnet20"), 1e4), "unreachable.*lower the ratio")


def test_model_with_nothing_prunable_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    _one_line_error(lambda: magnitude_prune(model, 2, (3, 8, 8)), "nothing to prune")


def test_user_model_without_input_shape_is_refused():
    _one_line_error(lambda: find_groups(TwoBranch()), "pass input_shape")


def test_unknown_option_is_refused():
    _one_line_error(lambda: robust_prune(create("resnet20"), None, 2, init_scale=2.0), "unknown magnitude pruning")


def test_keep_of_a_non_prunable_group_is_refused():
    model = create("resnet20")
    groups = find_groups(model)
    _one_line_error(lambda: prune_channels(model, {0: [0]}, groups), "not prunable")


def test_unknown_method_is_refused():
    _one_line_error(lambda: robust_prune(create("resnet20"), None, 2, method="random"), "unknown pruning method")


# ----------------------------------------------------------------------------- Torch-Pruning


@pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="torch-pruning is not installed")
def test_torch_pruning_graph_agrees_on_which_layers_shrink():
    model = create("resnet20")

    def shrinking(graph: str) -> set:
        return {(frozenset(g.producers + g.norms), frozenset(g.consumers))
                for g in find_groups(model, graph=graph) if g.prunable}

    assert shrinking("fx") == shrinking("torch_pruning")


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_pruning", None)  # makes the import fail
    _one_line_error(lambda: find_groups(create("resnet20"), graph="torch_pruning"), r'pip install "cstar\[pruning\]"')
