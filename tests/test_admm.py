"""ADMM under low-rank constraints: penalty, Z/U steps, residuals, final projection."""

import pytest
import torch
import torch.nn as nn

from cstar import data
from cstar._core.errors import CstarError
from cstar.pipeline.admm import ADMM, ADMMConfig, project
from cstar.lowrank import RankSpec, decompose, select_ranks
from cstar.training.fit import TrainConfig, fit


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 16, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture()
def setup():
    torch.manual_seed(0)
    model = TinyNet()
    plan = select_ranks(model, 6.0, input_shape=(1, 8, 8))
    return model, plan


def test_plan_compresses_the_middle_layers(setup):
    _, plan = setup
    kinds = {name: layer.kind for name, layer in plan.layers.items()}
    assert kinds["conv2"] == "tucker2" and kinds["fc1"] == "svd"


def test_initial_z_is_the_projection_and_penalty_is_zero(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(rho=0.1), steps_per_epoch=10)
    layer = plan.layers["conv2"]
    torch.testing.assert_close(admm.Z["conv2"], project(model.conv2.weight.detach(), layer.kind, layer.ranks))
    w, z = model.conv2.weight.detach(), admm.Z["conv2"]
    expected = 0.05 * sum((m.weight.detach() - admm.Z[n]).pow(2).sum() for n, m in
                          (("conv2", model.conv2), ("fc1", model.fc1)))
    assert admm.penalty(model).item() == pytest.approx(expected.item(), rel=1e-5)
    assert (w - z).norm() > 0


def test_penalty_gradient_is_rho_times_w_minus_z_plus_u(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(rho=0.5), steps_per_epoch=10)
    admm.U["fc1"] = torch.randn_like(admm.U["fc1"])
    admm.penalty(model).backward()
    expected = 0.5 * (model.fc1.weight.detach() - admm.Z["fc1"] + admm.U["fc1"])
    torch.testing.assert_close(model.fc1.weight.grad, expected)


def test_decoupled_admm_adds_no_penalty_and_pulls_by_rho_after_each_step(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(rho=0.3, decoupled=True), steps_per_epoch=10)
    admm.U["fc1"] = torch.randn_like(admm.U["fc1"])
    w = model.fc1.weight.detach().clone()
    assert admm.penalty(model) is None
    admm.after_step(model, step=1)  # not a Z-step: the pull only
    torch.testing.assert_close(model.fc1.weight.detach(), w - 0.3 * (w - admm.Z["fc1"] + admm.U["fc1"]))


def test_decoupled_admm_residual_falls_under_adam():
    admm = _admm_run_on_digits(ADMMConfig(rho=0.02, rho_growth=1.5, rho_max=0.2, interval=11, decoupled=True),
                               epochs=6, optimizer="adam", lr=2e-3)
    means = [h["residual_mean"] for h in admm.history]
    assert len(means) >= 6 and means[-1] < 0.5 * means[0]


def test_z_and_u_steps_follow_the_updates(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(rho=0.1, rho_growth=2.0), steps_per_epoch=10)
    u_before = {n: u.clone() for n, u in admm.U.items()}
    with torch.no_grad():
        model.fc1.weight.add_(0.01)
    record = admm.z_step(model, step=10)
    w = model.fc1.weight.detach()
    layer = plan.layers["fc1"]
    z = project(w + u_before["fc1"], layer.kind, layer.ranks)
    torch.testing.assert_close(admm.Z["fc1"], z)
    torch.testing.assert_close(admm.U["fc1"], u_before["fc1"] + w - z)
    assert record["residual"]["fc1"] == pytest.approx(((w - z).norm() / w.norm()).item(), rel=1e-5)
    assert admm.rho == pytest.approx(0.2)


def test_after_step_runs_the_z_step_every_interval(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(interval=3), steps_per_epoch=100)
    for step in range(1, 10):
        admm.after_step(model, step)
    assert admm.z_steps == 3 and [h["step"] for h in admm.history] == [3, 6, 9]


def _admm_run_on_digits(admm_config: ADMMConfig, **train) -> ADMM:
    """ADMM-train a TinyNet at 6x on scikit-learn's digits (clean loss); return the ADMM state."""
    torch.manual_seed(0)
    model = TinyNet()
    loader = data.make_loader(data.load("digits", split="train"), 64, train=True, seed=0)
    admm = ADMM(model, select_ranks(model, 6.0, input_shape=(1, 8, 8)), admm_config, steps_per_epoch=len(loader))
    fit(model, loader, TrainConfig(attack="clean", batch_size=64, weight_decay=0.0, check_size=0, progress=False,
                                   **train), hooks=[admm])
    return admm


def test_a_residual_that_does_not_fall_is_warned_about():
    with pytest.warns(UserWarning, match="ADMM residual is not falling"):
        _admm_run_on_digits(ADMMConfig(rho=1e-6, interval=3), epochs=1, optimizer="sgd", lr=1e-3)


def test_residual_falls_over_a_short_admm_run():
    admm = _admm_run_on_digits(ADMMConfig(rho=0.05, rho_growth=1.5, interval=11), epochs=6, eps=0.1,
                               optimizer="adam", lr=2e-3)
    means = [h["residual_mean"] for h in admm.history]
    assert len(means) >= 6
    assert means[-1] < 0.5 * means[0]


def test_decomposition_after_the_final_projection_equals_the_projected_model(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(), steps_per_epoch=10)
    admm.project_weights(model)
    factorised = decompose(model, plan)
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(factorised(x), model(x), atol=1e-5, rtol=1e-4)
    assert all(r < 1e-5 for r in admm.residuals(model).values())


def test_state_round_trip(setup):
    model, plan = setup
    admm = ADMM(model, plan, ADMMConfig(interval=2), steps_per_epoch=10)
    admm.z_step(model, 2)
    other = ADMM(model, plan, ADMMConfig(interval=2), steps_per_epoch=10)
    other.load_state_dict(admm.state_dict())
    assert other.z_steps == 1 and other.rho == admm.rho
    torch.testing.assert_close(other.U["conv2"], admm.U["conv2"])


def test_reselection_replans_from_current_weights(setup):
    model, plan = setup
    kwargs = {"ratio": 6.0, "input_shape": (1, 8, 8)}
    admm = ADMM(model, plan, ADMMConfig(reselect=1), steps_per_epoch=10, rank_spec=RankSpec(**kwargs))
    with torch.no_grad():
        model.fc1.weight.mul_(torch.linspace(0.01, 1, 512))  # reshape the spectrum
    admm.z_step(model, 10)
    assert admm.plan.to_dict()["layers"] == select_ranks(model, **kwargs).to_dict()["layers"]
    assert set(admm.Z) == set(admm.U) == set(admm.names)


@pytest.mark.parametrize("bad", [dict(rho=0), dict(rho_growth=0.5), dict(interval=0), dict(rho=1.0, rho_max=0.1),
                                 dict(rho=0.1, rho_max=2.0, decoupled=True)])
def test_bad_config_values(bad):
    with pytest.raises(CstarError):
        ADMMConfig(**bad)


def test_unknown_config_key():
    with pytest.raises(CstarError, match="rhoo"):
        ADMMConfig.from_dict({"rhoo": 1.0})
