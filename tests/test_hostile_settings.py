"""Hostile settings: every value is checked (type and range) before any work, whichever way it comes.

Flags, ``--config`` files, section options (``--admm '{rho: 1}'``) and the Python
configs (TrainConfig, ADMMConfig, CompressConfig, CompareConfig, RankSpec) share
the rules of :mod:`cstar._core.checks`: each bad value is one line, and no output
directory is written. A CLI case is an argv (``{tmp}`` is the case's folder; its
``files`` are written there first); an API case is a function of that folder.
"""

from __future__ import annotations

import math

import pytest
import torch

from cstar import ADMMConfig, CompareConfig, CompressConfig, compare, compress, data, models
from cstar.lowrank import RankSpec, select_ranks
from cstar.training.fit import TrainConfig
from hostile import refused_api, refused_cli

TRAIN = ["train", "--model", "small_cnn", "--data", "digits"]
COMPRESS = ["compress", "--model", "small_cnn", "--data", "digits"]
COMPARE = ["compare", "--model", "small_cnn", "--data", "digits"]
CONFIG = ["--config", "{tmp}/c.yaml"]
WITH_OUT = ("train", "compress", "compare", "decompose", "demo")  # commands given --out {tmp}/out


def cli(case_id: str, argv: list[str], words: list[str], config: str | None = None):
    """A command line refused in one line; ``config`` is the text of ``{tmp}/c.yaml``."""
    return pytest.param(argv, config, words, id=case_id)


def api(case_id: str, call, words: list[str]):
    """A call ``call(tmp)`` refused with a one-line CstarError."""
    return pytest.param(call, None, words, id=case_id)


def digits_model() -> torch.nn.Module:
    return models.create("small_cnn", 10, in_channels=1, input_size=8)


def digits(split: str = "train"):
    return data.load("digits", split=split)


def fast_compress(tmp, **kwargs):
    return compress(digits_model(), kwargs.pop("train_set", digits()), None, kwargs.pop("config", CompressConfig()),
                    kwargs.pop("out_dir", tmp / "out"), **kwargs)


def fast_compare(tmp, config):
    return compare(digits_model(), digits(), None, config, tmp / "out")


def a_file(tmp):
    path = tmp / "out"
    path.write_text("not a directory\n")
    return path


CASES = [
    # flags of cstar train: training settings, held-out and evaluation options, run options
    cli("momentum-negative", [*TRAIN, "--momentum", "-1"], ["momentum", "[0, 1]", "-1"]),
    cli("trades-beta-negative", [*TRAIN, "--attack", "trades", "--trades-beta", "-1"], ["trades_beta", ">= 0"]),
    cli("weight-decay-nan", [*TRAIN, "--weight-decay", "nan"], ["weight_decay", "nan"]),
    cli("lr-inf", [*TRAIN, "--lr", "inf"], ["lr", "> 0", "inf"]),
    cli("warmup-epochs-nan", [*TRAIN, "--warmup-epochs", "nan"], ["warmup_epochs", "nan"]),
    cli("eps-warmup-negative", [*TRAIN, "--eps-warmup", "-1"], ["--eps-warmup", ">= 0"]),
    cli("grad-clip-zero", [*TRAIN, "--grad-clip", "0"], ["grad_clip", "> 0"]),
    cli("val-size-negative", [*TRAIN, "--val-size", "-5"], ["--val-size", ">= 0", "-5"]),
    cli("eval-n-zero", [*TRAIN, "--eval-n", "0"], ["--eval-n", ">= 1"]),
    cli("eval-step-zero", [*TRAIN, "--eval-step", "0"], ["--eval-step", "0 < step <= 1"]),
    cli("eval-attack-unknown", [*TRAIN, "--eval-attacks", "clean,pgdx"], ["pgdx", "pgd20"]),
    cli("seed-beyond-64-bits", [*TRAIN, "--seed", str(10**23)], ["seed", "4294967295"]),
    cli("seed-a-fraction-in-a-file", [*TRAIN, *CONFIG], ["seed", "c.yaml", "integer"], "seed: 1.5\n"),
    cli("device-meta", [*TRAIN, "--device", "meta"], ["meta", "cuda:N"]),
    cli("device-lazy", [*TRAIN, "--device", "lazy"], ["lazy", "cuda:N"]),
    cli("config-a-directory", [*TRAIN, "--config", "{tmp}"], ["is a directory"]),
    # cstar train's --config file
    cli("file-epochs-a-list", [*TRAIN, *CONFIG], ["epochs", "c.yaml", "integer", "[1]"], "epochs: [1]\n"),
    cli("file-epochs-a-fraction", [*TRAIN, *CONFIG], ["epochs", "c.yaml", "1.7"], "epochs: 1.7\n"),
    cli("file-epochs-a-bool", [*TRAIN, *CONFIG], ["epochs", "c.yaml", "True"], "epochs: true\n"),
    cli("file-batch-size-a-fraction", [*TRAIN, *CONFIG], ["batch_size", "0.5"], "batch_size: 0.5\n"),
    cli("file-seed-negative", [*TRAIN, *CONFIG], ["seed", "c.yaml"], "seed: -1\n"),
    cli("file-val-size-negative", [*TRAIN, *CONFIG], ["val_size", "c.yaml"], "val_size: -5\n"),
    cli("file-eval-n-zero", [*TRAIN, *CONFIG], ["eval_n", "c.yaml"], "eval_n: 0\n"),
    cli("file-amp-a-number", [*TRAIN, *CONFIG], ["amp", "true or false"], "amp: 2\n"),
    cli("file-device-meta", [*TRAIN, *CONFIG], ["meta"], "device: meta\n"),
    cli("file-model-arg-one-pair", [*TRAIN, *CONFIG], ["width", "small_cnn"], "model_arg: width=3\n"),
    cli("file-model-arg-a-mapping", [*TRAIN, *CONFIG], ["model_arg", "KEY=VALUE"], "model_arg: {width: 3}\n"),
    # cstar compress: sections, evaluation, ratio
    cli("section-rho-text", [*COMPRESS, "--admm", "{rho: abc}"], ["--admm", "rho", "'abc'"]),
    cli("section-lr-text", [*COMPRESS, "--finetune", "{lr: abc}"], ["--finetune", "lr", "'abc'"]),
    cli("section-epochs-fraction", [*COMPRESS, "--search", "{epochs: 1.5}"], ["--search", "epochs", "1.5"]),
    cli("section-epochs-bool", [*COMPRESS, "--dense", "{epochs: true}"], ["--dense", "epochs", "True"]),
    cli("section-interval-zero", [*COMPRESS, "--admm", "{interval: 0}"], ["--admm", "interval", ">= 1"]),
    cli("section-decoupled-text", [*COMPRESS, "--admm", "{decoupled: maybe}"], ["decoupled", "true or false"]),
    cli("section-amp-a-number", [*COMPRESS, "--finetune", "{amp: 1}"], ["--finetune", "amp", "true or false"]),
    cli("section-eps-text", [*COMPRESS, "--finetune", "{eps: abc}"], ["--finetune", "eps", "not a number"]),
    cli("file-section-a-list", [*COMPRESS, *CONFIG], ["finetune", "mapping"], "finetune: [1]\n"),
    cli("compress-eval-n-zero", [*COMPRESS, "--eval-n", "0"], ["--eval-n", ">= 1"]),
    cli("compress-autoattack-n-negative", [*COMPRESS, "--autoattack-n", "-1"], ["--autoattack-n", ">= 0"]),
    cli("compress-eval-step-above-one", [*COMPRESS, *CONFIG], ["eval_step", "c.yaml", "0 < step <= 1"], "eval_step: 2\n"),
    # cstar compare
    cli("compare-latency-runs-negative", [*COMPARE, "--methods", "dense", "--latency-runs", "-1"],
        ["--latency-runs", ">= 0"]),
    cli("compare-unreachable-ratio", [*COMPARE, "--methods", "lowrank_global", "--ratios", "1000"],
        ["1000x", "unreachable"]),
    cli("compare-ratio-inf", [*COMPARE, "--ratios", "4,inf"], ["--ratios", "> 1", "inf"]),
    cli("compare-autoattack-n-negative", [*COMPARE, "--autoattack-n", "-1"], ["--autoattack-n", ">= 0"]),
    cli("compare-search-momentum", [*COMPARE, "--search", "{momentum: 2}"], ["--search", "momentum", "[0, 1]"]),
    cli("file-latency-runs-negative", [*COMPARE, *CONFIG], ["latency_runs", "c.yaml"], "latency_runs: -3\n"),
    # the other commands
    cli("info-zero-classes", ["info", "--model", "small_cnn", "--num-classes", "0"], ["--num-classes", ">= 1"]),
    cli("ranks-multiple-of-coarser-than-layers", ["ranks", "--model", "small_cnn", "--data", "digits", "--ratio", "4",
                                                  "--multiple-of", "64"], ["multiple_of=64", "4x target", "conv2"]),
    cli("ranks-ratio-nan", ["ranks", "--model", "small_cnn", "--ratio", "nan"], ["--ratio", "> 1"]),
    cli("ranks-width-zero", ["ranks", "--model", "resnet18", "--ratio", "4", "--width", "0"], ["--width", ">= 1"]),
    cli("ranks-macs-ratio-inf", ["ranks", "--model", "small_cnn", "--ratio", "4", "--budget", "joint",
                                  "--macs-ratio", "inf"], ["--macs-ratio", "> 1"]),
    cli("decompose-n-iter-negative", ["decompose", "{tmp}/model.pt", "--ratio", "4", "--n-iter", "-1"],
        ["--n-iter", ">= 0"]),
    cli("eval-command-n-zero", ["eval", "{tmp}/model.pt", "--n", "0"], ["--n", ">= 1"]),
    cli("eval-batch-size-zero", ["eval", "{tmp}/model.pt", "--batch-size", "0"], ["batch_size", ">= 1"]),
    cli("demo-phase-epochs-zero", ["demo", "--phase-epochs", "0"], ["--phase-epochs", ">= 1"]),
    cli("demo-ratio-one", ["demo", "--ratios", "4,1"], ["--ratios", "> 1"]),
    # Python configs
    api("train-config-fractional-epochs", lambda tmp: TrainConfig(epochs=1.5), ["epochs", "integer", "1.5"]),
    api("train-config-bool-epochs", lambda tmp: TrainConfig(epochs=True), ["epochs", "True"]),
    api("train-config-momentum-negative", lambda tmp: TrainConfig(momentum=-1), ["momentum", "[0, 1]"]),
    api("train-config-weight-decay-nan", lambda tmp: TrainConfig(weight_decay=math.nan), ["weight_decay", "nan"]),
    api("train-config-trades-beta-negative", lambda tmp: TrainConfig(trades_beta=-1), ["trades_beta"]),
    api("train-config-eps-warmup-negative", lambda tmp: TrainConfig(eps_warmup_epochs=-1), ["eps_warmup_epochs"]),
    api("train-config-seed-too-large", lambda tmp: TrainConfig(seed=2**40), ["seed", "4294967295"]),
    api("train-config-amp-text", lambda tmp: TrainConfig(amp="yes"), ["amp", "true or false"]),
    api("train-config-lr-text", lambda tmp: TrainConfig(lr="0.1"), ["lr", "'0.1'"]),
    api("train-config-from-pairs", lambda tmp: TrainConfig.from_dict([("epochs", 1)]), ["mapping"]),
    api("admm-config-rho-text", lambda tmp: ADMMConfig(rho="abc"), ["rho", "'abc'"]),
    api("admm-config-interval-fraction", lambda tmp: ADMMConfig(interval=2.5), ["interval", "integer"]),
    api("admm-config-decoupled-int", lambda tmp: ADMMConfig(decoupled=1), ["decoupled", "true or false"]),
    api("admm-config-rho-growth-nan", lambda tmp: ADMMConfig.from_dict({"rho_growth": math.nan}),
        ["rho_growth", "nan"]),
    api("compress-config-ratio-inf", lambda tmp: CompressConfig(ratio=math.inf), ["ratio", "> 1", "inf"]),
    api("compress-config-min-rank-bool", lambda tmp: CompressConfig(min_rank=True), ["min_rank", "True"]),
    api("compress-config-eval-n-zero", lambda tmp: CompressConfig(eval_n=0), ["eval_n", ">= 1"]),
    api("compress-config-autoattack-n-negative", lambda tmp: CompressConfig(autoattack_n=-1), ["autoattack_n"]),
    api("compress-config-section-a-dict", lambda tmp: CompressConfig(finetune={"epochs": 2}),
        ["finetune", "TrainConfig", "from_dict"]),
    api("compress-config-eval-attack-unknown", lambda tmp: CompressConfig(eval_attacks=["pgdx"]), ["pgdx"]),
    api("compress-config-nested-fraction", lambda tmp: CompressConfig.from_dict({"finetune": {"epochs": 1.5}}),
        ["epochs", "1.5"]),
    api("compare-config-ratio-inf", lambda tmp: CompareConfig(ratios=[4, math.inf]), ["ratios[1]", "> 1"]),
    api("compare-config-ratio-bool", lambda tmp: CompareConfig(ratios=[True]), ["ratios[0]", "> 1"]),
    api("compare-config-latency-runs-negative", lambda tmp: CompareConfig(latency_runs=-1), ["latency_runs"]),
    api("compare-config-eval-step-above-one", lambda tmp: CompareConfig(eval_step=2), ["eval_step", "0 < step <= 1"]),
    api("compare-config-methods-text", lambda tmp: CompareConfig(methods="cstar"), ["methods"]),
    api("compare-config-nested-rho-text", lambda tmp: CompareConfig.from_dict({"admm": {"rho": "abc"}}), ["rho"]),
    api("rank-spec-short-input-shape", lambda tmp: RankSpec(4, input_shape=(3, 32)), ["input_shape", "(C, H, W)"]),
    api("rank-spec-empty-input-dimension", lambda tmp: RankSpec(4, input_shape=(3, 0, 32)), ["input_shape[1]"]),
    api("select-ranks-input-of-other-channels",
        lambda tmp: select_ranks(digits_model(), RankSpec(4, input_shape=(3, 32, 32))), ["(3, 32, 32)", "channels"]),
    api("select-ranks-multiple-of-coarser-than-layers", lambda tmp: select_ranks(digits_model(), 4, multiple_of=64),
        ["multiple_of=64", "4x target"]),
    # Python pipelines: refused before any work, nothing written
    api("compress-a-tuple-as-data", lambda tmp: fast_compress(tmp, train_set=(torch.zeros(4, 1, 8, 8), torch.zeros(4))),
        ["train_set", "cstar.data"]),
    api("compress-a-dict-as-config", lambda tmp: fast_compress(tmp, config={"ratio": 4}),
        ["CompressConfig", "from_dict"]),
    api("compress-a-file-as-out-dir", lambda tmp: fast_compress(tmp, out_dir=a_file(tmp / "x")), ["is a file"]),
    api("compress-val-size-negative", lambda tmp: fast_compress(tmp, val_size=-5), ["val_size", ">= 0"]),
    api("compress-seed-negative", lambda tmp: fast_compress(tmp, seed=-1), ["seed"]),
    api("compare-a-dict-as-config", lambda tmp: fast_compare(tmp, {"ratios": [4]}), ["CompareConfig", "from_dict"]),
    api("compare-unreachable-ratio",
        lambda tmp: fast_compare(tmp, CompareConfig(methods=["lowrank_global"], ratios=[1000])),
        ["1000x", "unreachable"]),
]


@pytest.mark.parametrize("case, config, words", CASES)
def test_a_hostile_setting_is_refused_in_one_line_before_any_work(capsys, tmp_path, case, config, words):
    out = tmp_path / "out"
    if callable(case):
        (tmp_path / "x").mkdir()
        refused_api(lambda: case(tmp_path), words, tmp=tmp_path)
        assert not out.exists(), "a refused call left its output directory behind"
        return
    if config is not None:
        (tmp_path / "c.yaml").write_text(config)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case]
    if argv[0] in WITH_OUT:
        argv += ["--out", str(out)]
    refused_cli(capsys, argv, words, tmp=tmp_path, left=[out])
