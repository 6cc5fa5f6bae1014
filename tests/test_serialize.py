"""Save / load round trips, refusals of bad files, TorchScript and ONNX export."""

import importlib.util
import json
import os
import pickle

import pytest
import torch
from torch import nn

from cstar import CstarError
from cstar.lowrank import LowRankConv1x1, LowRankLinear, Tucker2Conv2d, decompose, select_ranks
from cstar.models import create
from cstar import export
from cstar.files.serialize import load, save

from helpers import factorised_resnet20, randomise_bn


def _sequential() -> nn.Module:
    torch.manual_seed(0)
    return randomise_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.MaxPool2d(2),
        Tucker2Conv2d(8, 8, 3, (3, 2), padding=1), nn.GELU(), nn.AvgPool2d(2), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.BatchNorm1d(16), nn.SiLU(), nn.Dropout(0.1), LowRankLinear(16, 5, 2),
    ))


def _assert_same_outputs_no_shared_memory(original: nn.Module, loaded: nn.Module, x: torch.Tensor) -> None:
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(original.eval()(x), loaded(x))
    ours = {t.untyped_storage().data_ptr() for t in original.state_dict().values()}
    assert not ours & {t.untyped_storage().data_ptr() for t in loaded.state_dict().values()}


def test_builtin_dense_round_trip(tmp_path):
    model = randomise_bn(create("resnet20"))
    loaded = load(save(model, tmp_path / "m"))
    _assert_same_outputs_no_shared_memory(model, loaded, torch.rand(2, 3, 32, 32))
    assert loaded.cstar_config == model.cstar_config


def test_builtin_factorised_round_trip_restores_layers_and_records_them(tmp_path):
    model = factorised_resnet20(factorised_fc=True)
    loaded = load(save(model, tmp_path / "m"))
    _assert_same_outputs_no_shared_memory(model, loaded, torch.rand(2, 3, 32, 32))
    assert isinstance(loaded.stages[1][0].conv1, Tucker2Conv2d) and loaded.stages[1][0].conv1.ranks == (5, 4)
    assert isinstance(loaded.stages[1][0].shortcut.conv, LowRankConv1x1)
    record = json.loads((tmp_path / "m" / "model.json").read_text())["factorised"]
    assert sorted(record) == ["fc", "stages.1.0.conv1", "stages.1.0.shortcut.conv"]
    assert record["fc"] == {"class": "LowRankLinear",
                            "args": {"in_features": 64, "out_features": 10, "rank": 3, "bias": True}}


def test_decomposed_model_round_trip_restores_its_attributes(tmp_path):
    model = randomise_bn(create("resnet20"))
    small = decompose(model, select_ranks(model, 4.0)).eval()
    loaded = load(save(small, tmp_path / "m"))
    _assert_same_outputs_no_shared_memory(small, loaded, torch.rand(2, 3, 32, 32))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    assert loaded.cstar_lowrank == small.cstar_lowrank and loaded.cstar_config == small.cstar_config


def test_sequential_round_trip(tmp_path):
    model = _sequential()
    loaded = load(save(model, tmp_path / "m"))
    _assert_same_outputs_no_shared_memory(model, loaded, torch.rand(3, 3, 16, 16))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in model.modules()]


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    loaded = load(save(model, tmp_path / "m"))
    assert loaded[0].weight is loaded[2].weight
    assert json.loads((tmp_path / "m" / "model.json").read_text())["tied"] == {"2.weight": "0.weight",
                                                                             "2.bias": "0.bias"}
    x = torch.rand(1, 3, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_save_overwrites_a_previous_save(tmp_path):
    save(create("resnet20"), tmp_path / "m")
    model = factorised_resnet20(factorised_fc=True)
    loaded = load(save(model, tmp_path / "m"))
    assert isinstance(loaded.fc, LowRankLinear)


def test_save_refuses_to_clobber_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CstarError, match="not a cstar model"):
        save(create("resnet20"), tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]


class _Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_model_with_a_module_cstar_cannot_build_reloads_only_on_a_fresh_instance(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), _Doubler())
    save(model, tmp_path / "m")
    with pytest.raises(CstarError, match=r"_Doubler.*model=Sequential\(\.\.\.\)"):
        load(tmp_path / "m")
    loaded = load(tmp_path / "m", model=nn.Sequential(nn.Linear(2, 3), _Doubler()))
    x = torch.randn(4, 2)
    assert torch.equal(loaded(x), model(x))


def _tamper(path, edit):
    record = json.loads((path / "model.json").read_text())
    edit(record)
    (path / "model.json").write_text(json.dumps(record))


def test_load_refuses_unknown_class(tmp_path):
    path = save(_sequential(), tmp_path / "m")
    _tamper(path, lambda r: r["architecture"]["root"]["children"][2][1].update({"class": "os.system"}))
    with pytest.raises(CstarError, match=r"model\.json.*'2'.*unknown class 'os\.system'"):
        load(path)


def test_load_refuses_a_shape_that_does_not_match_the_weights(tmp_path):
    path = save(factorised_resnet20(factorised_fc=True), tmp_path / "m")
    _tamper(path, lambda r: r["architecture"]["replacements"]["fc"]["args"].update({"rank": 4}))
    with pytest.raises(CstarError, match=r"model\.safetensors.*'fc\.first\.weight' has shape \(3, 64\).*\(4, 64\)"):
        load(path)


def test_load_refuses_missing_tensors(tmp_path):
    path = save(create("resnet20"), tmp_path / "m")
    _tamper(path, lambda r: r["architecture"]["replacements"].update(
        {"fc": {"class": "LowRankLinear", "args": {"in_features": 64, "out_features": 10, "rank": 2}}}))
    with pytest.raises(CstarError, match="missing tensors: fc.first.weight"):
        load(path)


def test_load_refuses_truncated_weights(tmp_path):
    path = save(create("resnet20"), tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CstarError, match=r"model\.safetensors.*corrupt, truncated"):
        load(path)


def test_load_refuses_a_newer_format_version(tmp_path):
    path = save(create("resnet20"), tmp_path / "m")
    _tamper(path, lambda r: r.update({"version": 99}))
    with pytest.raises(CstarError, match="format version 99"):
        load(path)


def test_load_refuses_a_directory_that_is_not_a_save(tmp_path):
    with pytest.raises(CstarError, match="not a cstar model directory"):
        load(tmp_path)


class _Trap:
    """Unpickling this creates a marker directory: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_refuses_a_pickle_without_unpickling_it(tmp_path):
    marker = tmp_path / "unpickled"
    (tmp_path / "model.pt").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(CstarError, match="pickled code"):  # load reads checkpoints too, with weights_only
        load(tmp_path / "model.pt")
    assert not marker.exists()


def test_load_reads_the_model_pt_that_cstar_train_writes(tmp_path):
    from cstar.models import create

    torch.manual_seed(0)
    model = create("small_cnn", 10, in_channels=1, input_size=8).eval()
    torch.save({"model": model.state_dict(), "model_config": model.cstar_config, "dataset": "digits"},
               tmp_path / "model.pt")
    again = load(tmp_path / "model.pt")
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(again(x), model(x)) and again.cstar_config == model.cstar_config


def test_load_builds_a_factorys_checkpoint_only_into_the_instance_given(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    config = {"name": "mymod:net", "num_classes": 10, "in_channels": 1, "input_size": 8, "mean": [0.5], "std": [0.5]}
    torch.save({"model": net.state_dict(), "model_config": config}, tmp_path / "model.pt")
    with pytest.raises(CstarError, match="model="):
        load(tmp_path / "model.pt")
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert torch.equal(load(tmp_path / "model.pt", model=fresh)[1].weight, net[1].weight)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_export_torchscript_reloads_and_matches(tmp_path):
    model = factorised_resnet20(factorised_fc=True)
    path = export(model, tmp_path / "m.pt", format="torchscript")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(path))(x), model(x), atol=1e-5)


def test_export_onnx_runs_in_onnxruntime_with_any_batch_size(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cstar[export]')")
    model = factorised_resnet20(factorised_fc=True)
    path = export(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 32, 32)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(got), model(x), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("fold_bn, bn_calls", [(True, 0), (False, 21)])
def test_export_folds_batchnorm_unless_asked_not_to(tmp_path, fold_bn, bn_calls):
    model = randomise_bn(factorised_resnet20())
    loaded = torch.jit.load(str(export(model, tmp_path / "m.pt", format="torchscript", fold_bn=fold_bn)))
    calls = [node.kind() for node in loaded.inlined_graph.nodes()]
    assert calls.count("aten::batch_norm") == bn_calls
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-4, rtol=0)


def test_export_of_a_model_without_config_needs_input_shape(tmp_path):
    with pytest.raises(CstarError, match="input_shape"):
        export(_sequential(), tmp_path / "m.pt", format="torchscript")
    assert export(_sequential(), tmp_path / "m.pt", format="torchscript", input_shape=(3, 16, 16)).is_file()


def test_export_onnx_without_the_onnx_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(CstarError, match=r"pip install 'cstar\[export\]'"):
        export(create("resnet20"), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
