"""`cstar compare` end to end on scikit-learn's digits: every method, outputs, resume without rerunning cells."""

import json

import pytest
import torch

from cstar import data, models
from cstar.cli import main
from cstar.pipeline.compare import METHODS, CompareConfig, batch1_latencies_ms, compare
from cstar.files.serialize import load
from cstar.records import cell_model
from cstar.training.fit import TrainConfig
from cstar._core.errors import CstarError

TRAIN = dict(attack="pgd", eps=0.2, attack_steps=2, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
             check_size=0, progress=False)


def config(**kw):
    base = dict(ratios=[4.0], search=TrainConfig(epochs=1, **TRAIN), finetune=TrainConfig(epochs=1, **TRAIN),
                eval_attacks=["clean", "pgd3"], eval_n=120, latency_runs=3)
    base.update(kw)
    return CompareConfig(**base)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", split="train"), data.load("digits", split="test")


def dense_model(train_set):
    spec = train_set.spec
    torch.manual_seed(0)
    c, h, _ = spec.image_shape
    return models.create("small_cnn", 10, in_channels=c, input_size=h, mean=spec.mean, std=spec.std)


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    train_set, test_set = digits
    out = tmp_path_factory.mktemp("compare") / "run"
    results = compare(dense_model(train_set), train_set, test_set, config(), out, val_size=200)
    return out, results


def test_every_method_has_a_cell_with_its_figures(finished):
    out, results = finished
    assert set(results["cells"]) == {"dense"} | {f"{m}-4x" for m in METHODS if m != "dense"}
    for name, cell in results["cells"].items():
        assert {"clean", "pgd3"} <= set(cell["accuracy"]) and cell["latency_ms"] > 0
        assert (cell_model(out / "cells" / name, cell) / "model.json").exists()


def test_every_cell_saves_its_model_once_where_its_row_says(finished):
    out, results = finished
    for name, cell in results["cells"].items():
        saves = list((out / "cells" / name).rglob("model.json"))
        assert saves == [cell_model(out / "cells" / name, cell) / "model.json"], name
    assert results["cells"]["cstar-4x"]["model_dir"] == "cstar/model"  # where compress saved it
    assert results["cells"]["magnitude-4x"]["model_dir"] == "model"


def test_a_cell_row_from_before_the_model_dir_record_points_at_the_cells_model(tmp_path):
    assert cell_model(tmp_path / "cells" / "magnitude-4x", {"method": "magnitude"}) == \
        tmp_path / "cells" / "magnitude-4x" / "model"


@pytest.mark.parametrize("place", ["../../elsewhere", "/etc", ["model"], ""])
def test_a_crafted_model_dir_in_a_cells_row_is_refused(tmp_path, place):
    with pytest.raises(CstarError, match="not a path inside the cell"):
        cell_model(tmp_path / "cells" / "cstar-4x", {"model_dir": place})


def test_every_cell_keeps_its_per_example_results(finished):
    out, results = finished
    for name, cell in results["cells"].items():
        kept = json.loads((out / "cells" / name / "per_example.json").read_text())
        assert kept["subset"] == cell["subset"]
        for label, accuracy in cell["accuracy"].items():
            hits = kept["per_example"][label]
            assert set(hits) <= {"0", "1"} and hits.count("1") / len(hits) == pytest.approx(accuracy)


def test_the_cstar_cell_checks_its_decomposition_without_a_test_set(finished):
    out, _ = finished  # compare gives compress no test set: the check runs on training images
    phases = json.loads((out / "cells" / "cstar-4x" / "cstar" / "phases.json").read_text())
    assert phases["decompose"]["output_gap"] < 1e-4


def test_pruning_cells_carry_their_pruning_record(finished):
    _, results = finished
    assert results["cells"]["magnitude-4x"]["pruning"]["method"] == "magnitude"
    assert "channels_moved_by_scores" in results["cells"]["hydra-4x"]["pruning"]


def test_compressed_cells_meet_the_parameter_ratio(finished):
    _, results = finished
    for name, cell in results["cells"].items():
        if name != "dense":
            assert cell["params_ratio"] == pytest.approx(4.0, rel=0.02), name


def test_saved_cell_models_reload_with_the_reported_size(finished):
    out, results = finished
    for name, cell in results["cells"].items():
        model = load(cell_model(out / "cells" / name, cell))
        assert sum(p.numel() for p in model.parameters()) == cell["params"]


def test_outputs_table_and_plot(finished):
    out, results = finished
    table = (out / "comparison.md").read_text()
    assert "Training budget" in table and all(m in table for m in METHODS)
    assert json.loads((out / "results.json").read_text())["cells"].keys() == results["cells"].keys()
    pytest.importorskip("matplotlib")
    assert (out / "accuracy_vs_ratio.png").stat().st_size > 1000


def test_resume_reruns_only_unfinished_cells(digits, finished, capsys):
    train_set, test_set = digits
    out, _ = finished
    done = {p.parent.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*/result.json")}
    (out / "cells" / "magnitude-4x" / "result.json").unlink()  # as if killed before that cell finished
    capsys.readouterr()
    compare(dense_model(train_set), train_set, test_set, config(), out, val_size=200)
    printed = capsys.readouterr().out
    assert "magnitude-4x: running" in printed
    assert printed.count("done earlier") == len(done) - 1
    for name, mtime in done.items():
        if name != "magnitude-4x":
            assert (out / "cells" / name / "result.json").stat().st_mtime_ns == mtime


def test_every_compressed_cell_reports_the_training_seconds_of_both_phases(finished):
    _, results = finished
    for name, cell in results["cells"].items():
        if name != "dense":
            assert set(cell["train_seconds"]) == {"search", "finetune"}, name
            assert all(s > 0 for s in cell["train_seconds"].values()), name


def test_a_resumed_cell_counts_the_training_done_before_the_resume(digits, finished):
    train_set, test_set = digits
    out, _ = finished
    result = out / "cells" / "hydra-4x" / "result.json"
    before = json.loads(result.read_text())["train_seconds"]
    result.unlink()  # killed after both phases trained, before the cell was evaluated
    after = compare(dense_model(train_set), train_set, test_set, config(), out, val_size=200)
    assert after["cells"]["hydra-4x"]["train_seconds"] == before


def test_batch1_latencies_rank_a_large_model_slower_than_a_small_one():
    small = torch.nn.Linear(8, 8)
    large = torch.nn.Sequential(torch.nn.Linear(8, 1024), *[torch.nn.Linear(1024, 1024) for _ in range(4)])
    ms = batch1_latencies_ms({"small": small, "large": large}, (8,), runs=10, rounds=2)
    assert set(ms) == {"small", "large"} and 0 < ms["small"] < ms["large"]


def test_bad_methods_and_ratios_are_errors():
    with pytest.raises(CstarError, match="unknown method"):
        config(methods=["cstar", "snip"])
    with pytest.raises(CstarError, match="must be a number > 1"):
        config(ratios=[1.0])


def test_cli_runs_a_comparison_end_to_end(tmp_path, capsys):
    out = tmp_path / "cli"
    section = "{epochs: 1, attack_steps: 2, batch_size: 64, optimizer: adam, lr: 0.001, weight_decay: 0, check_size: 0}"
    code = main(["compare", "--model", "small_cnn", "--data", "digits", "--ratios", "4",
                 "--methods", "dense,cstar,magnitude", "--dense", section, "--search", section, "--finetune", section,
                 "--eval-attacks", "clean,pgd3", "--eval-n", "100", "--latency-runs", "3", "--val-size", "200",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {"dense", "cstar-4x", "magnitude-4x"}
    assert "cstar" in capsys.readouterr().out


@pytest.fixture
def finished_copy(finished, tmp_path):
    """A private copy of the finished comparison, for tests that resume it with other settings."""
    import shutil

    out, _ = finished
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run"


def test_a_resume_with_another_training_budget_is_refused(digits, finished_copy):
    train_set, test_set = digits
    other = config(finetune=TrainConfig(epochs=1, **{**TRAIN, "lr": 5e-4}))
    with pytest.raises(CstarError, match=r"cstar-4x was trained with other settings \(finetune\.lr differ\)"):
        compare(dense_model(train_set), train_set, test_set, other, finished_copy, val_size=200)


def test_a_resume_with_another_seed_is_refused(digits, finished_copy):
    train_set, test_set = digits
    with pytest.raises(CstarError, match=r"\(seed differ\)"):
        compare(dense_model(train_set), train_set, test_set, config(), finished_copy, val_size=200, seed=1)


def test_a_cell_recorded_before_a_setting_existed_counts_it_at_its_default(digits, finished_copy, capsys):
    train_set, test_set = digits
    path = finished_copy / "cells" / "cstar-4x" / "result.json"
    row = json.loads(path.read_text())
    del row["training"]["admm"]["decoupled"], row["training"]["finetune"]["grad_clip"]  # as if added later
    path.write_text(json.dumps(row))
    capsys.readouterr()
    compare(dense_model(train_set), train_set, test_set, config(), finished_copy, val_size=200)
    assert "cstar-4x: done earlier" in capsys.readouterr().out


def test_a_resume_with_other_attacks_reevaluates_the_saved_models_without_training(digits, finished_copy, capsys):
    from cstar import evaluate

    train_set, test_set = digits
    before = json.loads((finished_copy / "results.json").read_text())["cells"]
    capsys.readouterr()
    after = compare(dense_model(train_set), train_set, test_set, config(eval_attacks=["clean", "fgsm"], eval_n=60),
                    finished_copy, val_size=200)["cells"]
    printed = capsys.readouterr().out
    assert "running" not in printed
    assert printed.count("evaluating its attacks under the new evaluation settings") == len(before)
    for name, cell in after.items():
        assert cell["train_seconds"] == before[name]["train_seconds"] and cell["subset"] == "first 60 examples"
        model = load(cell_model(finished_copy / "cells" / name, cell))
        independent = evaluate(model, test_set, ["fgsm"], eps=TRAIN["eps"], n=60)["accuracy"]["fgsm"]
        assert cell["accuracy"]["fgsm"] == pytest.approx(independent), name
        kept = json.loads((finished_copy / "cells" / name / "per_example.json").read_text())
        assert len(kept["per_example"]["fgsm"]) == 60


def test_a_resume_asking_for_autoattack_adds_it_to_finished_cells_only(digits, finished_copy, monkeypatch):
    import sys

    train_set, test_set = digits
    calls = []

    def fake_autoattack(model, test_set, config, eps):  # stands in for a minutes-long AutoAttack run
        calls.append(config.autoattack_n)
        return {"accuracy": 0.5, "subset": f"first {config.autoattack_n} examples"}

    monkeypatch.setattr(sys.modules["cstar.pipeline.compare"], "_autoattack", fake_autoattack)
    per_example = {p: p.stat().st_mtime_ns for p in (finished_copy / "cells").glob("*/per_example.json")}
    after = compare(dense_model(train_set), train_set, test_set, config(autoattack_n=20), finished_copy,
                    val_size=200)["cells"]
    assert len(calls) == len(after) and all(c["autoattack"]["subset"] == "first 20 examples" for c in after.values())
    assert {p: p.stat().st_mtime_ns for p in per_example} == per_example  # the PGD figures were not redone
    compare(dense_model(train_set), train_set, test_set, config(autoattack_n=20), finished_copy, val_size=200)
    assert len(calls) == len(after)  # a second resume finds nothing stale


def test_cells_from_before_the_settings_record_are_kept_as_they_are(digits, finished_copy, capsys):
    train_set, test_set = digits
    for path in (finished_copy / "cells").glob("*/result.json"):
        row = json.loads(path.read_text())
        row.pop("training", None), row.pop("evaluation")
        path.write_text(json.dumps(row))
    capsys.readouterr()
    compare(dense_model(train_set), train_set, test_set, config(), finished_copy, val_size=200)
    assert "evaluating" not in capsys.readouterr().out


@pytest.mark.parametrize("latency, columns", [(True, 3), (False, 2)])
def test_the_pareto_view_plots_accuracy_against_params_macs_and_measured_latency(tmp_path, latency, columns):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from cstar.pipeline.compare_report import plot_pareto

    def cell(method, ratio, macs, acc, ms):
        return {"method": method, "params_ratio": ratio, "macs_ratio": macs,
                "accuracy": {"clean": acc, "pgd20": acc / 2}, **({"latency_ms": ms} if latency else {})}

    cells = [cell("dense", 1, 1, 0.9, 3.0), cell("cstar", 4, 2, 0.85, 2.0), cell("magnitude", 4, 5, 0.8, 1.0)]
    plot_pareto({"cells": {str(i): c for i, c in enumerate(cells)}}, tmp_path / "view.png")
    width, height = Image.open(tmp_path / "view.png").size
    assert round(width / 110 / 4.5) == columns and round(height / 110 / 3.6) == 2  # one row per accuracy
