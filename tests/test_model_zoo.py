"""The layers of modern CNNs and ViTs (issue "Any model in, any model out"), on the architectures of tests/archs.py.

For each architecture, written as torchvision and timm write theirs: the rank
plan meets its ratio; at full rank the factorised model computes the dense
one; a save reloads on a fresh instance with identical outputs; the ONNX export
runs in onnxruntime with the same outputs; ``cstar compress --model
tests.archs:<factory>`` runs end to end on real (8x8 digits) data and its model
reloads through ``cstar eval --model``; channel pruning works or refuses in one line.
"""

import copy
import json

import pytest
import torch
from torch import nn

from cstar import CstarError
from cstar.cli import main
from cstar.lowrank import LowRankLinear, Tucker2Conv2d, decompose, select_ranks
from cstar.models import create
from cstar.prune import magnitude_prune
from cstar import export
from cstar.files.serialize import load, save

from archs import FACTORIES

SHAPE = (1, 8, 8)
X = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def built(name: str) -> nn.Module:
    """The factory's network behind cstar's Normalize front, as ``--model tests.archs:<name>`` builds it,
    with BatchNorm statistics that are not the identity (so a wrongly restored buffer shows)."""
    torch.manual_seed(0)
    model = create(f"tests.archs:{name}", 10, in_channels=1, input_size=8, mean=[0.5], std=[0.25])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def full_rank(plan):
    plan = copy.deepcopy(plan)
    for layer in plan.layers.values():
        if layer.kind == "tucker2":
            layer.ranks = tuple(layer.shape[:2])
        elif layer.kind == "svd":
            layer.ranks = (min(layer.shape[:2]),)
    return plan


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_plan_meets_its_ratio_within_two_percent(name):
    plan = select_ranks(built(name), 2, input_shape=SHAPE)
    assert 2 <= plan.achieved_ratio <= 2.04
    assert any(layer.kind != "dense" for layer in plan.layers.values())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_at_full_rank_the_factorised_model_computes_the_dense_one(name):
    dense = built(name)
    factorised = decompose(dense, full_rank(select_ranks(dense, 2, input_shape=SHAPE))).eval()
    assert any(isinstance(m, (Tucker2Conv2d, LowRankLinear)) for m in factorised.modules())
    with torch.no_grad():
        torch.testing.assert_close(factorised(X), dense(X), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_compressed_model_reloads_on_a_fresh_instance_with_identical_outputs(name, tmp_path):
    dense = built(name)
    small = decompose(dense, select_ranks(dense, 2, input_shape=SHAPE)).eval()
    save(small, tmp_path / "m")
    loaded = load(tmp_path / "m", model=built(name))
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    with torch.no_grad():
        assert torch.equal(loaded(X), small(X))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_onnx_export_of_a_compressed_model_matches_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cstar[export]')")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'cstar[export]')")
    dense = built(name)
    small = decompose(dense, select_ranks(dense, 2, input_shape=SHAPE)).eval()
    path = export(small, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": X.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), small(X), atol=1e-4, rtol=1e-4)


PRUNABLE = {"basic_resnet", "bottleneck_resnet", "mobilenet_v3"}


@pytest.mark.parametrize("name", sorted(PRUNABLE))
def test_channel_pruning_shrinks_the_cnns_and_keeps_them_running(name, tmp_path):
    dense = built(name)
    pruned = magnitude_prune(dense, 2, input_shape=SHAPE).eval()
    assert sum(p.numel() for p in pruned.parameters()) < 0.6 * sum(p.numel() for p in dense.parameters())
    save(pruned, tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "p", model=built(name))(X), pruned(X))


@pytest.mark.parametrize("name", sorted(set(FACTORIES) - PRUNABLE))
def test_channel_pruning_where_it_is_not_defined_refuses_in_one_line(name):
    with pytest.raises(CstarError) as error:
        magnitude_prune(built(name), 2, input_shape=SHAPE)
    assert "\n" not in str(error.value)


PHASE = "{epochs: 1, optimizer: adam, lr: 0.001, attack_steps: 1, batch_size: 64, check_size: 0}"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_cli_compress_runs_a_factory_model_end_to_end_and_eval_reloads_it(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compress", "--model", f"tests.archs:{name}", "--data", "digits", "--ratio", "2", "--out", str(out),
                 "--dense", PHASE, "--search", PHASE, "--finetune", PHASE, "--admm", "{interval: 5}",
                 "--val-size", "100", "--eval-n", "64", "--eval-attacks", "clean", "--eval-phases", "final",
                 "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["params"]["ratio"] >= 2
    capsys.readouterr()
    assert main(["eval", str(out / "model"), "--model", f"tests.archs:{name}", "--n", "64",
                 "--attacks", "clean", "--json", str(tmp_path / "eval.json")]) == 0
    card = json.loads((tmp_path / "eval.json").read_text())
    assert card["clean_acc"] == pytest.approx(100 * results["accuracy"]["final"]["clean"], abs=0.01)  # the card rounds to 2 decimals


def test_a_factory_named_in_a_save_is_not_imported_unless_the_user_names_it(tmp_path, capsys):
    save(decompose(built("vit"), select_ranks(built("vit"), 2, input_shape=SHAPE)), tmp_path / "m")
    assert main(["eval", str(tmp_path / "m"), "--data", "digits"]) == 2
    assert "pass --model tests.archs:vit" in capsys.readouterr().err


@pytest.mark.parametrize("name, problem", [
    ("tests.no_such_module:f", "no module named 'tests.no_such_module'"),
    ("tests.archs:no_such", "has no 'no_such'"),
    ("tests.archs:FACTORIES", "not callable"),
    ("tests.archs:Attention", "does not take these arguments"),
])
def test_a_bad_factory_is_named_in_one_line_before_any_work(name, problem, tmp_path, capsys):
    assert main(["train", "--model", name, "--data", "digits", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_factory_predicting_the_wrong_number_of_classes_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "tests.archs:imagenet_vit", "--data", "digits", "--out", str(tmp_path / "run")]) == 2
    assert "returns (1, 1000) for one image, not (1, 10) logits" in capsys.readouterr().err


def test_a_model_arg_contradicting_the_datas_classes_is_refused(tmp_path, capsys):
    assert main(["train", "--model", "tests.archs:vit", "--model-arg", "num_classes=3", "--data", "digits",
                 "--out", str(tmp_path / "run")]) == 2
    assert "--model-arg num_classes=3 contradicts the 10 classes of digits" in capsys.readouterr().err


def test_loading_a_factory_models_save_in_python_without_model_names_the_factory(tmp_path):
    save(built("convnext"), tmp_path / "m")
    with pytest.raises(CstarError, match=r"factory 'tests.archs:convnext'.*model=cstar.models.create"):
        load(tmp_path / "m")


@pytest.mark.parametrize("hub", ["torchvision", "timm"])
def test_a_hub_that_does_not_import_here_is_named_with_its_extra(hub, capsys):
    try:
        __import__(hub)
    except Exception:  # noqa: BLE001 - not installed, or does not import beside this torch (as on the CI machine)
        pass
    else:
        pytest.skip(f"{hub} imports here")
    assert main(["info", "--model", f"{hub}:resnet18", "--data", "cifar10"]) == 2
    assert f"pip install 'cstar[{hub}]'" in capsys.readouterr().err
