"""Tests for cstar.attacks on a tiny MLP trained on sklearn's 8x8 digits."""

import copy
import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cstar._core.errors import CstarError
from cstar._core.memory_format import channels_last_unsafe_convs, is_channels_last, to_channels_last
from cstar.attacks import AttackSpec, autoattack, fgsm, nfgsm, parse_attack, pgd

EPS = 0.1  # L-inf radius at which the tiny model is clearly but not totally broken
EPS_L2 = 0.5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: thread start-up and contention on shared CI cores cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_model():
    """(model in eval mode, x_test (N,1,8,8) in [0,1], y_test): ~97% clean accuracy."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=gen)
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for i in range(0, len(y_train), 100):
            opt.zero_grad()
            F.cross_entropy(model(x_train[i : i + 100]), y_train[i : i + 100]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    assert accuracy(model, x_test, y_test) > 0.9
    return model, x_test, y_test


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def perturbation_norms(x_adv, x, norm):
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


def reference_pgd(model, x, y, eps, step, steps, norm):
    """Independent textbook PGD from x itself (no random start), mean cross-entropy."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        with torch.no_grad():
            if norm == "linf":
                x_adv = torch.min(torch.max(x_adv + step * grad.sign(), x - eps), x + eps)
            else:
                grad_norm = grad.reshape(len(grad), -1).norm(dim=1).reshape(-1, 1, 1, 1)
                delta = x_adv + step * grad / (grad_norm + 1e-12) - x
                delta_norm = delta.reshape(len(delta), -1).norm(dim=1).reshape(-1, 1, 1, 1)
                x_adv = x + delta * torch.clamp(eps / (delta_norm + 1e-12), max=1.0)
            x_adv = x_adv.clamp(0.0, 1.0)
    return x_adv.detach()


BALL_ATTACKS = {
    "fgsm-linf": (lambda m, x, y: fgsm(m, x, y, EPS), "linf", EPS),
    "fgsm-l2": (lambda m, x, y: fgsm(m, x, y, EPS_L2, norm="l2"), "l2", EPS_L2),
    "fgsm-rs": (lambda m, x, y: fgsm(m, x, y, EPS, random_start=True), "linf", EPS),
    "pgd-linf": (lambda m, x, y: pgd(m, x, y, EPS, EPS / 4, 10), "linf", EPS),
    "pgd-l2": (lambda m, x, y: pgd(m, x, y, EPS_L2, EPS_L2 / 4, 10, norm="l2"), "l2", EPS_L2),
}


@pytest.mark.parametrize("name", list(BALL_ATTACKS))
def test_output_in_eps_ball_and_unit_box(data_model, name):
    model, x, y = data_model
    attack, norm, eps = BALL_ATTACKS[name]
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert perturbation_norms(x_adv, x, norm).max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_nfgsm_clips_to_box_but_not_to_eps_ball(data_model):
    model, x, y = data_model
    x_adv = nfgsm(model, x, y, EPS, generator=torch.Generator().manual_seed(0))
    linf = perturbation_norms(x_adv, x, "linf")
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    assert linf.max().item() <= 3 * EPS + 1e-6
    assert linf.max().item() > EPS + 1e-3  # no projection onto the eps-ball


def test_pgd_beats_fgsm_and_breaks_the_model(data_model):
    model, x, y = data_model
    clean = accuracy(model, x, y)
    fgsm_acc = accuracy(model, fgsm(model, x, y, EPS), y)
    pgd_acc = accuracy(model, pgd(model, x, y, EPS, EPS / 4, 20), y)
    assert pgd_acc <= fgsm_acc
    assert pgd_acc < clean - 0.4


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", EPS_L2)])
def test_agrees_with_independent_pgd(data_model, norm, eps):
    model, x, y = data_model
    ours = pgd(model, x, y, eps, eps / 4, 10, norm=norm, random_start=False)
    theirs = reference_pgd(model, x, y, eps, eps / 4, 10, norm)
    assert abs(accuracy(model, ours, y) - accuracy(model, theirs, y)) <= 0.01


def test_targeted_pgd_reaches_target_more_often(data_model):
    model, x, y = data_model
    target = (y + 1) % 10
    gen = torch.Generator().manual_seed(0)

    def hit_rate(x_adv):
        with torch.no_grad():
            return (model(x_adv).argmax(1) == target).float().mean().item()

    targeted = pgd(model, x, target, EPS, EPS / 4, 20, targeted=True, generator=gen)
    untargeted = pgd(model, x, y, EPS, EPS / 4, 20, generator=gen)
    assert hit_rate(targeted) > hit_rate(untargeted) + 0.1


def test_attack_works_under_no_grad(data_model):
    model, x, y = data_model
    with torch.no_grad():
        x_adv = pgd(model, x, y, EPS, EPS / 4, 5)
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


def test_custom_loss_trades_style(data_model):
    """loss_fn gets y as passed: here clean probabilities, as TRADES does with a KL loss."""
    model, x, _ = data_model
    with torch.no_grad():
        p_clean = F.softmax(model(x), dim=1)

    def kl(logits, p):
        return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="sum")

    x_adv = pgd(model, x, p_clean, EPS, EPS / 4, 10, loss_fn=kl, generator=torch.Generator().manual_seed(0))
    assert perturbation_norms(x_adv, x, "linf").max().item() <= EPS + 1e-6
    with torch.no_grad():
        assert kl(model(x_adv), p_clean).item() / len(x) > 0.5


class ModeProbe(nn.Module):
    """Identity that records its training flag at each forward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


@pytest.mark.parametrize("mode,expected", [("eval", False), ("train", True), ("keep", None)])
def test_model_mode_applied_then_restored(data_model, mode, expected):
    model = copy.deepcopy(data_model[0])
    x, y = data_model[1][:64], data_model[2][:64]
    probe = ModeProbe()
    wrapped = nn.Sequential(probe, model)
    wrapped.train()
    model[2].eval()  # mixed state: BatchNorm frozen inside a training model
    flags = [m.training for m in wrapped.modules()]
    pgd(wrapped, x, y, EPS, EPS / 4, 3, model_mode=mode)
    assert set(probe.seen) == {True if expected is None else expected}
    assert [m.training for m in wrapped.modules()] == flags


def test_eval_mode_leaves_batchnorm_stats_and_grads_alone(data_model):
    model = copy.deepcopy(data_model[0])
    x, y = data_model[1], data_model[2]
    model.train()
    bn = model[2]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), sentinel):
        p.grad = g
    pgd(model, x, y, EPS, EPS / 4, 5)
    fgsm(model, x, y, EPS)
    nfgsm(model, x, y, EPS)
    assert model.training
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])
    for p, g in zip(model.parameters(), sentinel):
        assert p.grad is g and bool((g == 7.0).all())


def test_model_mode_restored_when_forward_raises(data_model):
    model = copy.deepcopy(data_model[0])

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    wrapped = nn.Sequential(model, Boom()).train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(wrapped, data_model[1][:8], data_model[2][:8], EPS, EPS / 4, 2)
    assert all(m.training for m in wrapped.modules())


def test_bfloat16_autocast_on_cpu(data_model):
    model, x, y = data_model
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x_amp = pgd(model, x, y, EPS, EPS / 4, 10, amp_dtype=torch.bfloat16, generator=gen())
    x_fp32 = pgd(model, x, y, EPS, EPS / 4, 10, generator=gen())
    assert x_amp.dtype == torch.float32
    assert perturbation_norms(x_amp, x, "linf").max().item() <= EPS + 1e-6
    assert x_amp.min().item() >= 0.0 and x_amp.max().item() <= 1.0
    assert abs(accuracy(model, x_amp, y) - accuracy(model, x_fp32, y)) <= 0.05


@pytest.fixture(scope="module")
def conv_data_model(data_model):
    """(conv model in eval mode, x_test (N,1,8,8), y_test): the digits through two convs, ~95% clean accuracy."""
    _, x, y = data_model
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for i in range(0, len(y), 100):
            opt.zero_grad()
            F.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    assert accuracy(model, x, y) > 0.9
    return model, x, y


def conv_input_layouts(model, attack):
    """The memory format of every input the model's first conv sees while ``attack()`` runs."""
    seen = []
    hook = model[0].register_forward_pre_hook(
        lambda _, inputs: seen.append(is_channels_last(inputs[0])))
    try:
        result = attack()
    finally:
        hook.remove()
    return seen, result


def test_attack_runs_in_channels_last_on_cpu_and_returns_the_callers_layout(conv_data_model):
    model, x, y = conv_data_model
    seen, x_adv = conv_input_layouts(model, lambda: pgd(model, x, y, EPS, EPS / 4, 3))
    assert seen and all(seen)
    assert x_adv.is_contiguous()  # NCHW in, NCHW out
    assert x_adv.stride() == x.stride()
    x_last = to_channels_last(x)
    assert is_channels_last(pgd(model, x_last, y, EPS, EPS / 4, 3))


def test_channels_last_attack_matches_the_nchw_attack(conv_data_model, monkeypatch):
    model, x, y = conv_data_model
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x_last = pgd(model, x, y, EPS, EPS / 4, 10, generator=gen())
    monkeypatch.setattr("cstar.attacks._gradient.attack_in_channels_last", lambda model, x: False)
    seen, x_nchw = conv_input_layouts(model, lambda: pgd(model, x, y, EPS, EPS / 4, 10, generator=gen()))
    assert not any(seen)
    # the same steps up to the order of float32 sums: a sign may flip where a gradient is ~0
    assert (x_last - x_nchw).abs().le(1e-6).float().mean().item() > 0.99
    assert abs(accuracy(model, x_last, y) - accuracy(model, x_nchw, y)) <= 2 / len(y)


def test_channels_last_unsafe_convs_names_the_strided_1x1_convs_with_few_input_channels():
    model = nn.Sequential(nn.Conv2d(5, 9, 1, stride=2), nn.Conv2d(9, 16, 1), nn.Conv2d(16, 16, 1, stride=2),
                          nn.Conv2d(16, 4, 3, stride=2))
    assert channels_last_unsafe_convs(model) == ["0"]


def test_attack_on_a_model_onednn_mis_trains_in_channels_last_stays_nchw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(5, 9, 1, stride=2), nn.Flatten(), nn.Linear(9 * 4 * 4, 3)).eval()
    x, y = torch.rand(4, 5, 8, 8), torch.tensor([0, 1, 2, 0])
    seen, _ = conv_input_layouts(model, lambda: pgd(model, x, y, EPS, EPS / 4, 2))
    assert seen and not any(seen)


def test_generator_makes_random_start_reproducible(data_model):
    model, x, y = data_model
    runs = [
        pgd(model, x, y, EPS, EPS / 4, 3, generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_restarts_keep_every_sample_the_first_run_fooled(data_model):
    model, x, y = data_model
    one = pgd(model, x, y, EPS, EPS / 4, 5, generator=torch.Generator().manual_seed(3))
    three = pgd(model, x, y, EPS, EPS / 4, 5, restarts=3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fooled_one = model(one).argmax(1) != y
        fooled_three = model(three).argmax(1) != y
    assert torch.equal(three[fooled_one], one[fooled_one])  # first run kept where it fooled
    assert bool(fooled_three[fooled_one].all())
    assert fooled_three.sum() > fooled_one.sum()
    assert perturbation_norms(three, x, "linf").max().item() <= EPS + 1e-6


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, x, y: pgd(m, x, y, -0.1, 0.01, 10), "eps"),
        (lambda m, x, y: pgd(m, x, y, float("nan"), 0.01, 10), "eps"),
        (lambda m, x, y: pgd(m, x, y, float("inf"), 0.01, 10), "eps"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.0, 10), "step"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 0), "steps"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 2.5), "steps"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 10, norm="l1"), "norm"),
        (lambda m, x, y: fgsm(m, x, y, EPS, norm="Linf"), "norm"),
        (lambda m, x, y: fgsm(m, x, y, EPS, step=-1.0), "step"),
        (lambda m, x, y: nfgsm(m, x, y, EPS, noise=-1.0), "noise"),
        (lambda m, x, y: pgd(m, x * 255, y, EPS, 0.01, 10), r"\[0, 1\]"),
        (lambda m, x, y: pgd(m, x - 0.5, y, EPS, 0.01, 10), "clip"),
        (lambda m, x, y: pgd(m, x, y[:-1], EPS, 0.01, 10), "y must"),
        (lambda m, x, y: pgd(m, x.long(), y, EPS, 0.01, 10), "floating-point"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 10, clip=(1.0, 0.0)), "clip"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 10, model_mode="inference"), "model_mode"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 10, amp_dtype="bf16"), "amp_dtype"),
        (lambda m, x, y: pgd(m, x, y, EPS, 0.01, 10, restarts=2, random_start=False), "random_start"),
        (lambda m, x, y: autoattack(m, x, y, EPS, version="custom"), "custom"),
        (lambda m, x, y: autoattack(m, x, y, EPS, attacks=["apgd-ce"]), "custom"),
        (lambda m, x, y: autoattack(m, x, y, EPS, version="custom", attacks=["pgd"]), "apgd-ce"),
        (lambda m, x, y: autoattack(m, x, y, EPS, version="fast"), "version"),
        (lambda m, x, y: autoattack(m, x, y, EPS, norm="L2"), "norm"),
    ],
)
def test_bad_arguments_raise_cstar_error(data_model, call, match):
    model, x, y = data_model
    with pytest.raises(CstarError, match=match) as info:
        call(model, x[:4], y[:4])
    assert "\n" not in str(info.value)


def test_autoattack_apgd_ce_at_least_as_strong_as_pgd(data_model):
    pytest.importorskip("pyautoattack")
    model, x, y = data_model[0], data_model[1][:32], data_model[2][:32]
    x_adv = autoattack(model, x, y, EPS, version="custom", attacks=["apgd-ce"])
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert perturbation_norms(x_adv, x, "linf").max().item() <= EPS + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    pgd_acc = accuracy(model, pgd(model, x, y, EPS, EPS / 4, 20), y)
    assert accuracy(model, x_adv, y) <= pgd_acc + 1 / 32


def test_autoattack_contains_side_effects(data_model, monkeypatch):
    """A fake pyautoattack misbehaving like the real one: the adapter undoes it all."""
    calls = {}

    class FakeAutoAttack:
        def __init__(self, model, *, attacks=None, device="cpu", eps=0.3, norm="Linf", seed=None, version="standard"):
            calls.update(attacks=attacks, device=device, eps=eps, norm=norm, seed=seed, version=version)
            self.model = model

        def run_standard_evaluation(self, x, y, /, *, batch_size=250, state_path=None):
            calls.update(training=self.model.training, batch_size=batch_size)
            torch.manual_seed(1234)
            sys.settrace(None)
            logging.getLogger("auto-attack").info("robust accuracy: 0%")
            xr = x.clone().requires_grad_(True)
            self.model(xr).sum().backward()
            calls["param_grads"] = [p.grad for p in self.model.parameters()]
            return (x + 0.01).clamp(0, 1).double(), y

    monkeypatch.setitem(sys.modules, "pyautoattack", types.SimpleNamespace(AutoAttack=FakeAutoAttack))
    model = copy.deepcopy(data_model[0]).train()
    x, y = data_model[1][:8], data_model[2][:8]
    rng = torch.get_rng_state()
    trace = sys.gettrace()
    messages = []
    x_adv = autoattack(model, x, y, EPS, norm="l2", batch_size=5, seed=7, log=messages.append)
    assert calls["norm"] == "L2" and calls["eps"] == EPS and calls["seed"] == 7 and calls["batch_size"] == 5
    assert calls["device"] == x.device and calls["version"] == "standard" and calls["attacks"] is None
    assert calls["training"] is False and model.training
    assert calls["param_grads"] == [None] * len(calls["param_grads"])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert sys.gettrace() is trace
    assert messages == ["robust accuracy: 0%"]
    assert x_adv.dtype == x.dtype and torch.allclose(x_adv, (x + 0.01).clamp(0, 1))


def test_autoattack_without_package_names_the_extra(data_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # makes the import fail
    model, x, y = data_model
    with pytest.raises(CstarError, match=r"pip install 'cstar\[autoattack\]'"):
        autoattack(model, x[:4], y[:4], EPS)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("fgsm", AttackSpec("fgsm", EPS)),
        ("FGSM-RS", AttackSpec("fgsm", EPS, random_start=True)),
        ("nfgsm", AttackSpec("nfgsm", EPS)),
        ("pgd20", AttackSpec("pgd", EPS, steps=20)),
        (" pgd40 ", AttackSpec("pgd", EPS, steps=40)),
        ("pgd50x5", AttackSpec("pgd", EPS, steps=50, restarts=5)),
        ("aa", AttackSpec("autoattack", EPS)),
        ("autoattack", AttackSpec("autoattack", EPS)),
    ],
)
def test_parse_attack_forms_and_label_round_trip(text, expected):
    spec = parse_attack(text, EPS)
    assert spec == expected
    assert parse_attack(spec.label, EPS) == spec


def test_parse_attack_passes_norm_and_step_and_labels():
    spec = parse_attack("pgd10", 0.5, norm="l2", step=0.1)
    assert (spec.norm, spec.step, spec.steps, spec.label) == ("l2", 0.1, 10, "pgd10")
    assert [parse_attack(t, EPS).label for t in ("fgsm", "aa", "pgd7x2")] == ["fgsm", "autoattack", "pgd7x2"]


@pytest.mark.parametrize("text", ["pgd", "cw", "pgd-20", "fgsm2", ""])
def test_parse_attack_rejects_unknown_forms(text):
    with pytest.raises(CstarError, match="pgd<steps>"):
        parse_attack(text, EPS)


def test_parse_attack_rejects_zero_steps():
    with pytest.raises(CstarError, match="steps must be an integer >= 1"):
        parse_attack("pgd0", EPS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(name="deepfool", eps=EPS),
        dict(name="pgd", eps=-1.0),
        dict(name="fgsm", eps=EPS, steps=10),
        dict(name="nfgsm", eps=EPS, norm="l2"),
        dict(name="autoattack", eps=EPS, step=0.01),
        dict(name="nfgsm", eps=EPS, random_start=True),
        dict(name="pgd", eps=EPS, steps=10, norm="l1"),
    ],
)
def test_attack_spec_rejects_bad_settings(kwargs):
    with pytest.raises(CstarError):
        AttackSpec(**kwargs)


def test_attack_spec_call_matches_the_function(data_model):
    model, x, y = data_model
    spec = parse_attack("pgd10", EPS)
    via_spec = spec(model, x, y, generator=torch.Generator().manual_seed(0))
    direct = pgd(model, x, y, EPS, EPS / 4, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(via_spec, direct)
    assert torch.equal(parse_attack("fgsm", EPS)(model, x, y), fgsm(model, x, y, EPS))
