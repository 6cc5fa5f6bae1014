"""The command line end to end on tiny real data, and its answers to bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from digits_runs import DATA, FAST, PIPELINE, SECTION, old_model_pt, refused

import cstar
from cstar.cli import main

TRAIN_FAST = ["--epochs", "1", "--attack-steps", "2", "--batch-size", "64", "--val-size", "100",
              "--check-size", "50", "--eval-attacks", "clean,pgd5", "--no-progress", "--optimizer", "adam",
              "--lr", "0.002"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--out", str(out), *TRAIN_FAST]) == 0
    return out


def test_train_writes_a_complete_run_directory(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt", "model", "results.json"} <= names
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["model"] == "small_cnn" and config["epochs"] == 1 and config["eps"] == pytest.approx(0.2)
    env = json.loads((trained / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    card = json.loads((trained / "results.json").read_text())
    assert 0 <= card["pgd5_acc"] <= card["clean_acc"] <= 100 and card["n_examples"] == 360


def test_eval_reads_dataset_and_eps_from_the_run(trained, capsys):
    code, out, _ = run(capsys, "eval", trained / "model", "--attacks", "clean,fgsm", "--n", "100",
                       "--json", trained / "eval.json")
    assert code == 0, out
    card = json.loads((trained / "eval.json").read_text())
    assert card["n_examples"] == 100 and card["dataset"] == "digits" and card["eps"] == pytest.approx(0.2)
    assert "| clean | fgsm |" in out


def test_the_trained_model_is_a_save_of_the_trained_weights_recording_its_data(trained, capsys):
    model = cstar.load(trained / "model")
    assert model.cstar_trained_on == {"dataset": "digits", "eps": pytest.approx(0.2)}
    code, out, _ = run(capsys, "eval", trained / "model", "--attacks", "clean", "--json", trained / "again.json")
    assert code == 0, out
    again = json.loads((trained / "again.json").read_text())  # every test image, as 'cstar train' evaluated
    assert again["clean_acc"] == json.loads((trained / "results.json").read_text())["clean_acc"]
    assert "| digits |" in out  # named by its run


def test_a_save_evaluates_on_the_data_and_eps_it_records_without_its_run(trained, tmp_path, capsys):
    from cstar.files.serialize import record_trained_on

    model = cstar.load(trained / "model")
    record_trained_on(model, "digits", 0.1)
    cstar.save(model, tmp_path / "moved")  # no config.yaml beside it
    code, out, _ = run(capsys, "eval", tmp_path / "moved", "--attacks", "clean", "--n", "20",
                       "--json", tmp_path / "card.json")
    assert code == 0, out
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["dataset"] == "digits" and card["eps"] == pytest.approx(0.1)


def test_an_older_runs_model_pt_loads_and_evaluates_on_the_data_and_eps_it_records(trained, tmp_path, capsys):
    path = old_model_pt(trained, tmp_path / "model.pt", eps=0.1)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(cstar.load(path)(x), cstar.load(trained / "model")(x))
    code, out, _ = run(capsys, "eval", path, "--attacks", "clean", "--n", "20", "--json", tmp_path / "card.json")
    assert code == 0, out
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["dataset"] == "digits" and card["eps"] == pytest.approx(0.1)


def test_a_model_that_save_cannot_keep_is_refused_before_training(capsys, tmp_path, monkeypatch):
    (tmp_path / "oddnet.py").write_text(
        "import torch, torch.nn as nn\n"
        "def net(num_classes=10, in_channels=1):\n"
        "    linear = nn.Linear(64 * in_channels, num_classes)\n"
        "    linear.in_features = 32  # runs, but its arguments no longer describe its weight\n"
        "    return nn.Sequential(nn.Flatten(), linear)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    line = refused(capsys, "train", "--model", "oddnet:net", "--data", "digits", "--out", tmp_path / "run")
    assert "cannot save" in line and "weight" in line and "cstar.fit" in line
    assert not (tmp_path / "run").exists()


def test_a_factory_model_with_state_outside_its_standard_layers_trains_saves_and_evaluates(capsys, tmp_path,
                                                                                          monkeypatch):
    (tmp_path / "tempnet.py").write_text(
        "import torch, torch.nn as nn\n"
        "def net(num_classes=10, in_channels=1):\n"
        "    seq = nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, num_classes))\n"
        "    seq.register_parameter('temperature', nn.Parameter(torch.rand(1) + 5))  # in no standard layer\n"
        "    return seq\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(capsys, "train", "--model", "tempnet:net", "--data", "digits", "--epochs", "1",
                       "--attack", "fgsm_rs", "--eval-attacks", "clean", "--out", tmp_path / "run")
    assert code == 0, out
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")["net.temperature"]  # behind Normalize
    fresh = cstar.models.create("tempnet:net", 10, in_channels=1, input_size=8)
    assert not torch.equal(fresh.net.temperature.detach(), saved)
    model = cstar.load(tmp_path / "run" / "model", model=fresh)
    assert torch.equal(model.net.temperature.detach(), saved)  # the saved value, not the fresh instance's
    code, out, _ = run(capsys, "eval", tmp_path / "run" / "model", "--model", "tempnet:net", "--attacks", "clean")
    assert code == 0, out


def test_eval_per_example_without_json_is_an_error(trained, capsys):
    line = error_line(capsys, "eval", trained / "model", "--n", "10", "--per-example")
    assert "--per-example" in line and "pass --json" in line


def test_eval_per_example_cards_pair_two_evaluations(trained, capsys):
    for attacks, name in (("clean", "a.json"), ("clean,fgsm", "b.json")):
        code, out, _ = run(capsys, "eval", trained / "model", "--attacks", attacks, "--n", "100",
                           "--per-example", "--json", trained / name)
        assert code == 0, out
    a, b = (json.loads((trained / name).read_text()) for name in ("a.json", "b.json"))
    hits = a["per_example"]["clean"]
    assert len(hits) == 100 and hits.count("1") == round(a["clean_acc"])
    assert hits == b["per_example"]["clean"]  # the same model on the same images
    paired = cstar.paired_difference(b["per_example"]["clean"], b["per_example"]["fgsm"])
    assert paired["difference"] == pytest.approx((b["clean_acc"] - b["fgsm_acc"]) / 100)


def test_info_prints_layers_params_and_macs(capsys):
    code, out, _ = run(capsys, "info", "--model", "resnet20", "--data", "cifar10")
    assert code == 0
    assert "parameters:" in out and "MACs per image:" in out and "conv" in out.lower()


def test_config_file_supplies_options_and_flags_win(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "small_cnn", "data": "digits", "epochs": 3, "eps": "1/10"}))
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "--config", cfg, "--epochs", "1", "--out", out, *TRAIN_FAST[2:])
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["eps"] == pytest.approx(0.1)


@pytest.mark.parametrize("ratios", [16, 16.0, [4, 16], "4,16"])
def test_config_file_lists_may_be_yaml_lists_or_single_numbers(tmp_path, ratios):
    from cstar.cli import parse_args
    from cstar.cli._options import names, numbers

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"ratios": ratios, "methods": ["dense", "cstar"], "eval_attacks": "clean,pgd20"}))
    args = parse_args(["compare", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert numbers(args.ratios, "--ratios") == ([16.0] if not isinstance(ratios, (list, str)) else [4.0, 16.0])
    assert names(args.methods) == ["dense", "cstar"] and names(args.eval_attacks) == ["clean", "pgd20"]


def error_line(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    return lines[-1]


def test_unknown_model_names_the_choices(capsys, tmp_path):
    line = error_line(capsys, "train", "--model", "resnet1000", "--data", "digits", "--out", tmp_path / "x")
    assert "resnet1000" in line and "resnet18" in line
    assert not (tmp_path / "x").exists()


def test_unknown_dataset_names_the_choices(capsys, tmp_path):
    line = error_line(capsys, "train", "--model", "small_cnn", "--data", "imagenet22k", "--out", tmp_path / "x")
    assert "imagenet22k" in line and "mnist" in line


def test_root_without_files_says_where_it_looked(capsys, tmp_path):
    line = error_line(capsys, "train", "--model", "small_cnn", "--data", "mnist", "--root", tmp_path,
                      "--out", tmp_path / "x")
    assert str(tmp_path) in line and "--download" in line
    assert not (tmp_path / "x").exists()


def test_corrupt_archive_is_reported(capsys, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(b"this is not gzip")
    line = error_line(capsys, "train", "--model", "small_cnn", "--data", "mnist", "--root", tmp_path,
                      "--out", tmp_path / "x")
    assert "train-images-idx3-ubyte.gz" in line


def test_eps_out_of_range(capsys, tmp_path):
    line = error_line(capsys, "train", "--model", "small_cnn", "--data", "digits", "--eps", "8", "--out", tmp_path)
    assert "eps" in line and "[0, 1]" in line


def test_existing_output_directory_needs_force(capsys, trained):
    before = sorted(p.name for p in trained.iterdir())
    line = error_line(capsys, "train", "--model", "small_cnn", "--data", "digits", "--out", trained)
    assert "--force" in line and "--resume" in line
    assert sorted(p.name for p in trained.iterdir()) == before


def test_wrong_number_of_classes(capsys, trained, tmp_path):
    root = tmp_path / "cifar"
    _write_tiny_cifar100(root)
    line = error_line(capsys, "eval", trained / "model", "--data", "cifar100", "--root", root)
    assert "10 classes" in line and "100" in line


def test_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: small_cnn\ndata: digits\nepoch: 3\n")
    line = error_line(capsys, "train", "--config", cfg, "--out", tmp_path / "x")
    assert "epoch" in line and "epochs" in line


def test_checkpoint_with_a_wrong_shape_is_refused_before_loading(capsys, trained, tmp_path):
    state = torch.load(old_model_pt(trained, tmp_path / "model.pt"), weights_only=True)
    name = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][name] = torch.zeros(3, 3)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    line = error_line(capsys, "eval", path, "--data", "digits")
    assert "edited.pt" in line and name in line and "shape" in line


def test_foreign_checkpoint_is_refused(capsys, tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3), "fn": os.getcwd}, path)  # needs pickled code to load
    line = error_line(capsys, "eval", path, "--data", "digits")
    assert "foreign.pt" in line


def _write_tiny_cifar100(root: Path) -> None:
    import pickle

    import numpy as np

    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", 20), ("test", 10)):
        batch = {b"data": np.zeros((n, 3072), dtype=np.uint8), b"fine_labels": list(range(n)),
                 b"coarse_labels": [0] * n, b"filenames": [b"x.png"] * n}
        with open(folder / split, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [b"c%d" % i for i in range(100)]}, f)


def test_ranks_prints_a_plan_meeting_the_ratio(capsys, tmp_path):
    code, out, _ = run(capsys, "ranks", "--model", "resnet20", "--ratio", "4", "--budget", "macs",
                       "--json", tmp_path / "plan.json")
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert 4.0 <= plan["achieved_macs_ratio"] <= 4.0 * 1.02
    assert "macs budget" in out


def test_decompose_info_export_and_eval_of_a_factorised_model(trained, tmp_path, capsys):
    out = tmp_path / "dec"
    code, text, err = run(capsys, "decompose", trained / "model", "--ratio", "3", "--out", out)
    assert code == 0, err
    assert (out / "model.json").exists() and (out / "model.safetensors").exists()
    code, text, _ = run(capsys, "info", out)
    assert code == 0 and "factorised layers" in text and "ranks" in text
    code, _, err = run(capsys, "export", out, "--format", "torchscript", "--out", tmp_path / "m.pt")
    assert code == 0, err
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    from cstar.files.serialize import load

    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(scripted(x), load(out)(x))
    code, text, err = run(capsys, "eval", out, "--data", "digits", "--attacks", "clean", "--n", "50")
    assert code == 0, err
    assert "| dec | 50 |" in text


def test_ratio_below_one_is_an_error(capsys):
    line = error_line(capsys, "ranks", "--model", "resnet20", "--ratio", "0.5")
    assert "ratio" in line


def test_every_command_of_the_parser_has_one_short_function():
    import inspect

    from cstar.cli import build_parser
    from cstar.cli._commands import COMMANDS

    assert set(COMMANDS) == set(build_parser().subcommands)
    lengths = {name: len(inspect.getsourcelines(func)[0]) for name, func in COMMANDS.items()}
    assert max(lengths.values()) <= 40, lengths


def test_compare_help_names_every_registered_method():
    from cstar.cli import build_parser
    from cstar.pipeline import compressors

    text = " ".join(build_parser().subcommands["compare"].format_help().split()).replace("- ", "-")
    assert all(name in text for name in compressors.names()), text
    assert "harp" in text and "lowrank_learned" in text


@pytest.mark.parametrize("ratio", ["0.5", "100000"])
def test_an_impossible_ratio_is_refused_before_training_and_leaves_no_output(capsys, tmp_path, ratio):
    out = tmp_path / "run"
    line = refused(capsys, "compress", "--model", "small_cnn", *PIPELINE, "--dense", SECTION, "--ratio", ratio,
                   "--out", out)
    assert "ratio" in line or "unreachable" in line
    assert not out.exists()


def test_an_impossible_ratio_from_a_checkpoint_leaves_no_dense_copy(capsys, trained, tmp_path):
    out = tmp_path / "run"
    refused(capsys, "compress", "--checkpoint", trained / "model", *PIPELINE, "--ratio", "0.5", "--out", out)
    assert not out.exists()  # was: a dense.pt left behind, and the rerun refused with "already exists"


def test_a_model_flag_that_contradicts_the_checkpoint_is_refused(capsys, trained, tmp_path):
    line = refused(capsys, "compress", "--checkpoint", trained / "model", "--model", "resnet18", *PIPELINE,
                   "--ratio", "2", "--out", tmp_path / "run")
    assert "--model resnet18" in line and "small_cnn" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_a_checkpoint_evaluated_on_images_of_another_shape_is_one_line(capsys, trained):
    line = refused(capsys, "eval", trained / "model", "--data", "mnist", "--root", DATA)
    assert "1x8x8" in line and "1x28x28" in line  # was a traceback from inside torch


def test_train_takes_the_first_n_training_images(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--model", "small_cnn", "--data", "digits", "--train-n", "300",
                         "--attack", "clean", "--out", tmp_path / "run", *FAST)
    assert code == 0, err  # was: unrecognized arguments: --train-n
    assert "(200 train / 360 test images)" in out  # 300 images, the last 100 held out for the check
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train_n"] == 300


def test_another_dataset_of_the_same_shape_is_evaluated_at_its_own_eps(capsys, mnist_run):
    code, out, _ = run(capsys, "eval", mnist_run / "model", "--data", "fashion_mnist", "--root", DATA,
                       "--attacks", "clean", "--n", "32")
    assert code == 0
    assert "trained on mnist" in out and "eps=0.1" in out  # was eps 0.3, MNIST's, silently


def test_a_text_file_as_checkpoint_is_named_as_such(capsys, tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("hello\n")
    line = refused(capsys, "eval", path, "--data", "digits")
    assert "not a PyTorch file" in line and "(101)" not in line


def test_compress_logs_name_their_phase_and_the_admm_residual(capsys, trained, tmp_path):
    with_progress = [a for a in PIPELINE if a != "--no-progress"]
    old = old_model_pt(trained, tmp_path / "model.pt")  # the file an older 'cstar train' wrote: still compressed
    code, out, _ = run(capsys, "compress", "--checkpoint", old, *with_progress, "--ratio", "2",
                       "--admm", "{interval: 5}", "--out", tmp_path / "run")
    out_lines = out.splitlines()
    assert code == 0
    assert any(line.startswith("search: epoch") and "ADMM residual" in line for line in out_lines), out
    assert any(line.startswith("finetune: epoch") for line in out_lines), out


def test_export_refuses_to_overwrite_without_force(capsys, trained, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("an earlier export")
    line = refused(capsys, "export", trained / "model", "--out", target)
    assert "--force" in line and target.read_text() == "an earlier export"
    code, _, err = run(capsys, "export", trained / "model", "--out", target, "--force")
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
