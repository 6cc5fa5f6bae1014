"""Adversarial training loop: schedules, config checks, methods, checkpoints, resume, guards."""

import json
import warnings

import pytest
import torch
import torch.nn as nn

from cstar import TrainHook, data
from cstar._core.errors import CstarError
from cstar.training import fit as train
from cstar.training.fit import TrainConfig, fit, lr_factor


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits():
    train_set = data.load("digits", split="train")
    test_set = data.load("digits", split="test")
    return train_set, test_set


def as_float(ds):
    return ds.images.float() / 255, ds.labels


def config(**kw):
    base = dict(attack="pgd", epochs=2, batch_size=64, eps=0.1, attack_steps=3, optimizer="adam", lr=3e-3,
                weight_decay=0.0, check_size=100, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def test_cosine_schedule_starts_at_peak_and_ends_near_zero():
    cfg = config(schedule="cosine", epochs=4)
    assert lr_factor(cfg, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cfg, 39, 10) < 0.01
    assert lr_factor(cfg, 20, 10) == pytest.approx(0.5, abs=0.02)


def test_onecycle_peaks_at_forty_percent():
    cfg = config(schedule="onecycle", epochs=10)
    values = [lr_factor(cfg, s, 10) for s in range(100)]
    assert max(values) == pytest.approx(1.0)
    assert values.index(max(values)) == 40
    assert values[0] == 0.0 and values[-1] < 0.03


def test_warmup_ramps_linearly():
    cfg = config(schedule="constant", warmup_epochs=1, epochs=3)
    assert lr_factor(cfg, 0, 10) == pytest.approx(0.1)
    assert lr_factor(cfg, 4, 10) == pytest.approx(0.5)
    assert lr_factor(cfg, 25, 10) == 1.0


def test_multistep_divides_by_ten_at_half_and_three_quarters():
    cfg = config(schedule="multistep", epochs=4)
    assert [lr_factor(cfg, s, 10) for s in (0, 20, 30)] == pytest.approx([1.0, 0.1, 0.01])


@pytest.mark.parametrize("bad", [dict(attack="madry"), dict(eps=2.0), dict(eps=float("nan")), dict(lr=0),
                                 dict(epochs=0), dict(schedule="step"), dict(attack="pgd", eps=0.0)])
def test_bad_config_values_raise_cstar_error(bad):
    with pytest.raises(CstarError):
        config(**bad)


def test_unknown_config_key_is_named():
    with pytest.raises(CstarError, match="epoch_count"):
        TrainConfig.from_dict({"epoch_count": 3})


def test_default_step_sizes_follow_the_method():
    assert config(attack="pgd", eps=8 / 255, attack_steps=10).step_size() == pytest.approx(2 / 255)
    assert config(attack="fgsm_rs", eps=0.1).step_size() == pytest.approx(0.125)
    assert config(attack="nfgsm", eps=0.1).step_size() == pytest.approx(0.1)


def train_and_check(train_set, test_set, method):
    """(clean, PGD-10) test accuracy of the tiny model after 6 epochs of ``method``."""
    model = tiny_model()
    fit(model, data.make_loader(train_set, 64, train=True, seed=0), config(attack=method, epochs=6, check_size=0))
    x, y = as_float(test_set)
    return train.robust_check(model, x, y, eps=0.1, steps=10)


@pytest.fixture(scope="module")
def clean_trained(digits):
    return train_and_check(*digits, "clean")


@pytest.mark.parametrize("method", ["pgd", "fgsm_rs", "nfgsm", "trades"])
def test_each_method_makes_the_model_more_robust_than_clean_training(digits, clean_trained, method):
    clean, robust = train_and_check(*digits, method)
    assert clean_trained[0] > 0.8  # clean training learns the task
    assert clean > 0.6
    assert robust > clean_trained[1] + 0.05


def test_fit_writes_metrics_and_checkpoint_each_epoch(digits, tmp_path):
    train_set, test_set = digits
    loader = data.make_loader(train_set, 64, train=True, seed=0)
    history = fit(tiny_model(), loader, config(epochs=2), val=as_float(test_set), out_dir=tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert {"val_clean", "val_pgd", "train_loss", "images_per_second"} <= set(history[-1])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and (tmp_path / "best.pt").exists()
    assert not list(tmp_path.glob("*.tmp"))


class _Hooked:
    """Wraps a loader: calls ``on_epoch(epoch)`` at each ``set_epoch``; raises KeyboardInterrupt
    (a simulated kill) when epoch ``kill_at`` starts."""

    def __init__(self, loader, on_epoch=None, kill_at=None):
        self.loader, self.on_epoch, self.kill_at, self.epoch = loader, on_epoch, kill_at, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch
        if self.on_epoch:
            self.on_epoch(epoch)
        self.loader.set_epoch(epoch)

    def __iter__(self):
        if self.epoch == self.kill_at:
            raise KeyboardInterrupt
        return iter(self.loader)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits, tmp_path):
    train_set, test_set = digits
    val = as_float(test_set)
    full = tiny_model()
    fit(full, data.make_loader(train_set, 64, train=True, seed=0), config(epochs=3), val=val, out_dir=tmp_path / "a")

    killed = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), _Hooked(data.make_loader(train_set, 64, train=True, seed=0), kill_at=2), config(epochs=3),
            val=val, out_dir=killed)
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["epoch"] == 2
    resumed = tiny_model(seed=1)
    fit(resumed, data.make_loader(train_set, 64, train=True, seed=0), config(epochs=3), val=val, out_dir=killed,
        resume=True)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)

    def losses(path):
        return [(r["epoch"], r["train_loss"]) for r in map(json.loads, path.read_text().splitlines())]

    assert losses(killed / "metrics.jsonl") == losses(tmp_path / "a" / "metrics.jsonl")


def test_divergence_stops_with_a_clear_error(digits, tmp_path):
    train_set, _ = digits
    loader = data.make_loader(train_set, 64, train=True, seed=0)
    model = tiny_model()
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    with pytest.raises(CstarError, match="diverged at epoch 1, step 1"):
        fit(model, loader, config(), out_dir=tmp_path)


def _snapshotting_loader(model, train_set, snapshots, **kw):
    def snap(epoch):
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    return _Hooked(data.make_loader(train_set, 64, train=True, seed=0), on_epoch=snap, **kw)


def test_overfit_guard_stops_and_restores_the_best_epoch(digits, monkeypatch, tmp_path):
    train_set, test_set = digits
    checks = iter([(0.9, 0.5), (0.9, 0.6), (0.95, 0.1), (0.95, 0.0)])
    monkeypatch.setattr(train, "robust_check", lambda *a, **k: next(checks))
    model, snapshots = tiny_model(), {}
    with pytest.warns(UserWarning, match="catastrophic overfitting"):
        history = fit(model, _snapshotting_loader(model, train_set, snapshots), config(epochs=4),
                      val=as_float(test_set), out_dir=tmp_path)
    assert len(history) == 3 and history[-1]["catastrophic_overfitting"]
    for k, v in model.state_dict().items():  # the weights after epoch 2 = those when epoch 3 started
        torch.testing.assert_close(v, snapshots[2][k])


def test_select_best_keeps_the_best_check_without_an_output_dir(digits, monkeypatch):
    train_set, test_set = digits
    checks = iter([(0.9, 0.5), (0.9, 0.4)])
    monkeypatch.setattr(train, "robust_check", lambda *a, **k: next(checks))
    model, snapshots = tiny_model(), {}
    fit(model, _snapshotting_loader(model, train_set, snapshots), config(epochs=2, select="best"),
        val=as_float(test_set))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])


class _CountingShrinkHook(train.TrainHook):
    """Pulls every weight towards zero; counts steps; checkpoints its count."""

    def __init__(self, strength):
        self.strength, self.steps, self.epochs = strength, 0, 0

    def penalty(self, model):
        return self.strength * sum(p.pow(2).sum() for p in model.parameters())

    def after_step(self, model, step):
        self.steps = step

    def after_epoch(self, model, record):
        self.epochs += 1
        record["hook_steps"] = self.steps

    def state_dict(self):
        return {"steps": self.steps, "epochs": self.epochs}

    def load_state_dict(self, state):
        self.steps, self.epochs = state["steps"], state["epochs"]


def test_hooks_add_a_penalty_see_every_step_and_log(digits):
    train_set, _ = digits
    norms = {}
    for strength in (0.0, 1.0):
        model, hook = tiny_model(), _CountingShrinkHook(strength)
        loader = data.make_loader(train_set, 64, train=True, seed=0)
        history = fit(model, loader, config(attack="clean", epochs=2, check_size=0), hooks=[hook])
        norms[strength] = sum(p.pow(2).sum().item() for p in model.parameters())
    assert norms[1.0] < 0.5 * norms[0.0]
    assert hook.steps == 2 * len(loader) and history[-1]["hook_steps"] == hook.steps


def test_hook_state_is_checkpointed_and_resumed(digits, tmp_path):
    train_set, _ = digits
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), _Hooked(data.make_loader(train_set, 64, train=True, seed=0), kill_at=1),
            config(attack="clean", epochs=2, check_size=0), out_dir=tmp_path, hooks=[_CountingShrinkHook(0.0)])
    hook = _CountingShrinkHook(0.0)
    fit(tiny_model(), data.make_loader(train_set, 64, train=True, seed=0), config(attack="clean", epochs=2, check_size=0),
        out_dir=tmp_path, resume=True, hooks=[hook])
    assert hook.epochs == 2 and hook.steps == 2 * (len(train_set) // 64)


def test_fit_leaves_the_callers_random_state_as_it_was():
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 10, (64,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fit(model, loader, config(epochs=1, check_size=0, seed=7))  # PGD training draws random starts
    assert torch.equal(torch.rand(3), expected)


def test_channels_last_training_matches_the_default_format():
    torch.manual_seed(0)
    x, y = torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                              nn.Linear(512, 10))
        # Clean SGD: PGD's sign steps and Adam's normalisation would amplify float rounding differences.
        fit(model, loader, config(attack="clean", optimizer="sgd", lr=0.05, epochs=1, check_size=0,
                                  channels_last=channels_last))
        results.append(model)
    assert results[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(results[0].state_dict().values(), results[1].state_dict().values()):
        torch.testing.assert_close(a, b.contiguous(), atol=1e-4, rtol=1e-4)


def test_channels_last_training_gives_one_channel_images_channels_last_strides():
    # with one channel .contiguous(channels_last) changes nothing: the strides must be set by hand
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    strides = []
    model[0].register_forward_pre_hook(lambda module, args: strides.append(args[0].stride(1)))
    fit(model, loader, config(attack="clean", optimizer="sgd", lr=0.05, epochs=1, check_size=0, channels_last=True))
    assert strides and all(stride == 1 for stride in strides)


def test_channels_last_is_turned_off_for_convs_that_onednn_mis_trains():
    # a 5 -> 9 channel 1x1 stride-2 conv: oneDNN's NHWC weight gradient is wrong (2 threads) or crashes (1)
    torch.manual_seed(0)
    x, y = torch.rand(64, 5, 16, 16), torch.randint(0, 10, (64,))
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(5, 9, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(9 * 8 * 8, 10))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, loader, config(attack="clean", optimizer="sgd", lr=0.05, epochs=1, check_size=0,
                                      channels_last=channels_last))
        results.append((model, [str(w.message) for w in caught]))
    assert not any("channels_last is off" in m for m in results[0][1])
    assert any("channels_last is off" in m and "oneDNN" in m for m in results[1][1])
    for a, b in zip(results[0][0].state_dict().values(), results[1][0].state_dict().values()):
        torch.testing.assert_close(a, b)


class _FlipAtEpoch(TrainHook):
    """Turns the classifier's sign over at the first step of epoch ``epoch`` (1-based): robustness collapses."""

    def __init__(self, epoch, steps_per_epoch):
        self.first_step = (epoch - 1) * steps_per_epoch + 1

    def after_step(self, model, step):
        if step == self.first_step:
            with torch.no_grad():
                model[-1].weight.neg_()
                model[-1].bias.neg_()


def _digits_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_fit_without_validation_data_holds_out_images_and_checks_every_epoch():
    loader = data.make_loader(data.load("digits", split="train"), 64, train=True)
    config = TrainConfig(attack="pgd", epochs=1, batch_size=64, eps=0.2, attack_steps=2, optimizer="adam", lr=2e-3,
                         weight_decay=0.0, check_size=100, progress=False)
    with pytest.warns(UserWarning, match="last 100 training images are held out"):
        history = fit(_digits_net(), loader, config)
    assert "val_pgd" in history[0]  # was: no check at all, so nothing could catch a collapse


def test_a_collapse_stops_the_run_restores_the_best_epoch_and_names_the_flag(tmp_path):
    loader = data.make_loader(data.load("digits", split="train"), 64, train=True)
    config = TrainConfig(attack="fgsm_rs", epochs=4, batch_size=64, eps=0.2, optimizer="adam", lr=2e-3,
                         weight_decay=0.0, check_size=100, progress=False)
    model = _digits_net()
    snapshots = {}

    class Snapshot(TrainHook):
        def after_epoch(self, model, record):
            snapshots[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}

    steps_per_epoch = len(loader.hold_out(100)[0])  # fit holds out the last 100 images too
    with pytest.warns(UserWarning, match=r"catastrophic overfitting.*lower lr .*--lr.*method pgd"):
        history = fit(model, loader, config, hooks=[_FlipAtEpoch(2, steps_per_epoch), Snapshot()],
                      out_dir=tmp_path)
    assert [r["epoch"] for r in history] == [1, 2] and history[1]["catastrophic_overfitting"]
    assert all(torch.equal(model.state_dict()[k], snapshots[1][k]) for k in snapshots[1])


def _tiny_mnist_like(n=64):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=generator)
    return data.TensorData(images, torch.arange(n) % 10, data.DATASETS["mnist"])


def _recorded_pgd_radii(monkeypatch):
    from cstar import attacks

    radii, real_pgd = [], attacks.pgd

    def recording_pgd(model, x, y, eps, *args, **kwargs):
        radii.append(eps)
        return real_pgd(model, x, y, eps, *args, **kwargs)

    monkeypatch.setattr(attacks, "pgd", recording_pgd)
    return radii


def test_fit_trains_at_the_threat_model_of_its_data_when_eps_is_not_given(monkeypatch):
    radii = _recorded_pgd_radii(monkeypatch)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    fit(model, data.make_loader(_tiny_mnist_like(), 32, train=True),
        TrainConfig(epochs=1, attack_steps=1, check_size=0, progress=False))
    assert radii and all(r == pytest.approx(0.3) for r in radii)  # was 8/255 whatever the data


def test_fit_refuses_a_loader_that_does_not_say_its_threat_model_without_eps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    batches = [(torch.rand(8, 1, 28, 28), torch.arange(8))]
    with pytest.raises(CstarError, match="eps"):
        fit(model, batches, TrainConfig(epochs=1, check_size=0, progress=False))


def test_clean_training_without_the_check_needs_no_eps():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    batches = [(torch.rand(8, 1, 28, 28), torch.arange(8))]
    history = fit(model, batches, TrainConfig(attack="clean", epochs=1, check_size=0, progress=False))
    assert len(history) == 1
