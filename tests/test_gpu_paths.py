"""The CUDA code paths, shown on the CPU where a CPU can show them.

No GPU runs here: a resume must not care where the checkpoint's tensors were
loaded, half-precision attacks must keep their strength, a GradScaler must
survive a change of AMP setting, the stop and divergence checks must not sync
the host every step, and TF32 must not leak into exactness checks.
``benchmarks/gpu_check.sh`` proves the rest on a GPU.
"""

import math

import pytest
import torch
import torch.nn as nn

import cstar
from cstar.training import epoch as _train_epoch, state as _train_state, fit as train
from cstar import data, distributed
from cstar._core.errors import CstarError
from cstar._core.precision import full_float32
from cstar.attacks import pgd
from cstar.lowrank import svd_project, tucker2_project
from cstar.training.fit import POLL_EVERY, TrainConfig, TrainHook, fit

from helpers import BatchHook


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _config(**kw):
    base = dict(attack="clean", epochs=2, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0, check_size=0,
                progress=False)
    return TrainConfig(**{**base, **kw})


def _loader():
    return data.make_loader(data.load("digits", split="train"), 64, train=True, seed=0)


# --- resume -----------------------------------------------------------------------------------------------------

def test_a_resume_reads_the_checkpoint_on_the_cpu_whatever_the_training_device(tmp_path, monkeypatch):
    """On a GPU, reading onto the device put the RNG states there (torch.set_rng_state takes only a CPU
    ByteTensor) and Adam's step counters too; here the CPU can only check where the file is read."""
    fit(_tiny(), _loader(), _config(epochs=1), out_dir=tmp_path)
    locations = []
    real = train.load_latest_checkpoint

    def recording(path, map_location="cpu"):
        locations.append(map_location)
        return real(path, map_location)

    monkeypatch.setattr(train, "load_latest_checkpoint", recording)
    model = _tiny(seed=1)
    fit(model, _loader(), _config(epochs=2), out_dir=tmp_path, resume=True)
    assert locations == ["cpu"]


def test_rng_states_that_came_back_off_the_cpu_are_restored(monkeypatch):
    saved = _train_state.rng_state()
    torch.rand(3)
    moved = {"torch": _NotOnCpu(saved["torch"])}
    _train_state.set_rng_state(moved)
    assert torch.equal(torch.get_rng_state(), saved["torch"])


class _NotOnCpu:
    """Stands for a tensor on an accelerator: only ``.cpu()`` gives the tensor back."""

    def __init__(self, tensor):
        self._tensor = tensor

    def cpu(self):
        return self._tensor


def test_a_checkpoint_from_a_machine_with_more_gpus_restores_the_gpus_there_are(monkeypatch):
    restored = []

    def set_rng_state(state, device):
        if device >= 1:
            raise IndexError("list index out of range")  # what CUDA raises for a GPU this machine lacks
        restored.append(device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    state = torch.get_rng_state()
    _train_state.set_rng_state({"torch": state, "cuda": [state.clone(), state.clone()]})
    assert restored == [0]


@pytest.mark.parametrize("before, after", [(None, "float16"), ("float16", None), ("bfloat16", "float16")])
def test_a_resume_may_change_the_amp_setting(tmp_path, before, after):
    """A GradScaler (float16 only) that has no saved state starts fresh; a saved one that is no longer used is
    ignored."""
    def settings(dtype, epochs):
        return _config(epochs=epochs, amp=dtype is not None, amp_dtype=dtype or "auto")

    fit(_tiny(), _loader(), settings(before, 1), out_dir=tmp_path)
    history = fit(_tiny(seed=1), _loader(), settings(after, 2), out_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[1].get("amp") == after
    assert math.isfinite(history[1]["train_loss"])


def test_the_amp_type_is_chosen_by_the_device_and_recorded(monkeypatch):
    auto = TrainConfig(amp=True)
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: False)  # a CPU without AVX512-BF16 or AMX
    with pytest.warns(UserWarning, match="no effect on this CPU"):
        assert train.resolve_amp_dtype(auto, torch.device("cpu")) is None
    monkeypatch.setattr(train, "cpu_has_bfloat16", lambda: True)
    assert train.resolve_amp_dtype(auto, torch.device("cpu")) == torch.bfloat16
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert train.resolve_amp_dtype(auto, torch.device("cuda")) == dtype
    assert train.resolve_amp_dtype(TrainConfig(amp=True, amp_dtype="float16"), torch.device("cpu")) == torch.float16
    assert train.resolve_amp_dtype(TrainConfig(amp=False, amp_dtype="float16"), torch.device("cuda")) is None
    with pytest.raises(CstarError, match="amp_dtype"):
        TrainConfig(amp=True, amp_dtype="fp8")


# --- float16 attacks ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def confident():
    """A small CNN made very confident (1 - p_y about 1e-6), where float16 input gradients underflow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
        model[-1].weight.mul_(400)
        model[-1].bias.mul_(400)
        assert (1 - model(x).softmax(1).max(1).values).median() < 1e-5
    return model, x, y


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_attack_moves_every_pixel_a_float32_one_moves(confident, amp_dtype):
    model, x, y = confident
    unmoved = {}
    for dtype in (None, amp_dtype):
        x_adv = pgd(model, x, y, 0.2, 0.2, 1, random_start=False, amp_dtype=dtype)
        unmoved[dtype] = (x_adv == x).float().mean().item()
    # Thresholds, not zero: a CPU's half-precision kernels may round a handful of gradients to exactly zero
    # (6e-5 of pixels on an AMD EPYC); the bug this guards (float16 without the rescaled gradient) left ~24%.
    assert unmoved[None] < 1e-3
    assert unmoved[amp_dtype] < 1e-3


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_pgd_is_as_strong_as_a_float32_one(confident, amp_dtype):
    model, x, y = confident
    accuracies = {}
    for dtype in (None, amp_dtype):
        x_adv = pgd(model, x, y, 0.2, 0.05, 10, amp_dtype=dtype, generator=torch.Generator().manual_seed(0))
        accuracies[dtype] = _accuracy(model, x_adv, y)
    assert accuracies[None] <= 0.1  # the attack works at all
    assert abs(accuracies[amp_dtype] - accuracies[None]) <= 0.02


def test_the_float16_rescaling_changes_no_float32_step(confident):
    """The rescaled gradient keeps each example's direction: in float32 the attack is bitwise the same."""
    import cstar.attacks._gradient as gradient

    model, x, y = confident
    logits = gradient._rescale_gradient(model(x.requires_grad_(True)), per_example=True)
    (scaled,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), x)
    (plain,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
    x.requires_grad_(False)
    assert torch.equal(scaled.sign(), plain.sign())


# --- skipped steps, divergence and polling --------------------------------------------------------------------

class _Overflow(TrainHook):
    """A loss term that overflows at the given steps (counted from 1) and is zero elsewhere; records after_step."""

    def __init__(self, bad_steps):
        self.bad_steps, self.calls, self.after = set(bad_steps), 0, []

    def penalty(self, model):
        self.calls += 1
        scale = float("inf") if self.calls in self.bad_steps else 0.0
        return scale * sum(p.sum() for p in model.parameters())  # infinite gradients too

    def after_step(self, model, step):
        self.after.append(step)


def test_a_float16_overflow_skips_the_step_and_the_schedule_waits(tmp_path):
    hook = _Overflow([2])
    model = _tiny()
    config = _config(epochs=1, amp=True, amp_dtype="float16")
    history = fit(model, _loader(), config, hooks=[hook], out_dir=tmp_path)
    steps = len(_loader())
    assert hook.after == list(range(1, steps))  # one step skipped: after_step ran steps - 1 times
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == steps - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(history[0]["train_loss"]) and history[0]["amp"] == "float16"


def test_a_float16_loss_that_stays_non_finite_stops_the_run():
    hook = _Overflow(range(3, 3 + POLL_EVERY))
    with pytest.raises(CstarError, match=f"non-finite for {POLL_EVERY} steps in a row"):
        fit(_tiny(), _loader(), _config(epochs=1, amp=True, amp_dtype="float16"), hooks=[hook])


def test_divergence_names_the_first_bad_step_though_it_is_checked_later(tmp_path):
    """The check runs every POLL_EVERY steps; the error names the step where the loss first went bad."""
    loader = BatchHook(_loader(), lambda e, i, b: (torch.full_like(b[0], float("nan")), b[1]) if i >= 2 else None)
    with pytest.raises(CstarError, match="diverged at epoch 1, step 3 "):
        fit(_tiny(), loader, _config(epochs=1))


def test_the_stop_and_divergence_checks_run_every_few_steps_not_every_step(monkeypatch):
    polls = []
    real = _train_epoch._poll

    def counting(*args):
        polls.append(1)
        return real(*args)

    monkeypatch.setattr(_train_epoch, "_poll", counting)
    fit(_tiny(), _loader(), _config(epochs=1))
    steps = len(_loader())
    assert steps > 2 * POLL_EVERY
    assert len(polls) == steps // POLL_EVERY + (steps % POLL_EVERY > 0)


def test_attacks_inside_a_training_step_skip_the_range_scan(monkeypatch):
    """The range scan is a host sync: fit checks each epoch's first batch and not every attack call."""
    scans = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: scans.append(1) or real(*a, **k))
    fit(_tiny(), _loader(), _config(epochs=2, attack="pgd", eps=0.1, attack_steps=2))
    assert len(scans) == 2


def test_admm_does_not_project_weights_that_are_not_finite():
    model = _tiny()
    plan = cstar.select_ranks(model, 1.5, exclude=[])
    admm = cstar.ADMM(model, plan, cstar.ADMMConfig(), steps_per_epoch=1)
    z_before = {n: z.clone() for n, z in admm.Z.items()}
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    assert admm.z_step(model) is None
    assert all(torch.equal(admm.Z[n], z_before[n]) for n in z_before) and admm.z_steps == 0


# --- projections, devices, process groups, TF32 ---------------------------------------------------------------

@pytest.mark.parametrize("shape, project", [
    ((128, 64, 1, 1), lambda w: svd_project(w, 8)),  # more outputs than inputs: the transposed branch
    ((128, 64), lambda w: svd_project(w, 8)),
    ((16, 64), lambda w: svd_project(w, 8)),
    ((32, 16, 3, 3), lambda w: tucker2_project(w, (4, 4))),
])
def test_projections_are_contiguous(shape, project):
    """NCCL broadcasts only contiguous tensors, and ADMM broadcasts every projection."""
    assert project(torch.randn(*shape)).is_contiguous()


def test_one_process_on_cuda_n_makes_it_the_current_gpu(monkeypatch):
    current = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    context = distributed.init_from_env("cuda:1")
    distributed.shutdown()
    assert current == [torch.device("cuda", 1)] and context.device == torch.device("cuda", 1)


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    calls = []
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29999"), ("CSTAR_DIST_TIMEOUT", "90")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    distributed.init_from_env("cpu")
    distributed._context = None
    assert calls[0]["timeout"].total_seconds() == 90 * 60


@pytest.mark.parametrize("text", ["ten", "0", "-5"])
def test_a_bad_timeout_is_named(monkeypatch, text):
    monkeypatch.setenv("CSTAR_DIST_TIMEOUT", text)
    with pytest.raises(CstarError, match="CSTAR_DIST_TIMEOUT"):
        distributed.timeout()


def test_full_float32_turns_tf32_off_and_restores_it():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_float32():
            assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("flags, native", [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                           ("fpu avx512f avx512bw", False)])
def test_native_bfloat16_is_read_from_the_cpus_flags(tmp_path, flags, native):
    from cstar._core.precision import cpu_has_bfloat16

    (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_has_bfloat16(str(tmp_path / "cpuinfo")) is native
    assert cpu_has_bfloat16(str(tmp_path / "missing")) is False
