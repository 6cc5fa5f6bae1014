"""`cstar compress` end to end on tiny real MNIST data: outputs, reload, resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import cstar
from cstar import TrainConfig, data
from cstar.cli import main
from cstar.files.serialize import load

DATA = os.environ.get("CSTAR_TEST_DATA")
pytestmark = pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")

ARGS = ["compress", "--model", "small_cnn", "--data", "mnist", "--root", DATA, "--ratio", "8",
        "--train-n", "200", "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean,pgd5",
        "--dense", "{epochs: 2, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 50, check_size: 0}",
        "--search", "{epochs: 3, optimizer: adam, lr: 0.001, attack_steps: 2, batch_size: 50, check_size: 0}",
        "--admm", "{interval: 3, rho: 0.01}",
        "--finetune", "{epochs: 2, optimizer: adam, lr: 0.0005, attack_steps: 2, batch_size: 50, check_size: 0}",
        "--no-progress"]


def stable(results: dict) -> dict:
    """results.json without wall times."""
    results = json.loads(json.dumps(results))
    for info in results["phases"].values():
        info.pop("seconds", None)
    return results


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    assert main([*ARGS, "--out", str(out)]) == 0
    return out


def test_a_run_writes_model_results_report_and_plots(finished):
    names = {p.name for p in finished.iterdir()}
    assert {"model", "results.json", "report.md", "plan.json", "phases.json", "config.yaml", "env.json"} <= names
    results = json.loads((finished / "results.json").read_text())
    assert results["params"]["ratio"] >= 8.0 * 0.98
    assert set(results["accuracy"]) == {"dense", "admm_projected", "final"}
    assert results["phases"]["decompose"]["output_gap"] < 1e-4
    report = (finished / "report.md").read_text()
    assert "Accuracy by phase" in report and "ADMM primal residual" in report
    pytest.importorskip("matplotlib")
    assert {"accuracy_by_phase.png", "ranks_by_layer.png", "admm_residual.png"} <= names


def test_the_saved_model_says_what_it_was_compressed_to_and_reached(finished):
    results = json.loads((finished / "results.json").read_text())
    compression = cstar.load(finished / "model").cstar_compression
    assert compression["target_ratio"] == 8.0 and compression["budget"] == "params"
    assert compression["achieved_ratio"] == pytest.approx(results["params"]["ratio"])
    ranks = json.loads((finished / "phases.json").read_text())["ranks"]
    assert ranks["achieved_ratio"] == pytest.approx(compression["plan_ratio"])  # not under the target's key


def test_the_saved_model_reloads_with_its_factorised_layers(finished):
    model = load(finished / "model")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "Tucker2Conv2d" in kinds or "LowRankLinear" in kinds
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10)
    params = sum(p.numel() for p in model.parameters())
    assert params == json.loads((finished / "results.json").read_text())["params"]["compressed"]


def test_resume_after_sigkill_gives_the_same_results(finished, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cstar", *ARGS, "--out", str(out), "--seed", "0"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "search" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    phases = json.loads((out / "phases.json").read_text())
    assert "search" not in phases, "the run ended before it could be killed mid-ADMM"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    a = json.loads((finished / "results.json").read_text())
    b = json.loads((out / "results.json").read_text())
    assert stable(a) == stable(b)
    wa, wb = load_file(finished / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_of_a_finished_run_reruns_nothing(finished, capsys):
    before = (finished / "phases.json").read_text()
    assert main([*ARGS, "--out", str(finished), "--resume"]) == 0
    assert (finished / "phases.json").read_text() == before


def test_the_report_states_dataset_eps_subset_and_budget_with_rounded_figures(compressed):
    import re

    report = (compressed / "report.md").read_text()
    assert "digits, L-inf eps 0.2; evaluated on first 100 examples; training budget: ADMM 1 epoch(s) of pgd-2" in report
    assert not re.search(r"\d\.\d{7,}", report)  # was: ratio=8.01329744279946
    results = json.loads((compressed / "results.json").read_text())
    assert results["config"]["dense"] is None  # the dense model was given: no dense training was recorded


def test_the_rank_plot_shows_an_svd_layers_full_rank_as_its_smaller_side():
    from cstar.pipeline.report import _full_rank

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 300), nn.ReLU(), nn.Linear(300, 20), nn.ReLU(), nn.Linear(20, 10))
    plan = __import__("cstar").select_ranks(model, 2, exclude=[])
    layer = plan.layers["3"]
    assert layer.kind == "svd" and _full_rank(layer) == 20  # was 300, a rank an SVD of 20x300 cannot have


def test_the_compression_phases_take_the_eps_of_the_training_data():
    from cstar.pipeline.compress import CompressConfig
    from cstar.pipeline.phases import with_data_eps

    config = with_data_eps(CompressConfig(), data.DATASETS["fashion_mnist"], ("dense", "search", "finetune"))
    assert config.dense.eps == config.search.eps == config.finetune.eps == pytest.approx(0.1)
    given = with_data_eps(CompressConfig(finetune=TrainConfig(eps=0.2)), data.DATASETS["mnist"], ("finetune",))
    assert given.finetune.eps == 0.2  # a given eps is kept
