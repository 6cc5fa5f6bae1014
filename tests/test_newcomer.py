"""What a newcomer tripped on, following the README on a fresh clone (issue "Defaults that work").

Each test is one case that went wrong: a refused run that leaves no output, a
mistake named in one line before any work, a resume from the run directory
alone, a log a person can read. Tiny data: scikit-learn's digits, and MNIST
when ``CSTAR_TEST_DATA`` is set.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

from cstar import TrainConfig, TrainHook, data, fit
from cstar._core.errors import CstarError
from cstar.cli import main, parse_args

DATA = os.environ.get("CSTAR_TEST_DATA")
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "1", "--attack-steps", "2", "--batch-size", "64", "--val-size", "100", "--check-size", "50",
        "--eval-attacks", "clean,pgd3", "--eval-n", "100", "--no-progress", "--optimizer", "adam", "--lr", "0.002"]
SECTION = "{epochs: 1, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 64, check_size: 50}"
PIPELINE = ["--data", "digits", "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean,pgd3",
            "--no-progress", "--finetune", SECTION, "--admm-train", SECTION]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    """The one error line of a refused command (exit 2)."""
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small_cnn trained 1 epoch on digits by 'cstar train' with Adam."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--out", str(out), *FAST]) == 0
    return out


# --- settings merge key by key ----------------------------------------------------------------------------------

def test_a_section_flag_beside_a_preset_changes_only_the_keys_it_names():
    preset_path = ROOT / "configs" / "mnist_small_cnn_cpu.yaml"
    args = parse_args(["compress", "--config", str(preset_path), "--admm-train", "{epochs: 1}"])
    preset = yaml.safe_load(preset_path.read_text())["admm_train"]
    assert args.admm_train == {**preset, "epochs": 1}  # was {epochs: 1}: PGD-10 with SGD at lr 0.1 silently


# --- checked before any work ------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", ["0.5", "100000"])
def test_an_impossible_ratio_is_refused_before_training_and_leaves_no_output(capsys, tmp_path, ratio):
    out = tmp_path / "run"
    line = refused(capsys, "compress", "--model", "small_cnn", *PIPELINE, "--dense", SECTION, "--ratio", ratio,
                   "--out", out)
    assert "ratio" in line or "unreachable" in line
    assert not out.exists()


def test_an_impossible_ratio_from_a_checkpoint_leaves_no_dense_copy(capsys, trained, tmp_path):
    out = tmp_path / "run"
    refused(capsys, "compress", "--checkpoint", trained / "model.pt", *PIPELINE, "--ratio", "0.5", "--out", out)
    assert not out.exists()  # was: a dense.pt left behind, and the rerun refused with "already exists"


def test_a_model_flag_that_contradicts_the_checkpoint_is_refused(capsys, trained, tmp_path):
    line = refused(capsys, "compress", "--checkpoint", trained / "model.pt", "--model", "resnet18", *PIPELINE,
                   "--ratio", "2", "--out", tmp_path / "run")
    assert "--model resnet18" in line and "small_cnn" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_a_checkpoint_evaluated_on_images_of_another_shape_is_one_line(capsys, trained):
    line = refused(capsys, "eval", trained / "model.pt", "--data", "mnist", "--root", DATA)
    assert "1x8x8" in line and "1x28x28" in line  # was a traceback from inside torch


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    if not DATA:
        pytest.skip("CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
    out = tmp_path_factory.mktemp("runs") / "mnist"
    assert main(["train", "--model", "small_cnn", "--data", "mnist", "--root", DATA, "--train-n", "600",
                 "--attack", "clean", "--out", str(out), *FAST]) == 0
    return out


def test_train_takes_the_first_n_training_images(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--model", "small_cnn", "--data", "digits", "--train-n", "300",
                         "--attack", "clean", "--out", tmp_path / "run", *FAST)
    assert code == 0, err  # was: unrecognized arguments: --train-n
    assert "(200 train / 360 test images)" in out  # 300 images, the last 100 held out for the check
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train_n"] == 300


def test_another_dataset_of_the_same_shape_is_evaluated_at_its_own_eps(capsys, mnist_run):
    code, out, _ = run(capsys, "eval", mnist_run / "model.pt", "--data", "fashion_mnist", "--root", DATA,
                       "--attacks", "clean", "--n", "32")
    assert code == 0
    assert "trained on mnist" in out and "eps=0.1" in out  # was eps 0.3, MNIST's, silently


def test_a_text_file_as_checkpoint_is_named_as_such(capsys, tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("hello\n")
    line = refused(capsys, "eval", path, "--data", "digits")
    assert "not a PyTorch file" in line and "(101)" not in line


# --- resume from the run directory alone ------------------------------------------------------------------------

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


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("compress") / "run"
    assert main(["compress", "--checkpoint", str(trained / "model.pt"), *PIPELINE, "--ratio", "2",
                 "--admm", "{interval: 5}", "--out", str(out)]) == 0
    return out


def test_compress_resumes_from_its_directory_alone(capsys, compressed):
    code, out, err = run(capsys, "compress", "--resume", "--out", compressed)
    assert code == 0, err  # was: error: --data is required
    assert "model in" in out


def test_compress_logs_name_their_phase_and_the_admm_residual(capsys, trained, tmp_path):
    with_progress = [a for a in PIPELINE if a != "--no-progress"]
    code, out, _ = run(capsys, "compress", "--checkpoint", trained / "model.pt", *with_progress, "--ratio", "2",
                       "--admm", "{interval: 5}", "--out", tmp_path / "run")
    out_lines = out.splitlines()
    assert code == 0
    assert any(line.startswith("admm: epoch") and "ADMM residual" in line for line in out_lines), out
    assert any(line.startswith("finetune: epoch") for line in out_lines), out


@pytest.fixture(scope="module")
def compared(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("compare") / "run"
    assert main(["compare", "--checkpoint", str(trained / "model.pt"), "--data", "digits", "--train-n", "800",
                 "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean", "--no-progress", "--ratios", "2",
                 "--methods", "dense,magnitude", "--search", SECTION, "--finetune", SECTION, "--latency-runs", "0",
                 "--out", str(out)]) == 0
    return out


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


# --- small things ---------------------------------------------------------------------------------------------

def test_export_refuses_to_overwrite_without_force(capsys, trained, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("an earlier export")
    line = refused(capsys, "export", trained / "model.pt", "--out", target)
    assert "--force" in line and target.read_text() == "an earlier export"
    code, _, err = run(capsys, "export", trained / "model.pt", "--out", target, "--force")
    assert code == 0, err
    assert target.read_bytes()[:4] != b"an e"


def test_piped_training_logs_one_line_per_epoch(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cstar", "train", "--model", "small_cnn", "--data", "digits",
                           "--out", str(tmp_path / "run"), "--epochs", "2", "--val-size", "100", "--check-size",
                           "50", "--eval-attacks", "clean", "--attack-steps", "5", "--batch-size", "16",
                           "--optimizer", "adam", "--lr", "0.002"],  # epochs of ~2 s: the bar would refresh
                          capture_output=True, timeout=120)  # bytes: text mode would turn \r into \n
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert b"\r" not in proc.stderr + proc.stdout  # was tqdm's carriage-return updates, 54 KB an epoch
    assert sum(line.startswith("epoch ") for line in proc.stdout.decode().splitlines()) == 2


def test_a_resumed_run_says_where_it_resumes(capsys, tmp_path):
    train_set = data.load("digits", split="train")
    config = TrainConfig(attack="clean", epochs=1, batch_size=64, check_size=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    fit(model, data.make_loader(train_set, 64, train=True), config, out_dir=tmp_path, name="dense")
    capsys.readouterr()
    fit(model, data.make_loader(train_set, 64, train=True), TrainConfig(**{**config.to_dict(), "epochs": 2}),
        out_dir=tmp_path, resume=True, name="dense")
    out = capsys.readouterr().out
    assert f"dense: resuming {tmp_path / 'checkpoint.pt'} at epoch 2 of 2" in out
    assert "dense: epoch   2/2" in out


def test_pytest_keeps_only_the_temp_folders_of_failed_tests():
    import tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"


# --- the first command runs the main job ------------------------------------------------------------------------

def test_the_demo_compresses_with_cstar_beside_pruning_and_post_hoc_low_rank(capsys, tmp_path):
    threads = torch.get_num_threads()
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", "--epochs", "1", "--phase-epochs", "1",
                         "--ratios", "4")
    assert code == 0, err  # was: two dense models, nothing compressed
    assert torch.get_num_threads() == threads  # the demo's one-thread setting does not leak
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["cells"]) == {"dense", "cstar-4x", "magnitude-4x", "lowrank_global-4x"}
    for name, cell in results["cells"].items():
        assert set(cell["accuracy"]) == {"clean", "pgd20"} and cell["latency_ms"] > 0
        if name != "dense":
            assert cell["params_ratio"] == pytest.approx(4.0, rel=0.02)
    for column in ("params", "MACs ratio", "clean", "pgd20", "batch-1 latency"):
        assert column in out
    assert "| cstar | 4x |" in out and "| magnitude | 4x |" in out and "| lowrank_global | 4x |" in out


# --- settings that come from the data and the device ------------------------------------------------------------

def test_compress_on_mnist_without_settings_starts_from_the_measured_mnist_preset():
    args = parse_args(["compress", "--data", "mnist"])
    preset = yaml.safe_load((ROOT / "cstar" / "presets" / "mnist_small_cnn_cpu.yaml").read_text())
    assert args.defaults_preset == "mnist_small_cnn_cpu"
    for key in ("dense", "admm_train", "admm", "finetune"):
        assert getattr(args, key) == preset[key], key  # was: PGD-10 with SGD at lr 0.1, which diverged here
    assert args.eval_attacks == "clean,pgd40" and args.eval_step == {"pgd40": 0.01}  # MNIST's threat model (METHOD.md)


def test_options_given_layer_over_the_dataset_preset_key_by_key():
    args = parse_args(["compress", "--data", "fashion_mnist", "--finetune", "{epochs: 3}", "--eval-attacks", "clean"])
    preset = yaml.safe_load((ROOT / "cstar" / "presets" / "fmnist_small_cnn_cpu.yaml").read_text())
    assert args.finetune == {**preset["finetune"], "epochs": 3}
    assert args.eval_attacks == "clean"


def test_on_a_gpu_the_cifar10_default_is_the_papers_setting():
    args = parse_args(["compress", "--data", "cifar10", "--device", "cuda"])
    assert args.defaults_preset == "cifar10_resnet18_paper" and args.admm_train["epochs"] == 50
    assert parse_args(["compare", "--data", "cifar10", "--device", "cpu"]).defaults_preset == "compare_cifar10_cpu"


def test_no_preset_applies_to_a_dataset_none_was_measured_on():
    args = parse_args(["compress", "--data", "digits"])
    assert args.defaults_preset is None and args.admm_train is None


def test_a_preset_is_found_by_name(capsys):
    args = parse_args(["compare", "--config", "compare_mnist_cpu"])
    assert args.data == "mnist" and args.search["epochs"] >= 1
    line = refused(capsys, "compare", "--config", "no_such_preset")
    assert "no_such_preset" in line and "compare_mnist_cpu" in line


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_the_dataset_preset_used_is_printed_and_recorded(capsys, tmp_path):
    out = tmp_path / "run"
    code, printed, err = run(capsys, "compress", "--model", "small_cnn", "--data", "mnist", "--root", DATA,
                             "--train-n", "300", "--val-size", "100", "--eval-n", "50", "--eval-attacks", "clean",
                             "--dense", "{epochs: 1}", "--admm-train", "{epochs: 1}", "--finetune", "{epochs: 1}",
                             "--no-progress", "--out", out)
    assert code == 0, err
    assert "the mnist preset for CPU 'mnist_small_cnn_cpu'" in printed
    assert json.loads((out / "env.json").read_text())["defaults_preset"] == "mnist_small_cnn_cpu"
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert recorded["admm_train"]["optimizer"] == "adam" and recorded["admm_train"]["epochs"] == 1


# --- a guard in every training phase ----------------------------------------------------------------------------

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


# --- reports ------------------------------------------------------------------------------------------------

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


# --- eps from the data, in Python as on the command line --------------------------------------------------------

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


def test_the_compression_phases_take_the_eps_of_the_training_data():
    from cstar.pipeline.phases import with_data_eps
    from cstar.pipeline.compress import CompressConfig

    config = with_data_eps(CompressConfig(), data.DATASETS["fashion_mnist"], ("dense", "admm_train", "finetune"))
    assert config.dense.eps == config.admm_train.eps == config.finetune.eps == pytest.approx(0.1)
    given = with_data_eps(CompressConfig(finetune=TrainConfig(eps=0.2)), data.DATASETS["mnist"], ("finetune",))
    assert given.finetune.eps == 0.2  # a given eps is kept
