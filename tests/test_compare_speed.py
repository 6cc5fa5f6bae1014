"""`cstar compare` at measured speed-ups (``budget="latency"``): every method held to a timed structure.

The runtime is replaced by a clock that charges each graph one microsecond per
thousand MACs (counted by hooks, independently of cstar's counter), so a
structure's speed-up is its MACs ratio and every check below has an exact
answer.
"""

import json
import shutil

import pytest
import torch
from torch import nn

import cstar.lowrank._latency as latency
from cstar import data, models
from cstar._core.errors import CstarError
from cstar.files.serialize import load
from cstar.pipeline import compressors
from cstar.pipeline.compare import CompareConfig, compare
from cstar.pipeline.speed import SPEED_REPEATS
from cstar.prune import magnitude_prune, ratio_for_speedup
from cstar.records import cell_model
from cstar.training.fit import TrainConfig
from digits_runs import refused
from helpers import macs_of

TRAIN = dict(attack="pgd", eps=0.2, attack_steps=2, batch_size=64, optimizer="adam", lr=1e-3, weight_decay=0.0,
             check_size=0, progress=False)
METHODS = ["dense", "cstar", "magnitude", "lowrank_global", "lowrank_uniform"]


def charging_macs(calls: list):
    """A stand-in for the runtime's timing: every graph takes one microsecond per thousand MACs; each call's
    number of graphs is appended to ``calls``."""
    def fake(modules, x, runtime, threads, runs, rounds, **timing):
        calls.append(len(modules))
        return [macs_of(m, x) * 1e-6 for m in modules]

    return fake


@pytest.fixture()
def clock(monkeypatch, tmp_path):
    """The MACs clock for one test; returns the list of graphs timed per call."""
    monkeypatch.setenv("CSTAR_LATENCY_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(latency, "interleaved_ms", charging_macs(calls))
    return calls


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", split="train"), data.load("digits", split="test")


def dense_model(spec) -> nn.Module:
    torch.manual_seed(0)
    c, h, _ = spec.image_shape
    return models.create("small_cnn", 10, in_channels=c, input_size=h, mean=spec.mean, std=spec.std)


def config(**kw) -> CompareConfig:
    base = dict(ratios=[2.0], methods=METHODS, budget="latency", runtime="eager", latency_threads=1,
                search=TrainConfig(epochs=1, **TRAIN), finetune=TrainConfig(epochs=1, **TRAIN),
                eval_attacks=["clean"], eval_n=60, latency_runs=0)
    base.update(kw)
    return CompareConfig(**base)


def test_pruning_meets_the_speedup_at_the_smallest_ratio_that_does(clock, digits):
    spec = digits[0].spec
    dense, x = dense_model(spec), torch.rand(1, *spec.image_shape)
    found = ratio_for_speedup(dense, 2.0, spec.image_shape, runtime="eager", threads=1)
    pruned = magnitude_prune(dense, found.params_ratio, spec.image_shape)
    assert macs_of(dense, x) / macs_of(pruned, x) == pytest.approx(found.speedup, rel=1e-9)
    assert found.speedup >= 2.0
    slower = magnitude_prune(dense, found.params_ratio / 1.04, spec.image_shape)  # below the 3% bracket
    assert macs_of(dense, x) / macs_of(slower, x) < 2.0


def test_pruning_held_to_a_reference_runs_at_least_as_fast_as_it(clock, digits):
    spec = digits[0].spec
    dense, x = dense_model(spec), torch.rand(1, *spec.image_shape)
    reference = magnitude_prune(dense, 2.5, spec.image_shape)  # any structure: its time is the bar, not the 2x
    found = ratio_for_speedup(dense, 2.0, spec.image_shape, runtime="eager", threads=1, reference=reference)
    pruned = magnitude_prune(dense, found.params_ratio, spec.image_shape)
    assert macs_of(pruned, x) <= macs_of(reference, x)
    assert found.reference_ms == pytest.approx(macs_of(reference, x) * 1e-6)
    slower = magnitude_prune(dense, found.params_ratio / 1.04, spec.image_shape)
    assert macs_of(slower, x) > macs_of(reference, x)


def test_a_speedup_no_pruning_reaches_is_refused_with_the_fastest_measured(clock, digits):
    spec = digits[0].spec
    with pytest.raises(CstarError, match=r"no channel pruning of the model met the 2000x speed-up on eager: the "
                                         r"fastest structure timed ran \d+\.\d\dx"):
        ratio_for_speedup(dense_model(spec), 2000.0, spec.image_shape, runtime="eager", threads=1)


@pytest.fixture(scope="module")
def finished_once(digits, tmp_path_factory):
    """One comparison at 2x under the MACs clock, run once for the module."""
    train_set, test_set = digits
    root = tmp_path_factory.mktemp("speed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CSTAR_LATENCY_CACHE", str(root / "cache"))
        patch.setattr(latency, "interleaved_ms", charging_macs([]))
        results = compare(dense_model(train_set.spec), train_set, test_set, config(), root / "run", val_size=200)
    return root / "run", results


@pytest.fixture()
def finished(finished_once, clock, tmp_path):
    """A copy of the module's comparison for one test to read or change, under a fresh MACs clock."""
    out, results = finished_once
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", results, clock


def test_every_trained_model_runs_at_least_the_target_speedup_as_measured(finished, digits):
    out, results, _ = finished
    spec = digits[0].spec
    x = torch.rand(1, *spec.image_shape)
    dense_macs = macs_of(dense_model(spec), x)
    assert set(results["cells"]) == {"dense"} | {f"{m}-2x-faster" for m in METHODS[1:]}
    for name, row in results["cells"].items():
        model = load(cell_model(out / "cells" / name, row), model=dense_model(spec))
        assert row["speedup"] == pytest.approx(dense_macs / macs_of(model, x), rel=1e-3), name
        assert row["speedup"] >= (1.0 if name == "dense" else 2.0), name
        assert row["speedup_range"][0] <= row["speedup"] <= row["speedup_range"][1]
    assert results["speed"]["runtime"] == "eager"
    assert "| speed-up on eager (measured) |" in (out / "comparison.md").read_text()


def factorised_ranks(model: nn.Module) -> dict[str, list[int]]:
    """The ranks of every factorised layer of ``model``."""
    return {name: list(m.ranks) if hasattr(m, "ranks") else [m.rank] for name, m in model.named_modules()
            if hasattr(m, "ranks") or hasattr(m, "rank")}


def test_cstar_and_post_hoc_low_rank_train_the_same_timed_ranks(finished, digits):
    out, results, _ = finished
    plan = json.loads((out / "speed_targets" / "2x-global.json").read_text())
    planned = {name: list(layer["ranks"]) for name, layer in plan["layers"].items() if layer["ranks"]}
    assert planned
    for method in ("cstar", "lowrank_global"):
        row = results["cells"][f"{method}-2x-faster"]
        model = load(cell_model(out / "cells" / f"{method}-2x-faster", row), model=dense_model(digits[0].spec))
        assert factorised_ranks(model) == planned, method
        assert row["speed_target"]["kind"] == "global"
        assert row["speed_target"]["speedup_when_chosen"] == pytest.approx(plan["achieved_speedup"])
    pruning = results["cells"]["magnitude-2x-faster"]["speed_target"]
    assert pruning["kind"] == "pruning" and pruning["held_to"] == "the rank plan's structure"


def test_a_resume_reads_the_chosen_structures_back_instead_of_timing_again(finished, digits):
    out, results, calls = finished
    train_set, test_set = digits
    calls.clear()
    again = compare(dense_model(train_set.spec), train_set, test_set, config(), out, val_size=200)
    # only the final timings: every cell in a pair with the dense model, SPEED_REPEATS times
    assert calls == [2] * (len(results["cells"]) * SPEED_REPEATS)
    assert {n: r["speedup"] for n, r in again["cells"].items()} == {n: r["speedup"] for n, r in results["cells"].items()}


def test_a_structure_file_for_another_speedup_is_refused(finished, digits):
    out, _, _ = finished
    train_set, test_set = digits
    path = out / "speed_targets" / "2x-pruning.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "target_speedup": 3.0}))
    with pytest.raises(CstarError, match="was chosen for 3x measured with"):
        compare(dense_model(train_set.spec), train_set, test_set, config(), out, val_size=200)


@pytest.mark.parametrize("content", ['{"params_ratio": "__import__(\'os\')"}', "not json", "[]",
                                    '{"target_speedup": 2, "params_ratio": 0.5, "dense_ms": 1, "pruned_ms": 1, '
                                    '"measured_on": "x"}'],
                         ids=["code-in-a-field", "not-json", "a-list", "ratio-below-one"])
def test_a_crafted_pruning_record_is_refused_in_one_line(finished, digits, content):
    out, _, _ = finished
    train_set, test_set = digits
    (out / "speed_targets" / "2x-pruning.json").write_text(content)
    with pytest.raises(CstarError, match="is not a pruning speed record cstar wrote"):
        compare(dense_model(train_set.spec), train_set, test_set, config(), out, val_size=200)


@pytest.mark.parametrize("field, value", [("dense_ms", True), ("pruned_ms", float("inf")), ("pruned_ms", 0),
                                          ("reference_ms", -1.0), ("params_ratio", 1.0)],
                         ids=["a-bool-time", "an-infinite-time", "a-zero-time", "a-negative-reference", "ratio-one"])
def test_a_pruning_record_with_a_bad_field_is_refused(field, value):
    from cstar.prune import PruningSpeed

    record = {"target_speedup": 2.0, "params_ratio": 2.5, "dense_ms": 1.0, "pruned_ms": 0.5, "measured_on": "x",
              "reference_ms": None}
    assert PruningSpeed.from_dict(record, "r.json").speedup == 2.0
    with pytest.raises(CstarError, match="r.json is not a pruning speed record cstar wrote"):
        PruningSpeed.from_dict({**record, field: value}, "r.json")


def test_a_method_that_cannot_meet_a_speedup_is_refused_before_any_work():
    with pytest.raises(CstarError, match="cstar_learned cannot be held to a measured speed-up"):
        config(methods=["dense", "cstar", "cstar_learned"])


def test_latency_settings_without_the_latency_budget_are_refused():
    with pytest.raises(CstarError, match="runtime only applies to budget='latency'"):
        config(budget="params", latency_threads=None)


def test_a_registered_method_says_how_it_meets_a_speedup():
    assert compressors.speed_of("harp") == "pruning" and compressors.speed_of("lowrank_uniform") == "uniform"
    with pytest.raises(CstarError, match="unknown speed 'fast'"):
        compressors.register("fast_one", speed="fast")


def test_the_cli_refuses_speedups_beside_ratios(capsys):
    line = refused(capsys, "compare", "--data", "digits", "--speedups", "2", "--ratios", "4")
    assert "pass one of --speedups and --ratios" in line


def test_the_cli_holds_speedups_as_a_latency_budget(capsys):
    line = refused(capsys, "compare", "--data", "digits", "--speedups", "2", "--methods", "dense,cstar_learned")
    assert "cstar_learned cannot be held to a measured speed-up" in line
