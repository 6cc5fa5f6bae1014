"""Well-conditioned factorised layers: condition numbers, the conditioning penalty, its use in training, ADMM
and the ``lowrank_conditioned`` compared method."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from cstar import LowRankConv1x1, LowRankLinear, Tucker2Conv2d, condition_numbers, conditioning_penalty, data
from cstar._core.errors import CstarError
from cstar.lowrank import select_ranks
from cstar.pipeline.admm import ADMM, ADMMConfig
from cstar.pipeline.compare import compare
from cstar.training.fit import TrainConfig, fit

from test_compare import TRAIN, config as compare_config, dense_model


def operator(layer) -> np.ndarray:
    """The layer's dense weight as a (C_out, C_in*kh*kw) numpy matrix, multiplied out in numpy."""
    first, last = layer.first.weight.detach().double().numpy(), layer.last.weight.detach().double().numpy()
    if isinstance(layer, Tucker2Conv2d):
        core = layer.core.weight.detach().double().numpy()
        dense = np.einsum("oa,abhw,bi->oihw", last[:, :, 0, 0], core, first[:, :, 0, 0])
        return dense.reshape(dense.shape[0], -1)
    return last.reshape(last.shape[0], -1) @ first.reshape(first.shape[0], -1)


def with_spectrum(layer: LowRankLinear, values) -> LowRankLinear:
    """``layer`` set to the operator ``Q_out diag(values) Q_in^T`` (random orthonormal Q's), split as ``last = Q_out
    diag(values)``, ``first = Q_in^T``."""
    generator = torch.Generator().manual_seed(1)
    shape_out, shape_in = (layer.last.weight.shape[0], len(values)), (layer.first.weight.shape[1], len(values))
    q_out = torch.linalg.qr(torch.randn(*shape_out, generator=generator, dtype=torch.float64)).Q
    q_in = torch.linalg.qr(torch.randn(*shape_in, generator=generator, dtype=torch.float64)).Q
    with torch.no_grad():
        layer.last.weight.copy_(q_out * torch.tensor(values, dtype=torch.float64))
        layer.first.weight.copy_(q_in.T)
    return layer


@pytest.mark.parametrize("layer", [Tucker2Conv2d(3, 4, 3, (4, 2)), LowRankConv1x1(6, 4, 4), LowRankLinear(6, 4, 4)],
                         ids=["tucker2", "conv1x1", "linear"])
def test_condition_numbers_agree_with_numpys_cond_of_the_layers_operator(layer):
    torch.manual_seed(0)
    for p in layer.parameters():
        nn.init.normal_(p)
    # inner ranks that span the operator's rows: its condition number is np.linalg.cond's
    assert condition_numbers(nn.Sequential(layer))["0"] == pytest.approx(np.linalg.cond(operator(layer)), rel=1e-9)


def test_a_low_rank_operators_condition_number_is_over_its_nonzero_singular_values():
    torch.manual_seed(0)
    layer = LowRankLinear(8, 6, 2)
    values = np.linalg.svd(operator(layer), compute_uv=False)
    assert np.linalg.cond(operator(layer)) > 1e10  # the full spectrum's ratio is that of rounding errors
    assert condition_numbers(layer)[""] == pytest.approx(values[0] / values[1], rel=1e-9)


def numpy_penalty(model: nn.Module, max_condition: float) -> float:
    """The conditioning penalty, computed independently in numpy."""
    total = 0.0
    for layer in model.modules():
        if not isinstance(layer, (Tucker2Conv2d, LowRankConv1x1, LowRankLinear)):
            continue
        if isinstance(layer, Tucker2Conv2d):
            for factor in (layer.first.weight.detach().double().numpy()[:, :, 0, 0].T,
                           layer.last.weight.detach().double().numpy()[:, :, 0, 0]):
                total += np.sum((factor.T @ factor - np.eye(factor.shape[1])) ** 2)
        rank = layer.core.weight.shape[0] if isinstance(layer, Tucker2Conv2d) else layer.rank
        values = np.linalg.svd(operator(layer), compute_uv=False)[:rank]
        total += max(0.0, 1 - max_condition * values[-1] / values[0]) ** 2
    return total


def factorised_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Tucker2Conv2d(3, 5, 3, (3, 2), padding=1), nn.ReLU(), LowRankConv1x1(5, 4, 2), nn.Flatten(),
                         LowRankLinear(4 * 4 * 4, 10, 3)).double()


def test_the_penalty_equals_an_independent_numpy_computation():
    model = factorised_net()
    expected = numpy_penalty(model, 1.5)
    assert expected > 1.0  # both terms are at work
    assert conditioning_penalty(model, 1.5).item() == pytest.approx(expected, rel=1e-9)


class Penalty(nn.Module):
    """The conditioning penalty of ``net`` as a module's output, for torch.func.functional_call."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self) -> torch.Tensor:
        return conditioning_penalty(self.net, 1.5)


def test_the_penalty_gradient_passes_gradcheck():
    penalty = Penalty(factorised_net())
    names, params = zip(*penalty.named_parameters())

    def of(*values):
        return torch.func.functional_call(penalty, dict(zip(names, values)), ())

    assert torch.autograd.gradcheck(of, tuple(p.detach().clone().requires_grad_() for p in params))


def test_the_penalty_is_zero_for_orthonormal_factors_within_the_condition_bound():
    torch.manual_seed(0)
    tucker = Tucker2Conv2d(6, 5, 3, (3, 2)).double()
    with torch.no_grad():  # orthonormal factors; a core unfolding with singular values 2, 1.5 and 1
        tucker.first.weight.copy_(torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64)).Q.T[:, :, None, None])
        tucker.last.weight.copy_(torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64)).Q[:, :, None, None])
        q_left = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64)).Q
        q_right = torch.linalg.qr(torch.randn(18, 3, dtype=torch.float64)).Q
        tucker.core.weight.copy_((q_left @ torch.diag(torch.tensor([2.0, 1.5, 1.0]).double()) @ q_right.T)
                                 .reshape(3, 2, 3, 3))
    linear = with_spectrum(LowRankLinear(7, 6, 3).double(), [3.0, 2.0, 1.5])
    model = nn.Sequential(tucker, linear)
    assert conditioning_penalty(model, 2.0).item() == pytest.approx(0.0, abs=1e-20)
    assert conditioning_penalty(model, 1.9).item() > 0  # the Tucker layer's condition number 2 is above 1.9


def test_training_with_the_penalty_lowers_an_ill_conditioned_layers_condition_number():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(256, 1, 8, 8, generator=generator), torch.randint(0, 10, (256,), generator=generator)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]

    def trained(weight: float) -> float:
        model = nn.Sequential(nn.Flatten(), with_spectrum(LowRankLinear(64, 10, 5), [1.0, 0.5, 0.1, 0.01, 0.001]))
        fit(model, batches, TrainConfig(attack="clean", epochs=3, lr=0.05, weight_decay=0.0, check_size=0,
                                        progress=False, condition_weight=weight, max_condition=10.0))
        return condition_numbers(model)["1"]

    unconditioned, conditioned = trained(0.0), trained(1.0)  # both start at 1000
    assert conditioned < 10 * 1.05 and conditioned < unconditioned / 5


def test_admm_bounds_the_constrained_layers_leading_singular_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                          nn.Linear(8 * 64, 32), nn.Linear(32, 10))
    plan = select_ranks(model, 4.0, input_shape=(1, 8, 8))
    plain = ADMM(model, plan, ADMMConfig(rho=0.1), steps_per_epoch=10)
    conditioned = ADMM(model, plan, ADMMConfig(rho=0.1), steps_per_epoch=10, condition_weight=0.5, max_condition=1.1)
    expected = 0.0
    for name in plain.names:
        weight = model.get_submodule(name).weight.detach().double().numpy()
        layer = plan.layers[name]
        rank = min(layer.ranks[0], layer.ranks[1] * 9) if layer.kind == "tucker2" else layer.ranks[0]
        values = np.linalg.svd(weight.reshape(weight.shape[0], -1), compute_uv=False)[:rank]
        expected += max(0.0, 1 - 1.1 * values[-1] / values[0]) ** 2
    assert expected > 0
    added = conditioned.penalty(model).item() - plain.penalty(model).item()
    assert added == pytest.approx(0.5 * expected, rel=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(condition_weight=-0.1), "condition_weight must be a number >= 0"),
    (lambda: TrainConfig(max_condition=1.0), "max_condition must be a number > 1"),
    (lambda: conditioning_penalty(factorised_net(), 0.5), "max_condition must be a number > 1"),
    (lambda: ADMM(nn.Linear(4, 4), None, ADMMConfig(), 1, condition_weight=float("nan")), "condition_weight"),
])
def test_bad_conditioning_settings_are_refused(make, message):
    with pytest.raises(CstarError, match=message):
        make()


def test_lowrank_conditioned_runs_in_compare_and_records_condition_numbers_before_and_after(tmp_path):
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    quick = TrainConfig(**{**TRAIN, "attack": "clean", "epochs": 1})
    settings = compare_config(methods=["lowrank_conditioned"], search=quick, finetune=quick, latency_runs=0,
                              eval_attacks=["clean"], eval_n=50)
    results = compare(dense_model(train_set), train_set, test_set, settings, tmp_path / "run", val_size=200)
    cell = results["cells"]["lowrank_conditioned-4x"]
    assert cell["params_ratio"] >= 4.0 * 0.99
    record = cell["conditioning"]
    assert record["before"] and set(record["before"]) == set(record["after"])
    assert all(1 <= value < math.inf for value in [*record["before"].values(), *record["after"].values()])
    assert record["before"] != record["after"]  # the factors were trained
