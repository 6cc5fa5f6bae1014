"""Robust evaluation: accuracies against an independent count, subsets, streaming, JSON card."""

import json

import pytest
import torch
import torch.nn as nn

from cstar import attacks
from cstar._core.errors import CstarError
from cstar.evaluation.evaluate import evaluate, format_results, paired_difference


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    x = torch.rand(300, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0.5).long()  # a task a linear model learns
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_clean_accuracy_equals_a_direct_count(model_and_data):
    model, x, y = model_and_data
    result = evaluate(model, (x, y), ["clean"], eps=0.05, batch_size=64)
    expected = (model(x).argmax(1) == y).float().mean().item()
    assert result["accuracy"]["clean"] == pytest.approx(expected)
    assert result["n_examples"] == 300 and result["subset"] == "all 300 examples"


def test_pgd_accuracy_equals_attacking_the_whole_set_at_once(model_and_data):
    model, x, y = model_and_data
    spec = attacks.AttackSpec("pgd", eps=0.05, step=0.0125, steps=10, random_start=False)
    result = evaluate(model, (x, y), ["clean", spec], eps=0.05, batch_size=64)
    x_adv = attacks.pgd(model, x, y, 0.05, 0.0125, 10, random_start=False)
    expected = (model(x_adv).argmax(1) == y).float().mean().item()
    assert result["accuracy"][spec.label] == pytest.approx(expected)
    assert result["accuracy"][spec.label] < result["accuracy"]["clean"]


def test_first_n_examples_only(model_and_data):
    model, x, y = model_and_data
    result = evaluate(model, (x, y), ["clean"], eps=0.05, n=50)
    expected = (model(x[:50]).argmax(1) == y[:50]).float().mean().item()
    assert result["n_examples"] == 50 and result["subset"] == "first 50 examples"
    assert result["accuracy"]["clean"] == pytest.approx(expected)


def test_an_iterable_of_batches_gives_the_same_result_as_tensors(model_and_data):
    model, x, y = model_and_data
    batches = [(x[i:i + 37], y[i:i + 37]) for i in range(0, 300, 37)]
    a = evaluate(model, batches, ["clean", "fgsm"], eps=0.05, n=200)
    b = evaluate(model, (x, y), ["clean", "fgsm"], eps=0.05, n=200)
    assert a["accuracy"] == b["accuracy"] and a["n_examples"] == 200


def test_uint8_images_are_scaled_to_unit_range(model_and_data):
    model, x, y = model_and_data
    x8 = (x * 255).round().to(torch.uint8)
    a = evaluate(model, (x8, y), ["clean"], eps=0.05)
    b = evaluate(model, (x8.float() / 255, y), ["clean"], eps=0.05)
    assert a["accuracy"] == b["accuracy"]


def test_model_mode_is_restored(model_and_data):
    model, x, y = model_and_data
    model.train()
    evaluate(model, (x, y), ["clean", "pgd5"], eps=0.05, n=20)
    assert model.training
    model.eval()


def test_writes_a_robustbench_style_card(model_and_data, tmp_path):
    model, x, y = model_and_data
    path = tmp_path / "card.json"
    result = evaluate(model, (x, y), ["clean", "pgd10"], eps=0.05, out_path=path, meta={"model": "linear"})
    card = json.loads(path.read_text())
    assert card["model"] == "linear" and card["threat_model"] == "Linf" and card["eps"] == 0.05
    assert card["clean_acc"] == pytest.approx(100 * result["accuracy"]["clean"], abs=0.01)
    assert card["pgd10_acc"] == pytest.approx(100 * result["accuracy"]["pgd10"], abs=0.01)


def test_empty_data_and_bad_n_are_errors(model_and_data):
    model, x, y = model_and_data
    with pytest.raises(CstarError, match="empty"):
        evaluate(model, (x[:0], y[:0]), ["clean"], eps=0.05)
    with pytest.raises(CstarError, match="n=0"):
        evaluate(model, (x, y), ["clean"], eps=0.05, n=0)
    with pytest.raises(CstarError):
        evaluate(model, (x, y), ["pgd-lots"], eps=0.05)


def test_format_results_is_a_markdown_table(model_and_data):
    model, x, y = model_and_data
    table = format_results({"m": evaluate(model, (x, y), ["clean"], eps=0.05)})
    assert table.splitlines()[0] == "| model | n | clean |"
    assert "| m | 300 |" in table


def test_per_example_results_are_each_examples_correctness_in_order(model_and_data):
    model, x, y = model_and_data
    spec = attacks.AttackSpec("pgd", eps=0.05, step=0.0125, steps=10, random_start=False)
    result = evaluate(model, (x, y), ["clean", spec], eps=0.05, batch_size=64, n=250, per_example=True)
    clean = "".join(str(int(r)) for r in (model(x[:250]).argmax(1) == y[:250]).tolist())
    x_adv = attacks.pgd(model, x[:250], y[:250], 0.05, 0.0125, 10, random_start=False)
    robust = "".join(str(int(r)) for r in (model(x_adv).argmax(1) == y[:250]).tolist())
    assert result["per_example"] == {"clean": clean, spec.label: robust}
    assert result["per_example"]["clean"].count("1") / 250 == pytest.approx(result["accuracy"]["clean"])
    assert "per_example" not in evaluate(model, (x, y), ["clean"], eps=0.05)


def test_paired_difference_matches_a_direct_computation():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    a = (torch.rand(2000, generator=gen) < 0.55).long()
    b = torch.where(torch.rand(2000, generator=gen) < 0.8, a, 1 - a)  # correlated: mostly the same examples
    d = (a - b).double()
    result = paired_difference("".join(map(str, a.tolist())), "".join(map(str, b.tolist())))
    assert result["n"] == 2000
    assert result["difference"] == pytest.approx(d.mean().item())
    assert result["stderr"] == pytest.approx(d.std(unbiased=True).item() / 2000 ** 0.5)
    assert result["ci"][0] == pytest.approx(d.mean().item() - 1.959964 * result["stderr"], abs=1e-6)
    assert result["ci"][1] == pytest.approx(d.mean().item() + 1.959964 * result["stderr"], abs=1e-6)
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    assert (result["only_a"], result["only_b"]) == (only_a, only_b)
    expected_p = scipy_stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
    assert result["p_value"] == pytest.approx(expected_p, rel=1e-9)


def test_paired_difference_of_identical_results_is_zero_with_p_one():
    result = paired_difference("0110", "0110")
    assert result["difference"] == 0 and result["stderr"] == 0 and result["p_value"] == 1.0


def test_paired_difference_rejects_unpaired_or_malformed_results():
    with pytest.raises(CstarError, match="same"):
        paired_difference("0101", "010")
    with pytest.raises(CstarError, match="'0' and '1'"):
        paired_difference("01x1", "0101")
    with pytest.raises(CstarError, match="between 0 and 1"):
        paired_difference("0101", "0101", confidence=95)


def _conv_bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 4))
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_batchnorm_is_folded_for_the_evaluation_and_the_accuracies_stay_those_of_the_model():
    model = _conv_bn_model()
    x, y = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (64,))
    bn_calls = []
    model[1].register_forward_hook(lambda *_: bn_calls.append(1))
    folded = evaluate(model, (x, y), ["clean", "pgd5"], eps=8 / 255, per_example=True)
    assert not bn_calls  # the attacks and predictions ran on the folded copy
    plain = evaluate(model, (x, y), ["clean", "pgd5"], eps=8 / 255, per_example=True, fold_bn=False)
    assert bn_calls  # ... and without fold_bn on the model itself
    assert folded["per_example"]["clean"] == plain["per_example"]["clean"]
    differing = sum(a != b for a, b in zip(folded["per_example"]["pgd5"], plain["per_example"]["pgd5"]))
    assert differing <= 1  # the same attack up to float rounding
    assert model[1].running_mean.abs().sum() > 0 and isinstance(model[1], nn.BatchNorm2d)  # the model is untouched
