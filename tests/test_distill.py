"""Adversarial distillation from the dense robust model (TrainConfig.distill): the loss, fit's teacher, and the
phases of compress and compare that pass the dense model as teacher."""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cstar
from cstar import CstarError, data
from cstar.pipeline.compare import CompareConfig
from cstar.pipeline.compress import CompressConfig
from cstar.training.losses import training_loss as _training_loss
from cstar.training.fit import TrainConfig, fit


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def test_the_distilled_loss_mixes_the_methods_loss_and_the_tempered_kl_to_the_teacher():
    student, teacher = tiny(0), tiny(1).eval()
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    config = TrainConfig(attack="clean", eps=0.1, distill=0.25, distill_temperature=2.0)
    loss, logits = _training_loss(student, x, y, config, 0.1, None, teacher)
    s, t = student(x), teacher(x)
    p_teacher = torch.softmax(t / 2, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(s / 2, 1))).sum(1).mean()
    expected = 0.75 * F.cross_entropy(s, y) + 0.25 * 4 * kl
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits, s)


def test_without_distill_the_loss_is_the_methods_own_and_needs_no_teacher():
    student = tiny(0)
    x, y = torch.rand(5, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1])
    loss, _ = _training_loss(student, x, y, TrainConfig(attack="clean", eps=0.1), 0.1, None, None)
    torch.testing.assert_close(loss, F.cross_entropy(student(x), y))


@pytest.mark.parametrize("values, match", [
    ({"distill": 1.5}, "distill=1.5 must be in"),
    ({"distill": -0.1}, "distill=-0.1 must be in"),
    ({"distill_temperature": 0}, "distill_temperature=0 must be positive"),
])
def test_bad_distillation_settings_are_refused(values, match):
    with pytest.raises(CstarError, match=match):
        TrainConfig(**values)


def loader():
    torch.manual_seed(0)
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))
    return [(x[i:i + 32], y[i:i + 32]) for i in (0, 32)]


def test_fit_refuses_distill_without_a_teacher_before_any_step():
    student = tiny(0)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(CstarError, match="pass fit\\(..., teacher=model\\)"):
        fit(student, loader(), TrainConfig(attack="fgsm_rs", eps=0.1, epochs=1, check_size=0, distill=0.5,
                                           progress=False))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_fit_learns_from_a_teacher_it_leaves_alone():
    student, teacher = tiny(0), tiny(1).train()
    before = copy.deepcopy(teacher.state_dict())
    config = TrainConfig(attack="fgsm_rs", eps=0.1, epochs=3, check_size=0, distill=1.0, optimizer="adam", lr=0.01,
                         weight_decay=0, progress=False)
    x = torch.cat([b[0] for b in loader()])

    def gap():
        with torch.no_grad():
            return F.kl_div(F.log_softmax(student(x), 1), F.softmax(teacher.eval()(x), 1), reduction="batchmean")

    start = gap()
    teacher.train()
    fit(student, loader(), config, teacher=teacher)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # not frozen in place
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert gap() < 0.5 * start  # distill=1: the student moved towards the teacher's soft labels


def test_a_distilled_dense_phase_is_refused_it_has_no_teacher():
    with pytest.raises(CstarError, match="dense.distill"):
        CompressConfig(dense=TrainConfig(distill=0.5))
    with pytest.raises(CstarError, match="dense.distill"):
        CompareConfig(dense=TrainConfig(distill=0.5))


def test_compress_distils_its_admm_and_finetuning_phases_from_the_dense_model(tmp_path, monkeypatch):
    seen = []
    module = sys.modules["cstar.pipeline.phases"]  # where every pipeline's training phase calls fit
    real_fit = module.fit

    def recording_fit(model, loader, config, **kwargs):
        seen.append((config.distill, kwargs.get("teacher")))
        return real_fit(model, loader, config, **kwargs)

    monkeypatch.setattr(module, "fit", recording_fit)
    train_set = data.load("digits", split="train")
    test_set = data.load("digits", split="test").take(32)
    phase = TrainConfig(epochs=1, batch_size=64, attack_steps=1, optimizer="adam", lr=1e-3, weight_decay=0,
                        check_size=0, progress=False, distill=0.5)
    config = CompressConfig(ratio=2, search=phase, finetune=phase, eval_attacks=["clean"], eval_phases=["final"])
    spec = train_set.spec
    torch.manual_seed(0)
    dense = cstar.models.create("small_cnn", 10, in_channels=1, input_size=8, mean=spec.mean, std=spec.std)
    dense_weights = copy.deepcopy(dense.state_dict())
    cstar.compress(dense, train_set, test_set, config, tmp_path / "run", pretrained=True, val_size=100)
    assert [d for d, _ in seen] == [0.5, 0.5]
    for _, teacher in seen:  # the dense model as it was before compression
        assert all(torch.equal(v, dense_weights[k]) for k, v in teacher.state_dict().items())
