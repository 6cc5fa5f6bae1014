"""Ranks learned on the adversarial loss (cstar.lowrank.learn_ranks) and the compared methods built on them."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from archs import bottleneck_resnet
from cstar import data
from cstar._core.errors import CstarError
from cstar.evaluation.counting import count_macs, count_params
from cstar.lowrank import RankScoredModel, RankSpec, decompose, learn_ranks, select_ranks
from cstar.pipeline import compressors
from cstar.pipeline.compare import compare
from cstar.training.fit import TrainConfig

from test_compare import config, dense_model

SHAPE = (3, 8, 8)
SPECS = {"params": RankSpec(4, input_shape=SHAPE), "macs": RankSpec(3, budget="macs", input_shape=SHAPE),
         "joint": RankSpec(3, budget="joint", macs_ratio=2.5, input_shape=SHAPE)}


def random_batches(shape, classes, n=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def scores_config(**kw):
    base = dict(epochs=1, attack="pgd", eps=0.03, attack_steps=1, batch_size=16, optimizer="sgd", lr=1.0,
                weight_decay=0.0, check_size=0, progress=False)
    return TrainConfig(**{**base, **kw})


def resnet():
    torch.manual_seed(0)
    return bottleneck_resnet(10, 3, 8)


def every_kind():
    """A Tucker-2 conv, a tall 1x1 conv (SVD of a 10 x 6 weight), a tall and a wide linear."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 10, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))


@pytest.mark.parametrize("budget", sorted(SPECS))
def test_untrained_scores_give_the_energy_allocation_of_select_ranks(budget):
    model = resnet()
    learned = RankScoredModel(copy.deepcopy(model), SPECS[budget]).plan()
    selected = select_ranks(model, SPECS[budget])
    assert learned.layers == selected.layers and learned.method == "learned"
    assert (learned.params, learned.macs) == (selected.params, selected.macs)


@pytest.mark.parametrize("budget, counted", [("params", lambda m, shape: count_params(m)), ("macs", count_macs)])
def test_learned_ranks_meet_their_budget_within_two_percent(budget, counted):
    model = resnet()
    plan = learn_ranks(model, random_batches(SHAPE, 10), SPECS[budget], scores_config())
    assert plan.layers != select_ranks(model, SPECS[budget]).layers  # the scores moved the ranks
    factorised = decompose(model, plan)
    achieved = counted(model, SHAPE) / counted(factorised, SHAPE)
    target = SPECS[budget].ratio
    assert target <= achieved <= 1.02 * target
    assert count_params(factorised) == plan.params and count_macs(factorised, SHAPE) == plan.macs


def test_the_masked_weight_is_the_dense_weight_when_every_component_is_kept():
    model = every_kind()
    scored = RankScoredModel(copy.deepcopy(model), RankSpec(1.5, exclude=[]))
    modules = dict(model.named_modules())
    kinds = set()
    for layer, components in zip(scored.allocation.layers, scored.components):
        rebuilt = components.weight([torch.ones(len(s)) for s in components.shifts])
        torch.testing.assert_close(rebuilt, modules[layer.name].weight, rtol=0, atol=1e-5)
        kinds.add((layer.kind, rebuilt.dim(), getattr(components, "wide", None)))
    assert kinds == {("tucker2", 4, None), ("svd", 4, False), ("svd", 2, False), ("svd", 2, True)}


def test_the_scored_model_is_the_decomposition_at_its_current_ranks():
    model = every_kind().eval()
    scored = RankScoredModel(copy.deepcopy(model), RankSpec(2.5, exclude=[])).eval()
    plan = scored.plan()
    assert any(p.kind != "dense" and p.ranks != p.shape[:len(p.ranks)] for p in plan.layers.values())
    x = torch.rand(5, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(scored(x), decompose(model, plan).eval()(x), rtol=0, atol=1e-5)


class TwoLayers(nn.Module):
    """x (8) -> a -> b -> head (kept dense). ``a`` has singular values 10 (on x[0]) and 3 (on x[1]); ``b`` maps
    a's coordinate 1 to output 0 (singular value 10) and coordinate 0 to output 1 (5); the head reads output 0
    only, and the label is x[1] > 0.5: only a's second component carries what the loss needs."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 2)
        with torch.no_grad():
            for layer in (self.a, self.b, self.head):
                layer.weight.zero_()
            self.a.weight[0, 0], self.a.weight[1, 1] = 10.0, 3.0
            self.b.weight[0, 1], self.b.weight[1, 0] = 10.0, 5.0
            self.head.weight[1, 0] = 0.2
            self.head.bias.copy_(torch.tensor([0.0, -3.0]))

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def test_training_keeps_the_component_the_loss_needs():
    model = TwoLayers()
    # 2.2x leaves a and b three rank units together; by energy b gains more from its second (25 vs 9 of 100)
    energy = select_ranks(model, 2.2)
    assert (energy.layers["a"].ranks, energy.layers["b"].ranks) == ((1,), (2,))
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        x = torch.rand(32, 8, generator=g)
        batches.append((x, (x[:, 1] > 0.5).long()))
    plan = learn_ranks(model, batches, 2.2, scores_config(lr=0.5, attack_step=0.01))
    assert (plan.layers["a"].ranks, plan.layers["b"].ranks) == ((2,), (1,))
    assert plan.params <= energy.params


@pytest.mark.parametrize("ratio, settings, message", [
    pytest.param(RankSpec(4, method="uniform"), scores_config(), "use method='global'", id="uniform-method"),
    pytest.param(4, {"epochs": 1}, "config must be a cstar.TrainConfig", id="config-not-train-config"),
    pytest.param(400, scores_config(), "unreachable", id="unreachable-ratio"),
])
def test_bad_input_is_refused_in_one_line_before_any_training(ratio, settings, message):
    with pytest.raises(CstarError, match=message):
        learn_ranks(resnet(), random_batches(SHAPE, 10), ratio, settings)


def test_both_learned_methods_run_through_compare_at_the_ratio(tmp_path):
    train_set, test_set = data.load("digits", split="train").take(600), data.load("digits", split="test")
    two_epochs = dataclasses.replace(config().search, epochs=2)
    results = compare(dense_model(train_set), train_set, test_set,
                      config(methods=["lowrank_learned", "cstar_learned"], search=two_epochs, latency_runs=0),
                      tmp_path / "run", val_size=200)
    cells = tmp_path / "run" / "cells"
    for name in ("lowrank_learned-4x", "cstar_learned-4x"):
        assert 4.0 <= results["cells"][name]["params_ratio"] <= 4.0 * 1.02
        assert set(results["cells"][name]["train_seconds"]) == {"search", "finetune"}
    # lowrank_learned: one of the two search epochs learns the scores, the other trains the factors at those ranks
    assert len((cells / "lowrank_learned-4x" / "scores" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((cells / "lowrank_learned-4x" / "search" / "metrics.jsonl").read_text().splitlines()) == 1
    # cstar_learned: one of the two search epochs learns the scores, the other is ADMM's, at the learned ranks
    assert len((cells / "cstar_learned-4x" / "scores" / "metrics.jsonl").read_text().splitlines()) == 1
    assert len((cells / "cstar_learned-4x" / "cstar" / "search" / "metrics.jsonl").read_text().splitlines()) == 1
    assert '"method": "learned"' in (cells / "cstar_learned-4x" / "cstar" / "plan.json").read_text()


@pytest.mark.parametrize("method", ["cstar_learned", "lowrank_learned"])
def test_a_learned_rank_method_refuses_a_search_phase_it_cannot_split(tmp_path, method):
    train_set = data.load("digits", split="train")
    cfg = config()  # one search epoch
    cell = compressors.Cell(dense_model(train_set), 4.0, train_set, train_set, None, cfg.search, cfg.finetune,
                            cfg.admm, tmp_path / "c", 0)
    with pytest.raises(CstarError, match=f"{method} splits the search epochs.*use search epochs >= 2"):
        compressors.get(method)(cell)
    assert not (tmp_path / "c").exists()


def test_cstar_learned_refuses_admm_that_would_replace_its_ranks(tmp_path):
    train_set = data.load("digits", split="train")
    cfg = config(search=dataclasses.replace(config().search, epochs=2))
    cell = compressors.Cell(dense_model(train_set), 4.0, train_set, train_set, None, cfg.search, cfg.finetune,
                            dataclasses.replace(cfg.admm, reselect=2), tmp_path / "c", 0)
    with pytest.raises(CstarError, match="cstar_learned keeps its learned ranks: use admm reselect 0"):
        compressors.get("cstar_learned")(cell)
    assert not (tmp_path / "c").exists()
