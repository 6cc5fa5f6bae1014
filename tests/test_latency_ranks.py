"""Rank plans for a measured speed-up (``budget="latency"``): layer timings, their cache, the measured loop."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import cstar.lowrank._latency as latency
from digits_runs import refused, run
from helpers import macs_of
from cstar._core.errors import CstarError
from cstar.lowrank import RankPlan, RankSpec, Tucker2Conv2d, check_plan, check_reachable, select_ranks
from cstar.lowrank._latency import LatencyCurve, LatencyGrid, rank_ladder


class ConvNet(nn.Module):
    """Three compressible convs of distinct shapes between a kept stem and head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(32, 48, 3, padding=1)
        self.b = nn.Conv2d(48, 64, 3, stride=2, padding=1)
        self.c = nn.Conv2d(64, 64, 3, padding=1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.c(x)).mean((2, 3)))


SHAPE = (3, 16, 16)


@pytest.fixture()
def timed_as_macs(monkeypatch, tmp_path):
    """Every timed graph takes one microsecond per thousand MACs, plus ``extra(module)`` ms; records the calls."""
    monkeypatch.setenv("CSTAR_LATENCY_CACHE", str(tmp_path / "cache"))
    calls = []
    state = {"extra": lambda module: 0.0}

    def fake(modules, x, runtime, threads, runs, rounds, **timing):
        calls.append(len(modules))
        return [macs_of(m, x) * 1e-6 + state["extra"](m) for m in modules]

    monkeypatch.setattr(latency, "interleaved_ms", fake)
    return calls, state


def test_times_proportional_to_macs_give_the_macs_plan(timed_as_macs):
    by_latency = select_ranks(ConvNet(), 3, budget="latency", runtime="eager", input_shape=SHAPE, multiple_of=1)
    by_macs = select_ranks(ConvNet(), 3, budget="macs", input_shape=SHAPE)
    assert {n: p.ranks for n, p in by_latency.layers.items()} == {n: p.ranks for n, p in by_macs.layers.items()}
    assert by_latency.achieved_speedup == pytest.approx(by_macs.achieved_macs_ratio, rel=1e-9)
    assert by_latency.achieved_speedup >= 3


def test_a_layer_whose_factorisation_never_pays_stays_dense(timed_as_macs):
    _, state = timed_as_macs
    # any factorised form of layer b (48 -> 64 channels) costs 1 ms more, alone and in the model
    state["extra"] = lambda m: sum(1.0 for c in m.modules() if isinstance(c, Tucker2Conv2d) and c.first.in_channels == 48)
    plan = select_ranks(ConvNet(), 1.5, budget="latency", runtime="eager", input_shape=SHAPE, multiple_of=1)
    assert plan.layers["b"].kind == "dense"
    assert plan.layers["a"].kind == "tucker2" and plan.layers["c"].kind == "tucker2"


def test_the_plan_records_where_and_what_it_measured(timed_as_macs):
    plan = select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE, latency_batch=4)
    assert plan.runtime == "eager" and plan.budget == "latency" and plan.target_ratio == 2
    assert "torch" in plan.measured_on and "batch 4" in plan.measured_on
    assert plan.achieved_speedup == pytest.approx(plan.dense_latency_ms / plan.latency_ms)
    assert all(p.latency_alone_ms <= p.dense_latency_alone_ms for p in plan.layers.values())
    assert all(r % 8 == 0 or r == 1 for p in plan.layers.values() for r in p.ranks)  # multiples of 8 by default


def test_timings_are_cached_per_machine_and_runtime(timed_as_macs, tmp_path):
    calls, _ = timed_as_macs
    select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    layer_graphs = calls.count(1)
    calls.clear()
    select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    assert layer_graphs > 20 and calls.count(1) == 0  # no layer graph timed twice; whole models always are
    (cache,) = (tmp_path / "cache").iterdir()
    record = json.loads(cache.read_text())
    assert record["format"] == 1 and "threads=" in record["key"] and len(record["entries"]) == layer_graphs


@pytest.mark.parametrize("entries", [pytest.param('{"a": -1}', id="negative-entry"), '{"a": "__import__(\'os\')"}', '{"a": [1]}', '[1, 2]'])
def test_a_cache_cstar_did_not_write_is_ignored_and_left_alone(timed_as_macs, entries):
    calls, _ = timed_as_macs
    key = latency._cache_key("eager", torch.get_num_threads())
    cache = latency._cache_path("eager", torch.get_num_threads())
    cache.parent.mkdir(parents=True)
    text = f'{{"format": 1, "key": {json.dumps(key)}, "entries": {entries}}}'
    cache.write_text(text)
    with pytest.warns(UserWarning, match="ignoring the latency cache .* left as it is"):
        plan = select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    assert cache.read_text() == text
    assert plan.achieved_speedup >= 2 and calls.count(1) > 0


def test_a_cache_of_another_machine_is_not_read(timed_as_macs):
    cache = latency._cache_path("eager", torch.get_num_threads())
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"format": 1, "key": "another CPU", "entries": {}}))
    with pytest.warns(UserWarning, match="not a file cstar wrote for"):
        latency.LatencyCache("eager", torch.get_num_threads())


def test_a_cached_timing_is_read_as_written(timed_as_macs):
    select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    cache = latency.LatencyCache("eager", torch.get_num_threads())
    assert cache.writable and len(cache.entries) > 20 and all(v >= 0 for v in cache.entries.values())


def test_no_plan_meeting_the_speedup_is_refused_with_the_best_measured(timed_as_macs):
    _, state = timed_as_macs
    # whole models (not layer graphs) run 20 ms slower than the layers add up to (about 8 ms), whatever their ranks
    state["extra"] = lambda m: 20.0 if isinstance(m, ConvNet) else 0.0
    with pytest.raises(CstarError, match=r"2x on latency is unreachable \(at most 1\.\d+x, measured\)"):
        select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)


def test_multilinear_interpolation_is_exact_for_a_bilinear_cost():
    ladders = ([1, 4, 8, 16], [1, 2, 8, 12, 24])

    def cost(r_out, r_in):
        return 0.5 + 0.1 * r_out + 0.03 * r_in + 0.002 * r_out * r_in

    values = np.array([[cost(a, b) for b in ladders[1]] for a in ladders[0]])
    grid = LatencyGrid(2.0, ladders, values)
    rng = np.random.default_rng(0)
    for r_out, r_in in zip(rng.integers(1, 17, 40), rng.integers(1, 25, 40)):
        assert grid.at((int(r_out), int(r_in))) == pytest.approx(cost(r_out, r_in), rel=1e-12)


def test_the_rank_ladder_keeps_min_rank_full_size_and_the_grid():
    assert rank_ladder(64, 1, 8) == [1, 8, 16, 24, 32, 48, 64]
    assert rank_ladder(16, 8, 8) == [8, 16]


def test_the_latency_curve_inverts_its_interpolation():
    curve = LatencyCurve()
    for point in [(10.0, 1.0), (2.0, 0.3), (5.0, 0.5), (1.0, 0.2)]:
        curve.add(*point)
    assert curve.model_ms(3.5) == pytest.approx(0.4)
    for time in (0.25, 0.4, 0.8):
        assert curve.model_ms(curve.layer_sum(time)) == pytest.approx(time)
    assert curve.layer_sum(0.1) == pytest.approx(0.0)  # below the fastest plan: along the first segment, down to 0


def test_latency_settings_need_the_latency_budget():
    with pytest.raises(CstarError, match="runtime, latency_batch only apply to budget='latency'"):
        RankSpec(4, budget="macs", runtime="openvino", latency_batch=32)
    assert RankSpec(4, budget="latency").runtime == "onnxruntime"
    assert RankSpec(4, budget="latency").multiple_of == 8 and RankSpec(4).multiple_of == 1


def test_a_runtime_not_installed_is_refused_with_its_extra(monkeypatch):
    real = latency.importlib.util.find_spec
    monkeypatch.setattr(latency.importlib.util, "find_spec", lambda name: None if name == "openvino" else real(name))
    with pytest.raises(CstarError, match=r"timing layers in openvino needs openvino: pip install 'cstar\[openvino\]'"):
        check_reachable(ConvNet(), RankSpec(2, budget="latency", runtime="openvino", input_shape=SHAPE))


def test_a_plan_round_trips_and_an_older_plan_still_reads(timed_as_macs):
    plan = select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    again = RankPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan and again.to_dict()["achieved_speedup"] == plan.achieved_speedup
    old = select_ranks(ConvNet(), 2, budget="macs", input_shape=SHAPE).to_dict()
    for key in ("runtime", "measured_on", "dense_latency_ms", "latency_ms", "achieved_speedup"):
        old.pop(key)
    for layer in old["layers"].values():
        layer.pop("dense_latency_alone_ms"), layer.pop("latency_alone_ms")
    assert RankPlan.from_dict(old).achieved_speedup is None


def test_a_plan_timed_on_another_runtime_is_refused(timed_as_macs):
    plan = select_ranks(ConvNet(), 2, budget="latency", runtime="eager", input_shape=SHAPE)
    with pytest.raises(CstarError, match="timed on eager but the settings ask onnxruntime"):
        check_plan(ConvNet(), plan, RankSpec(2, budget="latency", runtime="onnxruntime", input_shape=SHAPE))


def _wide_model():
    return nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, 10))


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_timings_on_this_machine_meet_a_modest_speedup(monkeypatch, tmp_path, runtime):
    pytest.importorskip("onnxruntime") if runtime == "onnxruntime" else None
    monkeypatch.setenv("CSTAR_LATENCY_CACHE", str(tmp_path))
    for name, value in (("LAYER_RUNS", 10), ("SETTLE", 3), ("MODEL_ROUNDS", 4), ("MODEL_SECONDS", 0.0)):
        monkeypatch.setattr(latency, name, value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cache warning: a fresh folder
        plan = select_ranks(_wide_model(), 1.3, budget="latency", runtime=runtime, input_shape=(3, 24, 24),
                            latency_threads=1)
    assert plan.achieved_speedup >= 1.3 and plan.dense_latency_ms > plan.latency_ms > 0
    assert "1 thread(s), batch 1" in plan.measured_on and plan.runtime == runtime


def test_cli_ranks_for_a_speedup(timed_as_macs, capsys, tmp_path):
    code, out, err = run(capsys, "ranks", "--model", "resnet20", "--speedup", "1.5", "--runtime", "eager",
                         "--json", tmp_path / "plan.json")
    assert code == 0, err
    plan = RankPlan.load(tmp_path / "plan.json")
    assert plan.budget == "latency" and plan.target_ratio == 1.5 and plan.achieved_speedup >= 1.5
    assert "latency budget" in out and "measured" in out


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--speedup", "2", "--ratio", "2"], "pass one of --speedup and --ratio", id="speedup-and-ratio"),
    (["--speedup", "2", "--budget", "macs"], "--speedup is a latency target but --budget is macs: drop --budget"),
    (["--ratio", "2", "--runtime", "eager"], "runtime only applies to budget='latency'"),
    (["--speedup", "0.5"], "speedup"),
])
def test_cli_refuses_a_muddled_speedup(capsys, argv, message):
    assert message in refused(capsys, "ranks", "--model", "resnet20", *argv)


def test_cli_compress_refuses_a_plan_for_another_target_before_any_file(capsys, tmp_path):
    assert run(capsys, "ranks", "--model", "small_cnn", "--data", "digits", "--ratio", "2",
               "--json", tmp_path / "plan.json")[0] == 0
    line = refused(capsys, "compress", "--model", "small_cnn", "--data", "digits", "--ratio", "4",
                   "--plan", tmp_path / "plan.json", "--out", tmp_path / "run")
    assert "the plan was made for 2x on params but the settings ask 4x on params" in line
    assert not (tmp_path / "run").exists()


def test_learned_ranks_and_admm_reselection_refuse_a_latency_budget():
    from cstar import ADMM, ADMMConfig
    from cstar.lowrank import RankScoredModel
    spec = RankSpec(2, budget="latency", runtime="eager", input_shape=SHAPE)
    with pytest.raises(CstarError, match="learned ranks take a parameter or MACs budget"):
        RankScoredModel(ConvNet(), spec)
    plan = select_ranks(ConvNet(), 2, budget="macs", input_shape=SHAPE)
    with pytest.raises(CstarError, match="re-selection with a latency budget"):
        ADMM(ConvNet(), plan, ADMMConfig(reselect=2), 10, rank_spec=spec)


@pytest.mark.parametrize("key, value", [pytest.param("latency_ms", "fast", id="latency-not-a-number"), ("dense_latency_ms", -1.0), ("runtime", 3),
                                        ("latency_ms", float("nan")),
                                        pytest.param("latency_ms", True, id="latency-a-bool")])
def test_a_crafted_plan_with_bad_latency_fields_is_refused(key, value):
    record = select_ranks(ConvNet(), 2, budget="macs", input_shape=SHAPE).to_dict()
    record[key] = value
    with pytest.raises(CstarError, match=f"{key} is .*pass a plan written by RankPlan.save"):
        RankPlan.from_dict(record)
