"""INT8 models, evaluated honestly: cstar.export_int8 / cstar export --int8 (onnxruntime static QDQ, per-channel
weights, calibrated on training images), and cstar eval of an exported graph: clean, transfer attacks made on its
float model (--source), and the gradient-free Square attack run on the graph itself."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from digits_runs import ROOT, refused, run

import cstar
from cstar.files.quantize import calibration_images
from cstar.files.serialize import record_trained_on

onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'cstar[export]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'cstar[export]')")
CALIBRATION_N = 128


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """(save directory, model, train set, test set): a small_cnn trained 2 clean epochs on digits, recording it."""
    train, test = cstar.data.load("digits", split="train"), cstar.data.load("digits", split="test")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = cstar.models.create("small_cnn", 10, in_channels=1, input_size=8)
        optimizer = torch.optim.Adam(model.parameters(), 3e-3)
        x, y = train.images.float() / 255, train.labels
        for _ in range(2):
            for i in range(0, len(x), 64):
                loss = torch.nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    model.eval()
    record_trained_on(model, "digits", train.spec.eps)
    return cstar.save(model, tmp_path_factory.mktemp("int8") / "float"), model, train, test


@pytest.fixture(scope="module")
def int8(float_model):
    """(the INT8 file, export_int8's report)."""
    path, model, train, _ = float_model
    report = cstar.export_int8(model, path.parent / "model.int8.onnx", train, n=CALIBRATION_N)
    return report["path"], report


def session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def predictions(path, images: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session(path).run(None, {"input": images.numpy()})[0]).argmax(1)


def test_export_int8_reports_the_top1_agreement_it_measures(float_model, int8):
    _, model, train, _ = float_model
    path, report = int8
    images = calibration_images(train, CALIBRATION_N, seed=0)
    with torch.no_grad():
        agreement = (predictions(path, images) == model(images).argmax(1)).float().mean().item()
    assert report["top1_agreement"] == pytest.approx(agreement)
    assert agreement >= 0.9 and report["calibration_images"] == CALIBRATION_N


def test_the_int8_graph_agrees_with_the_float_model_on_test_images(float_model, int8):
    _, model, _, test = float_model
    images = test.images.float() / 255
    with torch.no_grad():
        reference = model(images).argmax(1)
    assert (predictions(int8[0], images) == reference).float().mean().item() >= 0.9
    assert reference.unique().numel() == 10  # a model that tells the classes apart: agreement means something


def test_the_int8_graph_has_qdq_nodes_and_symmetric_weights_scaled_per_output_channel(float_model, int8):
    graph = onnx.load(str(int8[0])).graph
    ops = [node.op_type for node in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    tensors = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    convs = {node.input[1] for node in graph.node if node.op_type == "Conv"}
    weights = [node for node in graph.node if node.op_type == "DequantizeLinear" and node.output[0] in convs]
    assert len(weights) == 2  # conv1 (32 channels) and conv2 (64)
    for node in weights:
        quantised, scale, zero = (tensors[name] for name in node.input)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        assert quantised.dtype == np.int8 and axis == 0
        assert scale.shape == (quantised.shape[0],) and len(np.unique(scale)) > 1
        assert not zero.any()  # symmetric: every zero point 0


def test_calibration_images_are_the_first_n_of_a_seeded_shuffle(float_model):
    train = float_model[2]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:5]
    assert torch.equal(calibration_images(train, 5, seed=3), train.images[order].float() / 255)
    assert len(calibration_images(train.take(7), 256)) == 7  # fewer images than n: all of them


def test_cli_export_int8_calibrates_on_the_dataset_the_model_records(capsys, float_model, tmp_path):
    out = tmp_path / "m.int8.onnx"
    code, printed, _ = run(capsys, "export", float_model[0], "--out", out, "--int8", "--calibration-n", "64")
    assert code == 0 and "calibrated on 64 digits training images (seed 0)" in printed
    assert "QuantizeLinear" in {node.op_type for node in onnx.load(str(out)).graph.node}


@pytest.fixture(scope="module")
def card(float_model, int8, tmp_path_factory):
    """The --json card of cstar eval of the INT8 graph: clean, transfer PGD-5 from the float model (and square10
    where pyautoattack is installed), on the first 64 test images."""
    attacks = "clean,pgd5" + (",square10" if importlib.util.find_spec("pyautoattack") else "")
    out = tmp_path_factory.mktemp("card") / "card.json"
    from cstar.cli import main

    assert main(["eval", str(int8[0]), "--source", str(float_model[0]), "--attacks", attacks, "--n", "64",
                 "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cli_transfer_pgd_equals_pgd_on_the_float_model_classified_by_onnxruntime(float_model, int8, card):
    _, model, _, test = float_model
    x, y, eps = test.images[:64].float() / 255, test.labels[:64], test.spec.eps
    with torch.random.fork_rng():
        torch.manual_seed(0)  # evaluate seeds batch 0's attacks with seed + 0
        x_adv = cstar.attacks.pgd(model, x, y, eps, max(eps / 4, 2.5 * eps / 5), 5)
    accuracy = (predictions(int8[0], x_adv) == y).float().mean().item()
    assert card["transfer-pgd5_acc"] == round(100 * accuracy, 2)
    assert card["transfer-pgd5_acc"] < card["clean_acc"]


def test_the_card_says_which_model_made_each_attack(float_model, card):
    assert card["source"] == str(float_model[0]) and card["runtime"].startswith("onnxruntime")
    assert card["attacks"]["transfer-pgd5"]["made_on"] == "source" and card["attacks"]["transfer-pgd5"]["steps"] == 5
    if "square10" in card["attacks"]:
        assert card["attacks"]["square10"]["queries"] == 10 and "made_on" not in card["attacks"]["square10"]


def test_square_attacks_the_exported_graph_itself_within_eps(float_model, int8):
    pytest.importorskip("pyautoattack", reason="pyautoattack is not installed (pip install 'cstar[autoattack]')")
    test = float_model[3]
    x, y, eps = test.images[:32].float() / 255, test.labels[:32], test.spec.eps
    graph = cstar.load_exported(int8[0], threads=1)
    x_adv = cstar.attacks.square(graph, x, y, eps, queries=30)
    assert (x_adv - x).abs().max().item() <= eps + 1e-6 and 0 <= x_adv.min() and x_adv.max() <= 1
    clean, attacked = (predictions(int8[0], x) == y), (predictions(int8[0], x_adv) == y)
    assert (clean & ~attacked).any() and not (attacked & ~clean).any()  # it fools some; never rights a wrong one


@pytest.mark.parametrize("case", ["int8-with-torchscript", "calibration-n-zero", "runtime-without-int8",
                                  "openvino-needs-xml", "int8-without-a-dataset"])
def test_cli_export_int8_refusals_are_one_line_before_any_file(case, capsys, float_model, tmp_path):
    model, out = float_model[0], tmp_path / "m.int8.onnx"
    if case == "int8-without-a-dataset":
        model = cstar.save(cstar.models.create("small_cnn", 10, in_channels=1, input_size=8), tmp_path / "plain")
    argv, message = {
        "int8-with-torchscript": (["--int8", "--format", "torchscript"], "--int8 writes ONNX"),
        "calibration-n-zero": (["--int8", "--calibration-n", "0"], "--calibration-n"),
        "runtime-without-int8": (["--runtime", "onnxruntime"], "add --int8"),
        "openvino-needs-xml": (["--int8", "--runtime", "openvino"], "name the file m.int8.xml"),
        "int8-without-a-dataset": (["--int8"], "pass --data"),
    }[case]
    line = refused(capsys, "export", model, "--out", out, *argv)
    assert message in line and not out.exists()


@pytest.mark.parametrize("case", ["pgd-without-source", "no-dataset", "source-beside-a-cstar-model",
                                  "model-flag-without-source", "square-without-pyautoattack"])
def test_cli_eval_of_an_exported_graph_refusals_are_one_line_before_any_file(case, capsys, float_model, int8,
                                                                              tmp_path, monkeypatch):
    graph, card = int8[0], tmp_path / "card.json"
    argv, message = {
        "pgd-without-source": ([graph, "--attacks", "clean,pgd5", "--data", "digits"], "pass --source FLOAT_MODEL"),
        "no-dataset": ([graph, "--attacks", "clean"], "pass --data"),
        "source-beside-a-cstar-model": ([float_model[0], "--source", float_model[0]], "drop --source"),
        "model-flag-without-source": ([graph, "--attacks", "clean", "--data", "digits", "--model", "small_cnn"],
                                      "--model describes a float model"),
        "square-without-pyautoattack": ([graph, "--attacks", "clean,square", "--data", "digits"],
                                        "cstar[autoattack]"),
    }[case]
    if case == "square-without-pyautoattack":
        monkeypatch.setitem(sys.modules, "pyautoattack", None)  # import pyautoattack now fails
    line = refused(capsys, "eval", *argv, "--json", card)
    assert message in line and not card.exists()


def test_export_int8_refuses_bad_arguments_before_writing(float_model, tmp_path):
    _, model, train, _ = float_model
    for kwargs, message in [({"n": 0}, "whole number >= 1"), ({"runtime": "tensorrt"}, "unknown INT8 runtime"),
                            ({"calibration": train.images[:4, :, :4]}, r"the model takes \(1, 8, 8\)")]:
        arguments = {"calibration": train, **kwargs}
        with pytest.raises(cstar.CstarError, match=message):
            cstar.export_int8(model, tmp_path / "m.onnx", arguments.pop("calibration"), **arguments)
    assert list(tmp_path.iterdir()) == []


def test_evaluate_refuses_a_gradient_attack_on_a_graph_without_gradients(float_model, int8):
    test = float_model[3]
    graph = cstar.load_exported(int8[0])
    with pytest.raises(cstar.CstarError, match="pgd5 needs the model's gradients.*source="):
        cstar.evaluate(graph, test, ["clean", "pgd5"], eps=test.spec.eps, n=8)


@pytest.mark.slow  # about 8 s: a fresh process imports torch, OpenVINO and NNCF
@pytest.mark.skipif(any(importlib.util.find_spec(p) is None for p in ("openvino", "nncf")),
                    reason="openvino and nncf are not installed (pip install 'cstar[openvino-int8]')")
def test_cli_export_int8_for_openvino_writes_an_ir_that_cstar_eval_runs(float_model, tmp_path):
    # OpenVINO runs in a process of its own: in pytest's, its thread pool crashes later tests' forked loader workers
    out, card = tmp_path / "m.int8.xml", tmp_path / "card.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = "import sys; from cstar.cli import main; i = sys.argv.index('THEN'); " \
             "sys.exit(main(sys.argv[1:i]) or main(sys.argv[i + 1:]))"
    argv = ["export", str(float_model[0]), "--out", str(out), "--int8", "--runtime", "openvino", "--calibration-n",
            "32", "THEN", "eval", str(out), "--attacks", "clean", "--n", "64", "--data", "digits", "--json", str(card)]
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert out.with_suffix(".bin").is_file() and "calibrated on 32 digits training images" in proc.stdout
    result = json.loads(card.read_text())
    _, model, _, test = float_model
    with torch.no_grad():
        float_clean = (model(test.images[:64].float() / 255).argmax(1) == test.labels[:64]).float().mean().item()
    assert result["runtime"].startswith("openvino") and abs(result["clean_acc"] - 100 * float_clean) <= 5


def test_eval_of_square_on_a_graph_notes_that_it_can_overstate(float_model, int8, capsys):
    pytest.importorskip("pyautoattack", reason="pyautoattack is not installed (pip install 'cstar[autoattack]')")
    from cstar.cli import main

    capsys.readouterr()
    assert main(["eval", str(int8[0]), "--source", str(float_model[0]), "--attacks", "clean,square5", "--n", "8"]) == 0
    out = capsys.readouterr().out
    assert "note: Square on an exported graph" in out and "worst figure over attacks" in out
    assert main(["eval", str(int8[0]), "--source", str(float_model[0]), "--attacks", "clean", "--n", "8"]) == 0
    assert "note: Square" not in capsys.readouterr().out
