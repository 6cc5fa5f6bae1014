"""Hostile input to the evaluation (``cstar.evaluate``, ``cstar eval`` and the evaluation options of train, compress
and compare): each is refused in one line naming the fix, before any attack runs or any file is written."""

import json

import pytest
import torch
import torch.nn as nn

import cstar
from cstar import attacks, data, models
from cstar.evaluation.evaluate import evaluate
from hostile import refused_api, refused_cli

EPS = 0.2  # the digits threat model


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return models.create("small_cnn", num_classes, in_channels=1, input_size=8).eval()


class _Blowup(nn.Module):
    """Finite weights, infinite logits."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_cnn()

    def forward(self, x):
        return self.inner(x) * 1e30 * 1e30


def _nan_weights() -> nn.Module:
    model = tiny_cnn()
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    return model


TEST = data.load("digits", split="test")
X, Y = TEST.images[:64].float() / 255, TEST.labels[:64]

# (id, a call of evaluate, words the one-line refusal holds); the model, data and eps are fine unless the id says
API_CASES = [
    ("labels-out-of-range", lambda m: evaluate(m, (X, Y + 10), eps=EPS), ["labels in [10,", "10 classes"]),
    ("negative-labels", lambda m: evaluate(m, (X, Y - 1), eps=EPS), ["labels in [-1,"]),
    ("float-labels", lambda m: evaluate(m, (X, Y.float()), eps=EPS), ["torch.float32", "y.long()"]),
    ("one-hot-labels", lambda m: evaluate(m, (X, nn.functional.one_hot(Y, 10)), eps=EPS), ["y.argmax(1)"]),
    ("bool-labels", lambda m: evaluate(m, (X, Y > 4), eps=EPS), ["torch.bool", "integer class indices"]),
    ("wrong-channels", lambda m: evaluate(m, (X.repeat(1, 3, 1, 1), Y), eps=EPS), ["3 channels", "takes 1"]),
    ("3d-images", lambda m: evaluate(m, (X[:, 0], Y), eps=EPS), ["(N, C, H, W)", "x.unsqueeze(1)"]),
    ("2d-images", lambda m: evaluate(m, (X.flatten(1), Y), eps=EPS), ["(64, 64)", "(N, C, H, W)"]),
    ("wrong-image-size", lambda m: evaluate(m, (nn.functional.pad(X, (0, 8, 0, 8)), Y), eps=EPS),
     ["cannot take images of shape (64, 1, 16, 16)"]),
    ("int32-images", lambda m: evaluate(m, (X.int(), Y), eps=EPS), ["torch.int32", "uint8"]),
    ("images-outside-unit-range", lambda m: evaluate(m, (X * 255, Y), eps=EPS), ["scaled to [0, 1]"]),
    ("numpy-pair", lambda m: evaluate(m, (X.numpy(), Y.numpy()), eps=EPS), ["ndarray", "torch.as_tensor"]),
    ("list-pair", lambda m: evaluate(m, (X.tolist(), Y.tolist()), eps=EPS), ["list", "torch.as_tensor"]),
    ("numpy-array", lambda m: evaluate(m, X.numpy(), eps=EPS), ["ndarray", "(images, labels)"]),
    ("one-tensor", lambda m: evaluate(m, X, eps=EPS), ["Tensor", "(images, labels)"]),
    ("a-string-as-data", lambda m: evaluate(m, "digits", eps=EPS), ["str", "cstar dataset"]),
    ("batches-not-pairs", lambda m: evaluate(m, [(X,), (X,)], eps=EPS), ["not (images, labels)"]),
    ("fewer-labels-than-images", lambda m: evaluate(m, (X, Y[:-1]), eps=EPS), ["64 images but 63 labels"]),
    ("batch-size-0", lambda m: evaluate(m, (X, Y), eps=EPS, batch_size=0), ["batch_size=0", "batch_size=256"]),
    ("batch-size-float", lambda m: evaluate(m, (X, Y), eps=EPS, batch_size=2.5), ["batch_size=2.5"]),
    ("n-float", lambda m: evaluate(m, (X, Y), eps=EPS, n=2.5), ["n=2.5", "n=None"]),
    ("n-negative", lambda m: evaluate(m, (X, Y), eps=EPS, n=-3), ["n=-3"]),
    ("n-bool", lambda m: evaluate(m, (X, Y), eps=EPS, n=True), ["n=True"]),
    ("seed-text", lambda m: evaluate(m, (X, Y), eps=EPS, seed="0"), ["seed='0'", "seed=0"]),
    ("attacks-a-string", lambda m: evaluate(m, (X, Y), "pgd2", eps=EPS), ["'pgd2'", "not a list", "['pgd2']"]),
    ("attacks-one-spec", lambda m: evaluate(m, (X, Y), attacks.AttackSpec("fgsm", EPS), eps=EPS), ["not a list"]),
    ("attacks-empty", lambda m: evaluate(m, (X, Y), [], eps=EPS), ["no attack", "['clean', 'pgd20']"]),
    ("attacks-twice", lambda m: evaluate(m, (X, Y), ["clean", "pgd5", "PGD5"], eps=EPS), ["pgd5 named twice"]),
    ("attack-unknown", lambda m: evaluate(m, (X, Y), ["pgd"], eps=EPS), ["'pgd'", "pgd<steps>"]),
    ("attack-not-a-name", lambda m: evaluate(m, (X, Y), [20], eps=EPS), ["attack 20", "'pgd20'"]),
    ("eps-2", lambda m: evaluate(m, (X, Y), eps=2.0), ["eps=2.0", "[0, 1]"]),
    ("eps-negative", lambda m: evaluate(m, (X, Y), eps=-0.1), ["eps=-0.1", "[0, 1]"]),
    ("eps-nan", lambda m: evaluate(m, (X, Y), eps=float("nan")), ["eps=nan"]),
    ("eps-text", lambda m: evaluate(m, (X, Y), eps="8/255"), ["eps='8/255'", "not a number"]),
    ("spec-eps-2", lambda m: evaluate(m, (X, Y), [attacks.AttackSpec("pgd", 2.0, steps=3)], eps=EPS),
     ["eps of pgd3=2.0", "[0, 1]"]),
    ("step-0", lambda m: evaluate(m, (X, Y), eps=EPS, step=0), ["step=0", "0 < step"]),
    ("step-2", lambda m: evaluate(m, (X, Y), eps=EPS, step=2.0), ["step=2.0", "[0, 1]"]),
    ("step-for-autoattack", lambda m: evaluate(m, (X, Y), eps=EPS, step={"aa": 0.01}), ["autoattack", "its own"]),
    ("step-for-a-typo", lambda m: evaluate(m, (X, Y), eps=EPS, step={"pgd4O": 0.01}), ["'pgd4O'", "pgd<steps>"]),
    ("step-negative-for-one", lambda m: evaluate(m, (X, Y), eps=EPS, step={"pgd5": -1}), ["step of pgd5=-1"]),
    ("norm-l1", lambda m: evaluate(m, (X, Y), eps=EPS, norm="l1"), ["'l1'", "'linf'"]),
    ("nan-weights", lambda m: evaluate(_nan_weights(), (X, Y), eps=EPS), ["NaN or Inf", "before training diverged"]),
    ("infinite-logits", lambda m: evaluate(_Blowup(), (X, Y), eps=EPS), ["outputs", "NaN or Inf", "class 0"]),
    ("fewer-classes-than-the-data", lambda m: evaluate(tiny_cnn(5), TEST, eps=EPS),
     ["the data has 10 classes", "predicts 5"]),
    ("not-a-module", lambda m: evaluate(lambda x: x, (X, Y), eps=EPS), ["torch.nn.Module", "function"]),
    ("no-parameters", lambda m: evaluate(nn.Flatten(), (X, Y), eps=EPS), ["with parameters", "Flatten"]),
]


@pytest.mark.parametrize("call, words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_evaluate_refuses_in_one_line_before_any_work(tmp_path, call, words):
    model = tiny_cnn()
    card = tmp_path / "card.json"
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    refused_api(lambda: call(model), words, tmp=tmp_path)
    assert len(calls) <= 1 and not card.exists()  # at most the first batch's check ran through the model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small_cnn for digits saved by cstar.save, and one with NaN weights."""
    root = tmp_path_factory.mktemp("saved")
    cstar.save(tiny_cnn(), root / "model")
    cstar.save(_nan_weights(), root / "nan")
    return root


PIPELINE = ["--model", "small_cnn", "--data", "digits", "--val-size", "100", "--no-progress"]
EVAL = ["eval", "{saved}/model", "--data", "digits"]

# (id, argv with {saved} for the saved models' folder, words the error line holds)
CLI_CASES = [
    ("eval-attacks-empty", [*EVAL, "--attacks", ""], ["--attacks ''", "names no attack"]),
    ("eval-attacks-only-commas", [*EVAL, "--attacks", ",,"], ["names no attack"]),
    ("eval-attack-unknown", [*EVAL, "--attacks", "clean,pgd"], ["'pgd'", "pgd<steps>"]),
    ("eval-attack-twice", [*EVAL, "--attacks", "clean,pgd5,pgd5"], ["pgd5 named twice"]),
    ("eval-eps-2", [*EVAL, "--eps", "2"], ["--eps", "[0, 1]"]),
    ("eval-step-0", [*EVAL, "--step", "0"], ["--step", "0 < step"]),
    ("eval-step-2", [*EVAL, "--step", "2"], ["--step", "[0, 1]"]),
    ("eval-step-no-value", [*EVAL, "--step", "pgd40="], ["ATTACK=STEP", "pgd40=0.01"]),
    ("eval-step-for-autoattack", [*EVAL, "--attacks", "aa", "--step", "aa=0.01"],
     ["autoattack", "its own"]),
    ("eval-step-for-a-typo", [*EVAL, "--step", "pgd2O=0.01"], ["'pgd2O'"]),
    ("eval-batch-size-0", [*EVAL, "--batch-size", "0"], ["batch_size", ">= 1"]),
    ("eval-n-0", [*EVAL, "--n", "0"], ["--n", ">= 1"]),
    ("eval-nan-weights", ["eval", "{saved}/nan", "--data", "digits"], ["NaN"]),
    ("train-eval-attacks-empty", ["train", *PIPELINE, "--eval-attacks", " "], ["--eval-attacks", "names no attack"]),
    ("train-eval-step-for-a-typo", ["train", *PIPELINE, "--eval-step", "pgd2O=0.01"], ["'pgd2O'"]),
    ("compress-eval-attacks-empty", ["compress", *PIPELINE, "--eval-attacks", ""], ["--eval-attacks", "no attack"]),
    ("compress-eval-step-2", ["compress", *PIPELINE, "--eval-step", "2"], ["--eval-step", "[0, 1]"]),
    ("compress-eval-step-file", ["compress", *PIPELINE, "--config", "{tmp}/steps.yaml"], ["eval_step", "step"]),
    ("compare-eval-attacks-empty", ["compare", *PIPELINE, "--eval-attacks", ","], ["--eval-attacks", "no attack"]),
    ("compare-eval-step-for-autoattack", ["compare", *PIPELINE, "--eval-step", "aa=0.1"], ["autoattack"]),
    ("eval-resume-other-weights", [*EVAL, "--json", "{tmp}/card.json",
                                   "--resume"], ["other settings", "the model's weights"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_the_evaluation_options_are_refused_in_one_line_before_any_work(capsys, tmp_path, saved, argv, words):
    (tmp_path / "steps.yaml").write_text("eval_step: {pgd40: 2/255x}\n")
    progress = {"labels": ["clean", "pgd20"], "eps": EPS, "n": None, "batch_size": 256, "seed": 0, "batches": 1,
                "total": 256, "correct": {"clean": 200, "pgd20": 100}, "seconds": {"clean": 1, "pgd20": 1},
                "model": "0" * 64}  # another model's progress
    (tmp_path / "card.json.partial").write_text(json.dumps(progress))
    argv = [a.replace("{saved}", str(saved)).replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "out"
    if argv[0] in ("train", "compress", "compare"):
        argv += ["--out", str(out)]
    refused_cli(capsys, argv, words, tmp=tmp_path, left=[out, tmp_path / "card.json"])
