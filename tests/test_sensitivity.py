"""Robustness-aware ranks: each layer's sensitivity of the adversarial loss, and the allocation it weighs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cstar import attacks
from cstar._core.errors import CstarError
from cstar.lowrank import RankSpec, layer_sensitivity, select_ranks
from cstar.models import create


def _two_linears(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Linear(6, 3))


def _batches(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 3, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def _closed_form(model, batches):
    """sum_i (g_i W_i)^2 per layer for logits = B (A x + a) + b, gradients written out by hand, batch means."""
    a, b = model[1], model[2]
    totals = torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        x = x.flatten(1).double()
        hidden = x @ a.weight.double().T + a.bias.double()
        logits = hidden @ b.weight.double().T + b.bias.double()
        g_logits = (torch.softmax(logits, 1) - F.one_hot(y, 3).double()) / len(y)  # d mean-CE / d logits
        g_b = g_logits.T @ hidden
        g_a = (g_logits @ b.weight.double()).T @ x
        totals += torch.stack([((g_a * a.weight.double()) ** 2).sum(), ((g_b * b.weight.double()) ** 2).sum()])
    mean = totals / len(batches)
    return (mean / mean.mean()).tolist()


def test_clean_sensitivity_matches_the_gradients_written_out():
    model, batches = _two_linears(), _batches()
    got = layer_sensitivity(model, batches, eps=0.0)
    assert list(got) == ["1", "2"]
    assert list(got.values()) == pytest.approx(_closed_form(model, batches), rel=1e-5)


def test_adversarial_sensitivity_is_taken_on_the_pgd_examples():
    model, batches = _two_linears(), _batches(n=1)
    torch.manual_seed(7)
    got = layer_sensitivity(model, batches, eps=0.1, steps=3)
    torch.manual_seed(7)  # the same random start
    x, y = batches[0]
    x_adv = attacks.pgd(model, x, y, 0.1, 2.5 * 0.1 / 3, 3)
    assert list(got.values()) == pytest.approx(_closed_form(model, [(x_adv, y)]), rel=1e-5)
    assert list(got.values()) != pytest.approx(_closed_form(model, batches), rel=1e-3)  # not the clean loss


def test_sensitivity_uses_at_most_max_batches():
    model, batches = _two_linears(), _batches(n=3)
    assert layer_sensitivity(model, batches, 0.0, max_batches=2) == pytest.approx(
        layer_sensitivity(model, batches[:2], 0.0))


def test_sensitivity_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(48, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_sensitivity(model, _batches(), eps=0.1, steps=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics too


@pytest.mark.parametrize("kwargs, message", [
    (dict(eps=2.0), "eps=2.0 must be in"), (dict(eps=0.1, max_batches=0), "must be integers >= 1"),
])
def test_bad_sensitivity_arguments_are_refused(kwargs, message):
    with pytest.raises(CstarError, match=message):
        layer_sensitivity(_two_linears(), _batches(), **kwargs)


def test_an_empty_loader_is_refused():
    with pytest.raises(CstarError, match="got no batch"):
        layer_sensitivity(_two_linears(), [], eps=0.0)


@pytest.mark.parametrize("ratio", [4, 16])
def test_weighted_ranks_meet_their_budget(ratio):
    model = create("resnet18", 10, width=16)
    weights = {name: 1.0 + (i % 5) for i, (name, m) in enumerate(model.named_modules())
               if isinstance(m, (nn.Conv2d, nn.Linear))}
    plan = select_ranks(model, ratio, layer_weights=weights)
    assert ratio <= plan.achieved_ratio <= 1.02 * ratio


def test_equal_weights_give_the_unweighted_plan():
    model = create("resnet18", 10, width=16)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    plain, weighted = select_ranks(model, 8), select_ranks(model, 8, layer_weights={n: 3.0 for n in names})
    assert {n: p.ranks for n, p in plain.layers.items()} == {n: p.ranks for n, p in weighted.layers.items()}


def test_a_heavier_layer_keeps_more_of_its_energy():
    model = create("resnet18", 10, width=16)
    plain = select_ranks(model, 16)
    layer = "stages.2.0.conv2"
    weighted = select_ranks(model, 16, layer_weights={layer: 20.0})
    assert weighted.layers[layer].energy > plain.layers[layer].energy
    others = [n for n in plain.layers if n != layer]
    assert sum(weighted.layers[n].params for n in others) < sum(plain.layers[n].params for n in others)


def test_sensitivity_weights_feed_select_ranks():
    model = create("small_cnn", 3, in_channels=1, input_size=8)
    batches = [(torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,)))]
    plan = select_ranks(model, 4, layer_weights=layer_sensitivity(model, batches, eps=0.1, steps=2))
    assert 4 <= plan.achieved_ratio


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer_weights={"nope": 1.0}), "'nope', which are not Conv2d or Linear"),
    (dict(layer_weights={"stages.0.0.conv1": 0.0}), "positive finite weight"),
    (dict(layer_weights={"stages.0.0.conv1": float("nan")}), "positive finite weight"),
    (dict(layer_weights="stages"), "positive finite weight"),
    (dict(layer_weights={"stages.0.0.conv1": 2.0}, method="uniform"), "method='uniform' has none"),
])
def test_bad_layer_weights_are_refused(kwargs, message):
    with pytest.raises(CstarError, match=message):
        select_ranks(create("resnet18", 10, width=16), 8, **kwargs)


def test_a_weighted_spec_round_trips_through_its_dict():
    spec = RankSpec(8, layer_weights={"b": 2.0, "a": 0.5})
    assert spec.layer_weights == (("a", 0.5), ("b", 2.0))
    assert RankSpec(**spec.to_dict()) == spec
