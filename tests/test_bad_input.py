"""Rows of docs/BAD_INPUT.md not covered elsewhere: each bad value gets one line naming the fix, no output."""

import json

import pytest
import torch
import torch.nn as nn

from cstar import data
from cstar._core.errors import CstarError
from cstar.cli import main
from cstar.training.fit import TrainConfig, fit
from helpers import BatchHook

# (id, argv after the command, words the error line must contain)
CASES = [
    ("device-without-gpu", ["train", "--model", "small_cnn", "--data", "digits", "--device", "cuda"],
     ["--device cpu"]),
    ("unknown-exclude-layer", ["ranks", "--model", "resnet20", "--ratio", "4", "--exclude", "nonexistent"],
     ["nonexistent", "conv1"]),
    ("missing-config-file", ["train", "--config", "{tmp}/nonexistent.yaml"], ["does not exist"]),
    ("config-not-a-mapping", ["train", "--config", "{tmp}/list.yaml"], ["mapping"]),
    ("section-not-yaml", ["compress", "--model", "small_cnn", "--data", "digits", "--admm", "{rho: [1}"],
     ["--admm", "YAML mapping"]),
    ("unknown-section-key", ["compress", "--model", "small_cnn", "--data", "digits", "--admm", "{rhoo: 1}"],
     ["rhoo", "rho"]),
    ("unknown-eval-phase", ["compress", "--model", "small_cnn", "--data", "digits", "--eval-phases", "dense,fnal"],
     ["fnal", "final"]),
    ("train-n-out-of-range", ["compress", "--model", "small_cnn", "--data", "digits", "--train-n", "0"],
     ["--train-n", "between 1 and"]),
    ("train-n-less-than-a-batch", ["train", "--model", "small_cnn", "--data", "digits", "--train-n", "100",
                                   "--val-size", "50", "--batch-size", "64"], ["50 training images", "--val-size"]),
    ("zero-epochs", ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "0"], ["epochs", "at least 1"]),
    ("zero-batch-size", ["train", "--model", "small_cnn", "--data", "digits", "--batch-size", "0"],
     ["batch_size", "at least 1"]),
    ("negative-lr", ["train", "--model", "small_cnn", "--data", "digits", "--lr", "-1"], ["lr"]),
    ("missing-checkpoint", ["eval", "{tmp}/nonexistent.pt", "--data", "digits"], ["does not exist"]),
    ("nan-eps", ["train", "--model", "small_cnn", "--data", "digits", "--eps", "nan"], ["eps"]),
    ("unreachable-ratio", ["ranks", "--model", "resnet20", "--ratio", "100000"], ["ratio"]),
    ("ratios-not-numbers", ["compare", "--model", "small_cnn", "--data", "digits", "--ratios", "4,x"],
     ["--ratios", "4,8,16"]),
    ("unknown-compare-method", ["compare", "--model", "small_cnn", "--data", "digits", "--methods", "cstar,snip"],
     ["snip", "hydra"]),
]


@pytest.mark.parametrize("argv, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_bad_input(capsys, tmp_path, argv, words):
    (tmp_path / "list.yaml").write_text("[1, 2]\n")
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] in ("train", "compress", "compare"):
        argv += ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not out.exists(), "a failed command must not leave an output directory behind"


def _nan_from(loader, epoch):
    """``loader``, with NaN images from epoch ``epoch`` on."""
    return BatchHook(loader, lambda e, i, b: (torch.full_like(b[0], float("nan")), b[1]) if e >= epoch else None)


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint_and_names_the_step(tmp_path):
    train_set = data.load("digits", split="train")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = TrainConfig(attack="clean", epochs=3, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                         check_size=0, progress=False)
    with pytest.raises(CstarError, match=r"diverged at epoch 2, step 1 .*checkpoint\.pt"):
        fit(model, _nan_from(data.make_loader(train_set, 64, train=True), epoch=1), config, out_dir=tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
