"""Runs that survive being killed: SIGKILL mid-epoch then --resume, SIGTERM/SIGINT stop cleanly mid-epoch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import yaml
from digits_runs import refused, run
from helpers import BatchHook

import cstar
from cstar import CstarError, data
from cstar._core.signals import Interrupted
from cstar.cli import main
from cstar.training.fit import TrainConfig, TrainHook, fit

TRAIN = ["train", "--model", "small_cnn", "--data", "digits", "--attack", "pgd", "--attack-steps", "2",
         "--epochs", "3", "--batch-size", "16", "--optimizer", "adam", "--lr", "2e-3", "--check-size", "64",
         "--eval-attacks", "clean,pgd5", "--seed", "3", "--no-progress"]
TIMINGS = ("train_seconds", "images_per_second", "seconds")


def without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "full"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


def _start(out, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "cstar", *TRAIN, "--out", str(out), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120.0):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    proc = _start(out)
    _wait_for(out / "checkpoint.pt", proc)  # epoch 1 done: the kill lands inside epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run ended before it could be killed"
    assert main([*TRAIN, "--out", str(out), "--resume"]) == 0
    assert without_timings(read_jsonl(out / "metrics.jsonl")) == without_timings(
        read_jsonl(uninterrupted / "metrics.jsonl"))
    a, b = (cstar.load(p / "model").state_dict() for p in (uninterrupted, out))
    assert same_weights(a, b)
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (uninterrupted, out))
    assert (ra["clean_acc"], ra["pgd5_acc"]) == (rb["clean_acc"], rb["pgd5_acc"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_and_exits_cleanly(tmp_path, signum):
    out = tmp_path / "stopped"
    proc = _start(out)
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert "--resume" in stderr and "Traceback" not in stderr
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] >= 1 and not list(out.glob("*.tmp"))


def _signal_at(loader, epoch, batch, signum=signal.SIGTERM):
    """``loader``, sending this process ``signum`` while yielding batch ``batch`` of epoch ``epoch``."""
    def on_batch(e, i, _):
        if (e, i) == (epoch, batch):
            os.kill(os.getpid(), signum)
    return BatchHook(loader, on_batch)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def test_sigterm_mid_epoch_resumes_at_the_batch_where_it_stopped(tmp_path):
    train_set = data.load("digits", split="train")
    config = TrainConfig(attack="pgd", epochs=2, batch_size=64, eps=0.1, attack_steps=2, optimizer="adam", lr=3e-3,
                         weight_decay=0.0, check_size=0, progress=False)
    full = _tiny()
    fit(full, data.make_loader(train_set, 64, train=True, seed=0), config, out_dir=tmp_path / "full")

    stopped = _tiny()
    with pytest.raises(Interrupted, match="epoch 2, batch 6/22"):
        fit(stopped, _signal_at(data.make_loader(train_set, 64, train=True, seed=0), epoch=1, batch=5), config,
            out_dir=tmp_path / "stopped")
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["batches"] == 6
    resumed = _tiny(seed=1)
    fit(resumed, data.make_loader(train_set, 64, train=True, seed=0), config, out_dir=tmp_path / "stopped", resume=True)
    assert same_weights(full.state_dict(), resumed.state_dict())
    assert without_timings(read_jsonl(tmp_path / "stopped" / "metrics.jsonl")) == without_timings(
        read_jsonl(tmp_path / "full" / "metrics.jsonl"))


def test_resume_falls_back_to_the_previous_checkpoint_when_the_latest_is_corrupt(tmp_path):
    train_set = data.load("digits", split="train")
    config = TrainConfig(attack="clean", epochs=2, batch_size=64, optimizer="adam", lr=3e-3, weight_decay=0.0,
                         check_size=0, progress=False)
    fit(_tiny(), data.make_loader(train_set, 64, train=True, seed=0), config, out_dir=tmp_path)
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="previous checkpoint"):
        history = fit(_tiny(), data.make_loader(train_set, 64, train=True, seed=0), config, out_dir=tmp_path,
                      resume=True)
    assert [r["epoch"] for r in history] == [1, 2]


class _KilledAfter(Exception):
    pass


@pytest.mark.parametrize("per_example", [False, True])
def test_a_killed_evaluation_resumes_after_its_last_batch_with_the_same_result(tmp_path, monkeypatch, per_example):
    import importlib

    from cstar.evaluation.evaluate import evaluate

    evaluate_module = importlib.import_module("cstar.evaluation.evaluate")

    test_set = data.load("digits", split="test")
    model = _tiny()
    out = tmp_path / "eval.json"
    full = evaluate(model, test_set, ["clean", "pgd3"], eps=0.1, batch_size=64, per_example=per_example)

    calls = {"n": 0}
    real_write = evaluate_module.write_json

    def write_then_die(path, obj):  # the process dies right after saving its progress for batch 3
        real_write(path, obj)
        calls["n"] += 1
        if calls["n"] == 3:
            raise _KilledAfter

    monkeypatch.setattr(evaluate_module, "write_json", write_then_die)
    with pytest.raises(_KilledAfter):
        evaluate(model, test_set, ["clean", "pgd3"], eps=0.1, batch_size=64, out_path=out, per_example=per_example)
    monkeypatch.setattr(evaluate_module, "write_json", real_write)
    assert json.loads(out.with_name("eval.json.partial").read_text())["batches"] == 3 and not out.exists()

    resumed = evaluate(model, test_set, ["clean", "pgd3"], eps=0.1, batch_size=64, out_path=out, resume=True,
                       per_example=per_example)
    assert resumed["accuracy"] == full["accuracy"] and resumed["n_examples"] == full["n_examples"]
    assert resumed.get("per_example") == full.get("per_example")
    assert out.exists() and not out.with_name("eval.json.partial").exists()


def _resume_from_counts_only_progress(tmp_path, saved_eps: float, **options) -> None:
    """Resume a clean evaluation (eps 0.1, batch 64) from saved progress of one batch, counts only, at ``saved_eps``."""
    from cstar.evaluation.evaluate import evaluate

    out = tmp_path / "eval.json"
    out.with_name("eval.json.partial").write_text(json.dumps(
        {"labels": ["clean"], "eps": saved_eps, "n": None, "batch_size": 64, "seed": 0, "batches": 1, "total": 64,
         "correct": {"clean": 10}, "seconds": {"clean": 0.1}}))
    evaluate(_tiny(), data.load("digits", split="test"), ["clean"], eps=0.1, batch_size=64, out_path=out,
             resume=True, **options)


def test_resuming_an_evaluation_with_other_settings_is_refused(tmp_path):
    from cstar._core.errors import CstarError

    with pytest.raises(CstarError, match="other settings"):
        _resume_from_counts_only_progress(tmp_path, saved_eps=0.3)


def test_resuming_counts_only_progress_per_example_is_refused(tmp_path):
    from cstar._core.errors import CstarError

    with pytest.raises(CstarError, match="counts only"):
        _resume_from_counts_only_progress(tmp_path, saved_eps=0.1, per_example=True)


class _Steps(TrainHook):
    """Counts optimiser steps (by ``by`` each), and saves the count as its state."""

    by = 1

    def __init__(self):
        self.count = 0

    def after_step(self, model, step):
        self.count += self.by

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class _Tens(_Steps):
    by = 10


def _hooked_fit(out, epochs, hooks, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = TrainConfig(attack="clean", epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
                         check_size=0, progress=False)
    loader = data.make_loader(data.load("digits", split="train"), 64, train=True)
    fit(model, loader, config, out_dir=out, resume=resume, hooks=hooks)
    return len(loader)


def test_each_hook_gets_its_own_state_back_whatever_their_order(tmp_path):
    steps = _hooked_fit(tmp_path, 1, [_Steps(), _Tens()])
    ones, tens = _Steps(), _Tens()
    _hooked_fit(tmp_path, 2, [tens, ones], resume=True)  # the same hooks, listed the other way round
    assert (ones.count, tens.count) == (2 * steps, 20 * steps)


def test_a_resume_with_other_hooks_is_refused_before_anything_is_loaded(tmp_path):
    _hooked_fit(tmp_path, 1, [_Steps(), _Tens()])
    with pytest.raises(CstarError, match=r"hooks \[_Steps, _Tens\], this run has \[_Steps\]"):
        _hooked_fit(tmp_path, 2, [_Steps()], resume=True)


def test_train_resumes_from_its_directory_alone(capsys, trained):
    code, out, err = run(capsys, "train", "--resume", "--out", trained, "--no-progress")
    assert code == 0, err  # was: --model is required; given it: KeyError 'momentum' (Adam state into SGD)
    assert yaml.safe_load((trained / "config.yaml").read_text())["optimizer"] == "adam"


def test_a_resume_with_other_settings_is_refused_and_rewrites_nothing(capsys, trained):
    before = {name: (trained / name).read_bytes() for name in ("config.yaml", "env.json")}
    line = refused(capsys, "train", "--resume", "--out", trained, "--model", "resnet20", "--epochs", "3")
    assert "--model resnet20 (the run has small_cnn)" in line and "--epochs 3 (the run has 1)" in line
    assert {name: (trained / name).read_bytes() for name in before} == before


def test_fit_refuses_a_checkpoint_of_another_architecture_in_one_line(tmp_path):
    train_set = data.load("digits", split="train")
    config = TrainConfig(attack="clean", epochs=1, batch_size=64, check_size=0, progress=False)
    fit(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), data.make_loader(train_set, 64, train=True), config,
        out_dir=tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(CstarError, match="does not fit this model"):
        fit(other, data.make_loader(train_set, 64, train=True), TrainConfig(**{**config.to_dict(), "epochs": 2}),
            out_dir=tmp_path, resume=True)


def test_fit_refuses_to_resume_with_another_optimizer(tmp_path):
    train_set = data.load("digits", split="train")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = TrainConfig(attack="clean", epochs=1, batch_size=64, check_size=0, progress=False, optimizer="adam")
    fit(model, data.make_loader(train_set, 64, train=True), config, out_dir=tmp_path)
    with pytest.raises(CstarError, match="optimizer adam"):
        fit(model, data.make_loader(train_set, 64, train=True),
            TrainConfig(**{**config.to_dict(), "epochs": 2, "optimizer": "sgd"}), out_dir=tmp_path, resume=True)


def test_compress_resumes_from_its_directory_alone(capsys, compressed):
    code, out, err = run(capsys, "compress", "--resume", "--out", compressed)
    assert code == 0, err  # was: error: --data is required
    assert "model in" in out


def test_a_comparison_resumed_with_another_training_budget_is_refused(capsys, compared):
    before = (compared / "config.yaml").read_bytes()
    line = refused(capsys, "compare", "--resume", "--out", compared, "--train-n", "1000")
    assert "--train-n 1000 (the run has 800)" in line  # was accepted: two budgets in one table
    assert (compared / "config.yaml").read_bytes() == before


def test_a_comparison_resumes_from_its_directory_with_new_evaluation_settings(capsys, compared):
    code, out, err = run(capsys, "compare", "--resume", "--out", compared, "--eval-attacks", "clean,fgsm")
    assert code == 0, err
    results = json.loads((compared / "results.json").read_text())
    assert set(results["cells"]["magnitude-2x"]["accuracy"]) == {"clean", "fgsm"}


def test_a_comparison_resumed_with_another_method_trains_only_the_new_cell(capsys, compared, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(compared, out)
    finished = (out / "cells" / "magnitude-2x" / "result.json").read_bytes()
    code, _, err = run(capsys, "compare", "--resume", "--out", out, "--methods", "dense,magnitude,lowrank_global")
    assert code == 0, err  # was refused: "--methods ... (the run has dense,magnitude)"
    assert (out / "cells" / "magnitude-2x" / "result.json").read_bytes() == finished  # not retrained
    assert set(json.loads((out / "results.json").read_text())["cells"]) == {"dense", "magnitude-2x",
                                                                           "lowrank_global-2x"}
    assert yaml.safe_load((out / "config.yaml").read_text())["methods"] == "dense,magnitude,lowrank_global"


def resumed_output(capsys, out_dir, epochs: int) -> str:
    """What a resume with ``epochs`` epochs prints after a finished run of one epoch in ``out_dir``."""
    train_set = data.load("digits", split="train")
    config = TrainConfig(attack="clean", epochs=1, batch_size=64, check_size=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fit(model, data.make_loader(train_set, 64, train=True), config, out_dir=out_dir, name="dense")
    capsys.readouterr()
    fit(model, data.make_loader(train_set, 64, train=True), TrainConfig(**{**config.to_dict(), "epochs": epochs}),
        out_dir=out_dir, resume=True, name="dense")
    return capsys.readouterr().out


def test_a_resumed_run_says_where_it_resumes(capsys, tmp_path):
    out = resumed_output(capsys, tmp_path, epochs=2)
    assert f"dense: resuming {tmp_path / 'checkpoint.pt'} at epoch 2 of 2" in out
    assert "dense: epoch   2/2" in out


def test_a_resume_check_names_every_nested_setting_that_differs_and_labels_whole_values():
    from cstar._core.recorded import differences

    before = {"search": {"lr": 0.1, "epochs": 2}, "seed": 0, "attacks": {"pgd20": {"step": 0.01}}}
    now = {"search": {"lr": 0.2, "epochs": 2, "amp": True}, "seed": 0, "attacks": {"pgd20": {"step": 0.02}}}
    assert differences(before, now) == ["attacks.pgd20.step", "search.amp", "search.lr"]
    assert differences(before, now, {"attacks": "the attacks"}) == ["the attacks", "search.amp", "search.lr"]
    assert differences(before, before) == []


def test_a_resume_with_other_settings_is_refused_in_one_line_naming_them():
    from cstar._core.recorded import check_same

    check_same({"n": 5}, {"n": 5}, "x", "fix")  # the same: nothing raised
    with pytest.raises(CstarError) as caught:
        check_same({"n": 5, "seed": 0}, {"n": 6, "seed": 0}, "the card was written", "delete it")
    assert str(caught.value) == "the card was written with other settings (n differ): delete it"


def test_a_resume_of_a_finished_run_says_it_is_done_not_a_later_epoch(capsys, tmp_path):
    out = resumed_output(capsys, tmp_path, epochs=1)
    assert f"dense: all 1 epoch(s) done in {tmp_path / 'checkpoint.pt'}" in out
    assert "epoch 2 of 1" not in out
