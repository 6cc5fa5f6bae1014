"""The compressor registry: a method added in one function runs in compare like the built-in ones."""

import json
import re
from pathlib import Path

import pytest

from cstar.pipeline import compressors
from cstar import data
from cstar._core.errors import CstarError
from cstar.pipeline.compare import CompareConfig, compare
from cstar.evaluation.counting import count_params
from cstar.training.fit import TrainConfig

from test_compare import config, dense_model

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md"


@pytest.fixture
def registry(monkeypatch):
    """The registry as shipped, restored after the test (registration is global)."""
    monkeypatch.setattr(compressors, "_REGISTRY", dict(compressors._REGISTRY))
    return compressors


def design_example() -> str:
    text = DESIGN.read_text()
    section = text[text.index("## Adding a compression method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_built_in_methods_are_registered_in_order():
    assert compressors.names() == ("cstar", "hydra", "magnitude", "lowrank_global", "lowrank_uniform",
                                   "cstar_equal_macs", "lowrank_equal_macs", "cstar_sensitivity",
                                   "lowrank_sensitivity", "harp", "lowrank_learned", "cstar_learned",
                                   "lowrank_conditioned")
    assert compressors.settings_of("cstar") == ("search", "finetune", "admm")
    assert compressors.settings_of("magnitude") == ("search", "finetune")


def test_the_design_example_runs_in_compare_beside_a_built_in_method(registry, tmp_path):
    exec(compile(design_example(), str(DESIGN), "exec"), {})
    assert "l1_channels" in registry.names()
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    dense = dense_model(train_set)
    results = compare(dense, train_set, test_set, config(methods=["dense", "magnitude", "l1_channels"],
                                                         latency_runs=0), tmp_path / "run", val_size=200)
    cell = results["cells"]["l1_channels-4x"]
    assert cell["params_ratio"] == pytest.approx(4.0, rel=0.05) and cell["params"] < count_params(dense) / 3.9
    assert set(cell["train_seconds"]) == {"search", "finetune"}
    assert set(cell["training"]) == {"search", "finetune", "seed"}
    for phase in ("search", "finetune"):  # both phases trained (and are resumable) in the cell's directory
        assert (tmp_path / "run" / "cells" / "l1_channels-4x" / phase / "metrics.jsonl").exists()
    assert "l1_channels" in (tmp_path / "run" / "comparison.md").read_text()


def test_a_method_not_registered_is_refused_naming_the_registry(registry):
    with pytest.raises(CstarError, match=r"unknown method\(s\) snip: .*cstar\.compressors\.register"):
        CompareConfig(methods=["dense", "snip"])


@pytest.mark.parametrize("name, settings, message", [
    ("magnitude", ("search", "finetune"), "already registered"),
    ("dense", ("search", "finetune"), "other than 'dense'"),
    ("two words", ("search", "finetune"), "use an identifier"),
    ("mine", ("search", "warmup"), "unknown settings warmup"),
])
def test_bad_registrations_are_refused_in_one_line(registry, name, settings, message):
    with pytest.raises(CstarError, match=message):
        registry.register(name, settings=settings)(lambda cell: None)


def test_a_cell_trains_a_phase_resumably_in_its_own_directory(tmp_path):
    train_set = data.load("digits", split="train")
    dense = dense_model(train_set)
    settings = TrainConfig(epochs=1, attack="clean", batch_size=64, check_size=0, progress=False)
    cell = compressors.Cell(dense, 2.0, train_set, train_set, None, settings, settings, None, tmp_path / "m-2x", 0)
    model = cell.fresh_copy()
    seconds = cell.train(model, "finetune")
    assert model is not dense and isinstance(seconds, float) and seconds > 0
    assert (tmp_path / "m-2x" / "finetune" / "metrics.jsonl").exists()
    assert any((a != b).any() for a, b in zip(model.parameters(), dense.parameters()))
    with pytest.raises(CstarError, match="unknown phase 'warmup'"):
        cell.train(model, "warmup")


def _saving_method(where):
    """A method that prunes without training and saves its model itself, at ``where(cell)``."""
    import cstar

    def method(cell):
        from cstar import prune

        model = prune.magnitude_prune(cell.fresh_copy(), cell.ratio)
        cell.model_dir = cstar.save(model, where(cell))
        return model, {"search": 0.0, "finetune": 0.0}
    return method


def test_a_model_its_method_saved_is_not_saved_again_and_the_cell_says_where(registry, tmp_path, monkeypatch):
    from cstar.files import serialize
    from cstar.pipeline import compare as compare_module

    registry.register("self_saving")(_saving_method(lambda cell: cell.out_dir / "own" / "model"))
    saved = []
    monkeypatch.setattr(compare_module, "save", lambda model, path: saved.append(path) or serialize.save(model, path))
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    results = compare(dense_model(train_set), train_set, test_set, config(methods=["self_saving"], latency_runs=2),
                      tmp_path / "run", val_size=200)
    assert saved == []  # compare saved nothing: the method had
    assert results["cells"]["self_saving-4x"]["model_dir"] == "own/model"
    assert not (tmp_path / "run" / "cells" / "self_saving-4x" / "model").exists()
    assert results["cells"]["self_saving-4x"]["latency_ms"] > 0  # measured on the model where it was saved


def test_a_method_saving_its_model_outside_its_cell_is_refused(registry, tmp_path):
    registry.register("stray")(_saving_method(lambda cell: tmp_path / "elsewhere"))
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    with pytest.raises(CstarError, match="outside the cell's directory"):
        compare(dense_model(train_set), train_set, test_set, config(methods=["stray"], latency_runs=0),
                tmp_path / "run", val_size=200)


def test_the_equal_macs_methods_meet_both_the_ratio_and_the_macs_of_pruning(tmp_path):
    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    results = compare(dense_model(train_set), train_set, test_set,
                      config(methods=["dense", "magnitude", "cstar_equal_macs", "lowrank_equal_macs"], latency_runs=0),
                      tmp_path / "run", val_size=200)
    cells = results["cells"]
    pruned = cells["magnitude-4x"]
    for name in ("cstar_equal_macs-4x", "lowrank_equal_macs-4x"):
        assert cells[name]["params_ratio"] >= 4.0 * 0.99
        assert cells[name]["macs_ratio"] >= pruned["macs_ratio"] * 0.999  # as fast as pruning on MACs, or faster
        assert cells[name]["macs_ratio"] > 3.5  # pruning reaches 4.0x MACs here, a params budget alone 1.87x
    assert "admm" in cells["cstar_equal_macs-4x"]["training"]


def test_the_sensitivity_methods_allocate_ranks_by_the_dense_models_sensitivity(tmp_path):
    from cstar.lowrank import select_ranks

    train_set, test_set = data.load("digits", split="train"), data.load("digits", split="test")
    dense = dense_model(train_set)
    results = compare(dense, train_set, test_set,
                      config(methods=["dense", "lowrank_sensitivity", "cstar_sensitivity"], latency_runs=0),
                      tmp_path / "run", val_size=200)
    for name in ("lowrank_sensitivity-4x", "cstar_sensitivity-4x"):
        assert results["cells"][name]["params_ratio"] >= 4.0
    cfg = config()
    cell = compressors.Cell(dense, 4.0, train_set, train_set, None, cfg.search, cfg.finetune, cfg.admm,
                            tmp_path / "c", 0)
    weights = compressors.dense_sensitivity(cell)
    assert weights == compressors.dense_sensitivity(cell)  # seeded: the same plan on every resume and process
    assert len(set(weights.values())) > 1  # the layers are told apart
    expected = select_ranks(dense, 4.0, layer_weights=weights)
    plan = (tmp_path / "run" / "cells" / "cstar_sensitivity-4x" / "cstar" / "plan.json").read_text()
    assert json.loads(plan)["layers"] == json.loads(json.dumps(expected.to_dict()["layers"]))
