"""Benchmark summaries: the figures they derive (CSTAR's margins over its rivals) from a comparison's results."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cstar

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def script(name: str):
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: its helper modules beside it import
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def summarize_compare():
    return script("summarize_compare")


def cell(method, ratio, clean, pgd):
    return {"method": method, "target_ratio": ratio, "accuracy": {"clean": clean, "pgd20": pgd}}


def test_margins_are_cstar_minus_the_best_of_each_family_per_metric(summarize_compare):
    results = {"cells": {str(i): c for i, c in enumerate([
        cell("dense", 1.0, 0.60, 0.40), cell("cstar", 16.0, 0.52, 0.34), cell("hydra", 16.0, 0.49, 0.32),
        cell("magnitude", 16.0, 0.51, 0.30), cell("lowrank_global", 16.0, 0.53, 0.33),
        cell("cstar", 4.0, 0.58, 0.37)])}}
    rows = {(r["ratio"], r["label"]): r for r in summarize_compare.margins(results)}
    assert set(rows) == {(16.0, "clean"), (16.0, "pgd20"), (4.0, "clean"), (4.0, "pgd20")}
    assert rows[16.0, "clean"]["pruning"] == {"best": "magnitude", "accuracy": 51.0, "margin": 1.0}
    assert rows[16.0, "pgd20"]["pruning"] == {"best": "hydra", "accuracy": 32.0, "margin": 2.0}
    assert rows[16.0, "clean"]["post-hoc low rank"]["margin"] == -1.0
    assert "pruning" not in rows[4.0, "clean"]  # no rival ran at 4x


def test_harp_is_a_pruning_rival_and_learned_ranks_a_post_hoc_one(summarize_compare):
    results = {"cells": {str(i): c for i, c in enumerate([
        cell("cstar", 64.0, 0.50, 0.30), cell("magnitude", 64.0, 0.40, 0.20), cell("harp", 64.0, 0.45, 0.25),
        cell("lowrank_global", 64.0, 0.49, 0.29), cell("lowrank_learned", 64.0, 0.52, 0.31)])}}
    rows = {r["label"]: r for r in summarize_compare.margins(results)}
    assert rows["pgd20"]["pruning"]["best"] == "harp"
    assert rows["pgd20"]["post-hoc low rank"] == {"best": "lowrank_learned", "accuracy": 31.0, "margin": -1.0}


def test_margins_of_another_method_against_named_families(summarize_compare):
    results = {"cells": {str(i): c for i, c in enumerate([
        cell("cstar", 32.0, 0.45, 0.30), cell("cstar_equal_macs", 32.0, 0.44, 0.29),
        cell("magnitude", 32.0, 0.40, 0.29), cell("lowrank_global", 32.0, 0.46, 0.31),
        cell("lowrank_equal_macs", 32.0, 0.45, 0.28)])}}
    rivals = {"pruning": ("magnitude",), "post-hoc low rank": ("lowrank_equal_macs",)}
    rows = {r["label"]: r for r in summarize_compare.margins(results, ours="cstar_equal_macs", rivals=rivals)}
    assert rows["clean"]["cstar"] == 44.0 and rows["clean"]["pruning"]["margin"] == 4.0
    assert rows["pgd20"]["post-hoc low rank"] == {"best": "lowrank_equal_macs", "accuracy": 28.0, "margin": 1.0}
    table = summarize_compare.margin_table(list(rows.values()), "cstar_equal_macs", tuple(rivals))
    assert "| ratio | accuracy | cstar_equal_macs |" in table and "28.00 lowrank_equal_macs (+1.00)" in table


def test_margins_carry_a_paired_interval_where_both_cells_kept_per_example_results(summarize_compare):
    results = {"cells": {str(i): c for i, c in enumerate([
        cell("cstar", 16.0, 0.6, 0.4), cell("magnitude", 16.0, 0.4, 0.2), cell("lowrank_global", 16.0, 0.5, 0.3)])}}
    per_example = {"cstar-16x": {"subset": "first 10 examples", "per_example": {"clean": "1111110000",
                                                                                "pgd20": "1111000000"}},
                   "magnitude-16x": {"subset": "first 10 examples", "per_example": {"clean": "1111000000",
                                                                                    "pgd20": "1100000000"}}}
    rows = {(r["ratio"], r["label"]): r for r in summarize_compare.margins(results, per_example)}
    pruning = rows[16.0, "clean"]["pruning"]
    assert pruning["margin"] == 20.0
    # differences 0,0,0,0,1,1,0,0,0,0: mean 0.2, sample sd 0.4216, standard error 0.1333
    assert pruning["ci95"] == pytest.approx([20 - 1.96 * 13.33, 20 + 1.96 * 13.33], abs=0.05)
    assert pruning["p_value"] == 0.5  # 2 discordant pairs, both CSTAR's: 2 * 0.5 ** 2
    assert "ci95" not in rows[16.0, "clean"]["post-hoc low rank"]  # its cell kept no per-example results
    assert "(+20.00; -6.13 to +46.13, p=0.5)" in summarize_compare.margin_table(list(rows.values()))
    rows[16.0, "clean"]["pruning"]["p_value"] = 2e-7
    assert "p<0.001)" in summarize_compare.margin_table(list(rows.values()))


def test_backfill_recreates_a_cells_per_example_results(tmp_path):
    from cstar.cli import main

    out = tmp_path / "run"
    section = "{epochs: 1, attack_steps: 2, batch_size: 64, optimizer: adam, lr: 0.001, weight_decay: 0, check_size: 0}"
    assert main(["compare", "--model", "small_cnn", "--data", "digits", "--ratios", "4", "--methods", "dense,magnitude",
                 "--dense", section, "--search", section, "--finetune", section, "--eval-attacks", "clean,pgd3",
                 "--eval-n", "100", "--latency-runs", "0", "--val-size", "200", "--out", str(out),
                 "--no-progress"]) == 0
    kept = out / "cells" / "magnitude-4x" / "per_example.json"
    original = json.loads(kept.read_text())
    kept.unlink()
    script("backfill_per_example").main([str(out), "--cells", "magnitude-4x"])
    assert json.loads(kept.read_text()) == original


def test_run_summary_names_the_attack_steps_and_collects_every_evaluation(tmp_path):
    run = tmp_path / "cifar10-pgd3"
    run.mkdir()
    (run / "config.yaml").write_text("model: resnet18\nwidth: 16\ndata: cifar10\nmethod: pgd\n"
                                     "attack_steps: 3\neps: 0.0314\n")
    (run / "env.json").write_text(json.dumps({"device_name": "test cpu", "command": "cstar train ..."}))
    (run / "metrics.jsonl").write_text('{"train_seconds": 60}\n{"train_seconds": 120}\n')
    (run / "results.json").write_text(json.dumps({"n_examples": 10000, "clean_acc": 55.5, "pgd20_acc": 34.8}))
    (run / "eval-aa1000.json").write_text(json.dumps({"n_examples": 1000, "autoattack_acc": 33.0}))
    row = script("summarize_runs").summarize(run)
    assert (row["method"], row["epochs"], row["train_minutes"]) == ("pgd-3", 2, 3.0)
    assert row["accuracy_percent"] == {"clean (n=10000)": 55.5, "pgd20 (n=10000)": 34.8,
                                       "autoattack (n=1000)": 33.0}


@pytest.mark.parametrize("key", ["attack", "method"])
def test_run_summary_reads_the_attack_under_its_name_and_its_old_one(key):
    label = script("summarize_runs").method_label({key: "trades", "attack_steps": 7})
    assert label == "trades-7"


def test_paired_cells_counts_the_images_only_one_cell_got_right():
    paired_cells = script("paired_cells")
    a = {"subset": "first 8", "per_example": {"clean": "11110000", "pgd20": "11000000"}}
    b = {"subset": "first 8", "per_example": {"clean": "11000000", "pgd20": "10100000", "aa": "0"}}
    rows = {r["label"]: r for r in paired_cells.paired_rows(a, b)}
    assert set(rows) == {"clean", "pgd20"}  # only the labels both cells have
    assert (rows["clean"]["difference"], rows["clean"]["only_a"], rows["clean"]["only_b"]) == (25.0, 2, 0)
    assert (rows["pgd20"]["difference"], rows["pgd20"]["only_a"], rows["pgd20"]["only_b"]) == (0.0, 1, 1)


def test_paired_cells_refuses_cells_evaluated_on_different_images():
    paired_cells = script("paired_cells")
    with pytest.raises(SystemExit, match="different test images"):
        paired_cells.paired_rows({"subset": "first 8", "per_example": {}}, {"subset": "first 9", "per_example": {}})


def test_plain_pgd_of_the_attack_benchmark_matches_cstars_pgd_from_the_same_start():
    # the benchmark's baseline is an independent PGD: on the same start it must take cstar's steps
    import torch
    from torch import nn

    from cstar import attacks

    bench = script("bench_attack_throughput")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    eps = 8 / 255
    start = (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) - 1) * eps
    ours = attacks.pgd(model, x, y, eps, eps / 4, 5, generator=torch.Generator().manual_seed(3))
    plain = bench.plain_pgd(model, x, y, eps, eps / 4, 5, start)
    assert (ours - plain).abs().le(1e-6).float().mean().item() > 0.99


@pytest.mark.skipif(not os.environ.get("CSTAR_TEST_DATA"), reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_attack_benchmark_writes_every_settings_rate_and_strength(tmp_path, monkeypatch):
    out = tmp_path / "attack"
    monkeypatch.setattr("sys.argv", ["bench", "--data", "mnist", "--root", os.environ["CSTAR_TEST_DATA"],
                                     "--steps", "1", "--n", "4", "--rounds", "1", "--out", str(out)])
    script("bench_attack_throughput").main()
    result = json.loads(out.with_suffix(".json").read_text())
    names = [row["setting"] for row in result["rows"]]
    assert {"cstar evaluate", "cstar", "cstar NCHW", "plain loop"} <= set(names)
    assert all(row["images_per_second"] > 0 and 0 <= row["robust_accuracy"] <= 1 for row in result["rows"])
    assert "Machine:" in out.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def bench_latency():
    return script("bench_latency")


def test_latency_speedups_are_like_for_like_and_best_against_best(bench_latency):
    rows = [{"paths": {"eager": {"median_ms": 10.0}, "onnxruntime": {"median_ms": 8.0}}},
            {"paths": {"eager": {"median_ms": 4.0}, "onnxruntime": {"median_ms": 1.0}}},
            {"paths": {"eager": {"median_ms": 5.0}, "onnxruntime": {"error": "ImportError: no onnxruntime"}}}]
    bench_latency.speedups(rows, ["eager", "onnxruntime"])
    assert rows[1]["paths"]["eager"]["speedup"] == 2.5 and rows[1]["paths"]["onnxruntime"]["speedup"] == 8.0
    assert rows[1]["best"] == {"path": "onnxruntime", "median_ms": 1.0, "dense_path": "onnxruntime", "dense_ms": 8.0,
                               "speedup": 8.0}
    assert rows[1]["best_float"] == rows[1]["best"]  # no INT8 path: the same choice
    assert "speedup" not in rows[2]["paths"]["onnxruntime"]
    assert rows[2]["best"]["path"] == "eager" and rows[2]["best"]["speedup"] == 8.0 / 5.0


def test_latency_best_vs_best_crosses_runtimes_and_keeps_int8_apart(bench_latency):
    paths = ["eager", "onnxruntime", "openvino", "onnxruntime_int8", "openvino_int8"]
    rows = [{"paths": {"eager": {"median_ms": 20.0}, "onnxruntime": {"median_ms": 9.0}, "openvino": {"median_ms": 10.0},
                       "onnxruntime_int8": {"median_ms": 6.0}, "openvino_int8": {"median_ms": 5.0}}},
            {"paths": {"eager": {"median_ms": 8.0}, "onnxruntime": {"median_ms": 4.0}, "openvino": {"median_ms": 3.0},
                       "onnxruntime_int8": {"median_ms": 2.0}, "openvino_int8": {"error": "not installed: nncf",
                                                                                "not_installed": True}}}]
    bench_latency.speedups(rows, paths)
    decomposed = rows[1]
    # any path: its fastest (onnxruntime_int8, 2 ms) against dense's fastest (openvino_int8, 5 ms)
    assert (decomposed["best"]["path"], decomposed["best"]["dense_path"]) == ("onnxruntime_int8", "openvino_int8")
    assert decomposed["best"]["speedup"] == pytest.approx(2.5)
    # float paths: openvino (3 ms) against dense's onnxruntime (9 ms), not the like-for-like 10 / 3
    assert (decomposed["best_float"]["path"], decomposed["best_float"]["dense_path"]) == ("openvino", "onnxruntime")
    assert decomposed["best_float"]["speedup"] == pytest.approx(3.0)
    assert decomposed["paths"]["openvino"]["speedup"] == pytest.approx(10 / 3)
    assert "speedup" not in decomposed["paths"]["openvino_int8"]
    assert "| 1 | macs-4x | 1.00x | 4.00x | onnxruntime_int8 2.00 vs openvino_int8 5.00: **2.50x** |" in \
        bench_latency.markdown(latency_result(rows, paths))


def latency_result(rows, paths):
    """A result dict around hand-made rows, as ``main`` writes it."""
    for row, name in zip(rows, ["dense", "macs-4x"]):
        row.update(name=name, batch=1, params_ratio=1.0, macs_ratio=1.0 if name == "dense" else 4.0)
    return {"model": "m", "input": [3, 8, 8], "batch": [1], "device": "cpu", "threads": 1, "paths": paths,
            "runtimes": {"onnxruntime": "1"}, "samples": 1, "rounds": 1, "per_round": 1, "settle": 0,
            "environment": {"torch": "2", "command": "c"}, "steal_percent": 0.0,
            "load_average_1min": {"start": 0.0, "end": 0.0}, "rows": rows}


def test_latency_report_warns_when_two_runtimes_shared_the_process(bench_latency):
    paths = ["onnxruntime", "openvino"]
    rows = [{"paths": {"onnxruntime": {"median_ms": 9.0}, "openvino": {"median_ms": 10.0}}},
            {"paths": {"onnxruntime": {"median_ms": 3.0}, "openvino": {"median_ms": 4.0}}}]
    bench_latency.speedups(rows, paths)
    result = latency_result(rows, paths)
    assert "Warning" not in bench_latency.markdown(result)
    assert "**Warning**: onnxruntime and OpenVINO timed in one process (--no-isolate)" in \
        bench_latency.markdown({**result, "mixed_runtimes": True})


def run_latency(tmp_path, paths, *extra):
    out = tmp_path / "latency"
    argv = ["bench_latency.py", "--model", "resnet20", "--plans", "macs:4", "--paths", ",".join(paths), "--threads",
            "1", "--rounds", "1", "--per-round", "2", "--settle", "0", "--out", str(out), *map(str, extra)]
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch, torch.random.fork_rng():  # the script seeds torch, sets threads
        patch.setattr("sys.argv", argv)
        try:
            script("bench_latency").main()
        finally:
            torch.set_num_threads(threads)
    return json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()


def test_latency_benchmark_times_every_path_of_every_plan_and_batch(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cstar[export]')")
    paths = ("eager", "fold_bn", "onnxruntime", "onnxruntime_int8")
    result, text = run_latency(tmp_path, paths, "--multiple-of", "1,8", "--batch", "1,2")
    assert [(r["batch"], r["name"]) for r in result["rows"]] == [
        (b, n) for b in (1, 2) for n in ("dense", "macs-4x m1", "macs-4x m8")]
    for row in result["rows"]:
        assert all(row["paths"][p]["median_ms"] > 0 and row["paths"][p]["relative_error"] < 1e-4
                   for p in ("eager", "fold_bn", "onnxruntime"))
        int8 = row["paths"]["onnxruntime_int8"]
        assert 0 < int8["relative_error"] <= result["int8_tolerance"] and 0 <= int8["top1_agreement"] <= 1
        assert int8["check_images"] == 64 and int8["median_ms"] > 0
        if row["name"] != "dense":
            assert row["best"]["speedup"] > 0 and row["best_float"]["path"] != "onnxruntime_int8"
    assert result["rows"][1]["macs_ratio"] == pytest.approx(4.0, rel=0.05)
    assert "| 2 | macs-4x m8 |" in text and "## Best vs best" in text and "CPU stolen" in text


def test_latency_benchmark_times_a_saved_model_by_saved_plans(tmp_path):
    model = cstar.models.create("resnet20", 10)
    cstar.save(model, tmp_path / "model")
    cstar.select_ranks(model, 4, budget="macs", input_shape=(3, 32, 32)).save(tmp_path / "mine.json")
    result, text = run_latency(tmp_path, ("eager",), "--checkpoint", tmp_path / "model", "--plans", "",
                               "--plan-files", tmp_path / "mine.json", "--multiple-of", "1")
    assert [r["name"] for r in result["rows"]] == ["dense", "mine"]
    assert result["rows"][1]["macs_ratio"] == pytest.approx(4.0, rel=0.02) and result["trained"]
    assert "trained weights" in text and "| 1 | mine |" in text


def test_latency_benchmark_times_each_onnx_runtime_in_a_process_of_its_own(tmp_path):
    for package in ("onnx", "onnxruntime", "openvino"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'cstar[openvino]')")
    result, text = run_latency(tmp_path, ("eager", "onnxruntime", "openvino"), "--multiple-of", "8")
    assert set(result["runtimes_timed_apart"]) == {"onnxruntime", "openvino"} and not result["mixed_runtimes"]
    for row in result["rows"]:
        assert all(row["paths"][p]["median_ms"] > 0 and row["paths"][p]["relative_error"] < 1e-4
                   for p in ("eager", "onnxruntime", "openvino"))
    assert "Timed each in a process of its own, one after the other: onnxruntime, openvino" in text


def test_latency_benchmark_runs_openvino_float_and_int8(tmp_path):
    # OpenVINO runs in a process of its own, as the benchmark does: loaded into pytest's, its thread pool
    # crashes the image-folder loader's forked workers of later tests (a segfault of the whole run)
    for package in ("onnx", "openvino", "nncf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'cstar[openvino-int8]')")
    out = tmp_path / "latency"
    command = [sys.executable, str(BENCHMARKS / "bench_latency.py"), "--model", "resnet20", "--plans", "macs:4",
               "--paths", "eager,openvino,openvino_int8", "--threads", "1", "--rounds", "1", "--per-round", "2",
               "--settle", "0", "--multiple-of", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}  # this checkout's cstar
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result, text = json.loads(out.with_suffix(".json").read_text()), out.with_suffix(".md").read_text()
    for row in result["rows"]:
        assert row["paths"]["openvino"]["relative_error"] < 1e-4 and row["paths"]["openvino"]["median_ms"] > 0
        assert 0 < row["paths"]["openvino_int8"]["relative_error"] <= result["int8_tolerance"]
    assert result["runtimes"]["openvino"] and "openvino_int8" in text


def test_latency_benchmark_reports_a_missing_runtime_and_times_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    result, text = run_latency(tmp_path, ("eager", "openvino"), "--multiple-of", "8")
    cell = result["rows"][0]["paths"]["openvino"]
    assert cell["not_installed"] and "cstar[openvino]" in cell["error"] and "median_ms" not in cell
    assert result["rows"][1]["best"]["path"] == "eager" and "not installed" in text


@pytest.mark.parametrize("argv, message", [(["--batch", "0"], "--batch"), (["--plans", "macs:x"], "--plans"),
                                           (["--paths", "tensorrt"], "unknown tensorrt")])
def test_latency_benchmark_refuses_bad_options_in_one_line(argv, message, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench_latency.py", *argv])
    with pytest.raises(SystemExit, match=f"^error: .*{message}"):
        script("bench_latency").main()


@pytest.mark.skipif(not os.environ.get("CSTAR_TEST_DATA"), reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
def test_rank_weights_benchmark_pairs_each_weighting_with_the_energy_ranks(tmp_path, monkeypatch):
    import cstar

    model = cstar.models.create("small_cnn", 10, in_channels=1, input_size=28)
    cstar.save(model, tmp_path / "dense")
    out = tmp_path / "weights"
    monkeypatch.setattr("sys.argv", ["bench", "--checkpoint", str(tmp_path / "dense"), "--data", "mnist", "--root",
                                     os.environ["CSTAR_TEST_DATA"], "--ratios", "8", "--powers", "0,1",
                                     "--attacks", "clean,pgd2", "--n", "16", "--batches", "1", "--out", str(out)])
    with torch.random.fork_rng():  # the script seeds the global generator
        script("bench_rank_weights").main()
    result = json.loads(out.with_suffix(".json").read_text())
    energy, weighted = result["rows"]
    assert (energy["power"], weighted["power"]) == (0.0, 1.0) and "vs_energy" not in energy
    assert set(weighted["vs_energy"]) == {"clean", "pgd2"}
    assert all(row["params_ratio"] >= 8 for row in result["rows"])
    assert sorted(result["sensitivity"]) == ["conv1", "conv2", "fc1", "fc2"]
    assert "Machine:" in out.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def small_comparison(tmp_path_factory):
    """A finished comparison of cstar and post-hoc low rank at 2x on digits (one epoch per phase)."""
    import cstar
    from cstar.cli import main

    root = tmp_path_factory.mktemp("budget")
    torch.manual_seed(0)
    cstar.save(cstar.models.create("small_cnn", 10, in_channels=1, input_size=8), root / "dense")
    section = "{epochs: 1, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 64, check_size: 50}"
    assert main(["compare", "--checkpoint", str(root / "dense"), "--data", "digits", "--train-n", "600",
                 "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean,pgd2", "--no-progress",
                 "--ratios", "2", "--methods", "cstar,lowrank_global", "--search", section, "--finetune", section,
                 "--latency-runs", "0", "--out", str(root / "compare")]) == 0
    return root / "compare"


def test_finetune_budget_rebuilds_each_cell_so_its_own_budget_reproduces_the_cell(small_comparison):
    from cstar import evaluate
    from cstar.pipeline.compare import CompareConfig
    from cstar.pipeline.phases import split_held_out
    from cstar.cli import _inputs as inputs, parse_args

    bench = script("bench_finetune_budget")
    run = parse_args(["compare", "--resume", "--out", str(small_comparison)])
    config = CompareConfig.from_dict(json.loads((small_comparison / "compare_config.json").read_text()))
    train_set, test_set, eps = inputs.train_and_test(run)
    dense = inputs.starting_model(run, train_set, torch.device("cpu"))
    train_part, val = split_held_out(train_set, run.val_size, "cpu", test_set)
    starts = bench.starting_models(small_comparison, dense, 2.0)
    for method, model in starts.items():
        bench.fine_tune(model, config.finetune.epochs, config, train_part, val,
                        small_comparison.parent / f"again-{method}", run.seed, dense)
        again = evaluate(model, test_set, config.eval_attacks, eps=eps, n=config.eval_n, per_example=True)
        cell = bench.cell_figures(small_comparison, method, 2.0)
        assert again["per_example"] == cell["per_example"], method  # same start + same phase = the cell


def test_finetune_budget_pairs_cstar_with_post_hoc_at_every_budget(small_comparison, tmp_path, monkeypatch):
    out = tmp_path / "budget"
    monkeypatch.setattr("sys.argv", ["bench", "--compare", str(small_comparison), "--ratio", "2",
                                     "--budgets", "0,2", "--out", str(out)])
    with torch.random.fork_rng():
        script("bench_finetune_budget").main()
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["finetune_epochs"] for r in result["rows"]] == [0, 1, 2]  # 1: the comparison's own cells
    assert [r["total_epochs"] for r in result["rows"]] == [1, 2, 3]
    for row in result["rows"]:
        for attack, diff in row["difference"].items():
            assert diff["difference"] == pytest.approx(row["cstar"][attack] - row["lowrank_global"][attack])
    assert result["rows"][0]["finetune_seconds"] == {"cstar": 0.0, "lowrank_global": 0.0}
    assert "| 2 | 3 |" in out.with_suffix(".md").read_text()


def comparison(cells, lr=0.01):
    phase = {"attack": "pgd", "epochs": 2, "lr": lr}
    return {"budget": "b", "eps": 0.3, "config": {"search": phase, "finetune": phase},
            "cells": {f"{c['method']}-{c['target_ratio']:g}x": {**c, "latency_ms": 1.0} for c in cells}}


def test_pareto_merges_comparisons_keeping_the_first_of_a_repeated_cell_and_no_latency(tmp_path):
    pareto = script("pareto")
    low = comparison([cell("cstar", 4.0, 0.6, 0.4), cell("magnitude", 4.0, 0.5, 0.3)])
    high = comparison([cell("cstar", 32.0, 0.4, 0.3), cell("magnitude", 4.0, 0.1, 0.1)])
    results, repeated = pareto.merged({"low": low, "high": high})
    assert set(results["cells"]) == {"cstar-4x", "magnitude-4x", "cstar-32x"}
    assert results["cells"]["magnitude-4x"]["accuracy"]["clean"] == 0.5 and repeated == [
        "magnitude-4x (kept from low, not high)"]
    assert all("latency_ms" not in c for c in results["cells"].values())  # measured at other times: not comparable


def test_pareto_refuses_comparisons_of_different_budgets():
    pareto = script("pareto")
    with pytest.raises(SystemExit, match="search.lr 0.02 \\(not 0.01\\)"):
        pareto.merged({"a": comparison([cell("cstar", 4.0, 0.6, 0.4)]),
                       "b": comparison([cell("cstar", 8.0, 0.5, 0.3)], lr=0.02)})
