"""Hostile files: crafted saves, checkpoints and run records, through every reader (docs/SECURITY.md).

Each crafted file carries what an attacker would put there: a factory name
that would run a shell command or import a module planted in the working
directory (both write the marker of :mod:`hostile`), sizes that would
allocate terabytes, malformed types, nesting that would exhaust the stack,
NaN weights. Every reader must refuse it in one line, run nothing and write
nothing.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

import cstar
from cstar import models
from hostile import assert_no_marker, marker_code, marker_command, refused_api, refused_cli

PLANTED = "planted_factory"  # a module an attacker left in the working directory


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A working directory holding a planted module whose import writes the marker."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / f"{PLANTED}.py").write_text(marker_code(tmp_path) + "def make(**kw):\n    return None\n")
    return tmp_path


def _digits_model():
    torch.manual_seed(0)
    return models.create("small_cnn", 10, in_channels=1, input_size=8)


# ----------------------------------------------------------------------------- crafted saves (model.json)


def _rewrite(save: Path, edit) -> None:
    record = json.loads((save / "model.json").read_text())
    edit(record, save)
    (save / "model.json").write_text(json.dumps(record))


def _rehash(save: Path, tensors: dict) -> None:
    """Replace the weights and their checksum, as an attacker who controls both files would."""
    data = safetensors.torch.save(tensors)
    (save / "model.safetensors").write_bytes(data)
    _rewrite(save, lambda r, s: r["weights"].update(sha256=hashlib.sha256(data).hexdigest()))


def _builtin_name(name, **options):
    return lambda r, s: r["architecture"]["config"].update(name=name, **options)


def _nested(depth):
    def edit(record, save):
        text = "[" * depth + "]" * depth
        (save / "model.json").write_text(json.dumps(record)[:-1] + f', "deep": {text}}}')
        raise _Written
    return edit


class _Written(Exception):
    """The edit wrote model.json itself."""


def _edit(save: Path, edit) -> None:
    try:
        _rewrite(save, edit)
    except _Written:
        pass


def _deep_tree(record, save):
    spec = {"class": "Identity", "args": {}}
    for _ in range(200):
        spec = {"class": "Sequential", "args": {}, "children": [["0", spec]]}
    record["architecture"] = {"kind": "tree", "root": spec}


def _huge_conv(record, save):
    record["architecture"] = {"kind": "tree", "root": {"class": "Conv2d", "args": {
        "in_channels": 10**6, "out_channels": 10**6, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
        "dilation": [1, 1], "groups": 1, "padding_mode": "zeros", "bias": True}}}


def _nan_weights(save: Path) -> None:
    tensors = safetensors.torch.load((save / "model.safetensors").read_bytes())
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    _rehash(save, tensors)


def _huge_classes_with_matching_weights(save: Path) -> None:
    _rewrite(save, _builtin_name("small_cnn", num_classes=10**9))


SAVES = {
    # (what the attacker writes, the words of the refusal)
    "factory-runs-shell": (lambda s, t: _edit(s, _builtin_name("subprocess:getoutput", cmd=marker_command(t))),
                           ["not a registered model"]),
    "factory-os-system": (lambda s, t: _edit(s, _builtin_name("os:system", command=marker_command(t))),
                          ["not a registered model"]),
    "planted-module-in-cwd": (lambda s, t: _edit(s, _builtin_name(f"{PLANTED}:make")), ["not a registered model"]),
    "name-is-a-list": (lambda s, t: _edit(s, _builtin_name(["small_cnn"])), ["not a text"]),
    "config-is-a-string": (lambda s, t: _edit(s, lambda r, _: r["architecture"].update(config="small_cnn")),
                           ["not a mapping"]),
    "num-classes-1e9": (lambda s, t: _huge_classes_with_matching_weights(s), ["num_classes", "1,000,000"]),
    "num-classes-bool": (lambda s, t: _edit(s, _builtin_name("small_cnn", num_classes=True)), ["num_classes"]),
    "unknown-option": (lambda s, t: _edit(s, _builtin_name("small_cnn", exec="print(1)")), ["unknown option"]),
    "replay-class-a-list": (lambda s, t: _edit(s, lambda r, _: r.update(architecture={
        "kind": "replay", "class": ["x"], "layers": {}})), ["malformed"]),
    "replay-factory-not-named": (lambda s, t: _edit(s, lambda r, _: (r.update(architecture={
        "kind": "replay", "class": "x.Net", "layers": {}}), r["attributes"]["cstar_config"].update(
        name=f"{PLANTED}:make"))), [f"--model {PLANTED}:make"]),
    "json-nested-100k": (lambda s, t: _edit(s, _nested(100_000)), ["nested too deeply"]),
    "sequential-nested-200": (lambda s, t: _edit(s, _deep_tree), ["nested more than"]),
    "conv-of-1e12-weights": (lambda s, t: _edit(s, _huge_conv), ["does not fit"]),
    "unknown-class": (lambda s, t: _edit(s, lambda r, _: r.update(architecture={
        "kind": "tree", "root": {"class": "os.system", "args": {}}})), ["unknown class"]),
    "unknown-kind": (lambda s, t: _edit(s, lambda r, _: r["architecture"].update(kind="pickle")),
                     ["unknown architecture kind"]),
    "replacements-a-list": (lambda s, t: _edit(s, lambda r, _: r["architecture"].update(replacements=[1])),
                            ["replacements"]),
    "tied-to-a-number": (lambda s, t: _edit(s, lambda r, _: r.update(tied={"a": 1})), ["tied"]),
    "no-checksum": (lambda s, t: _edit(s, lambda r, _: r.update(weights={})), ["SHA-256"]),
    "weights-tampered": (lambda s, t: (s / "model.safetensors").write_bytes(
        (s / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0"), ["checksum"]),
    "nan-weights": (lambda s, t: _nan_weights(s), ["NaN or Inf"]),
    "config-attribute-a-string": (lambda s, t: _edit(s, lambda r, _: r["attributes"].update(cstar_config="x")),
                                  ["cstar_config"]),
    "lowrank-attribute-malformed": (lambda s, t: _edit(s, lambda r, _: r["attributes"].update(
        cstar_lowrank={"conv": {"kind": "tucker2", "ranks": "abc"}})), ["cstar_lowrank"]),
    "format-version-2": (lambda s, t: _edit(s, lambda r, _: r.update(version=2)), ["format version"]),
    "trained-on-attribute-a-string": (lambda s, t: _edit(s, lambda r, _: r["attributes"].update(
        cstar_trained_on="digits")), ["cstar_trained_on"]),
}

# Every reader of a model path; "{save}" is the crafted save, "{tmp}" the test's directory.
READERS = {
    "info": ["info", "{save}"],
    "eval": ["eval", "{save}", "--data", "digits", "--n", "10"],
    "ranks": ["ranks", "{save}", "--ratio", "2"],
    "decompose": ["decompose", "{save}", "--ratio", "2", "--out", "{tmp}/out"],
    "export": ["export", "{save}", "--out", "{tmp}/out"],
    "compress": ["compress", "--checkpoint", "{save}", "--data", "digits", "--ratio", "2", "--out", "{tmp}/out"],
    "compare": ["compare", "--checkpoint", "{save}", "--data", "digits", "--ratios", "2", "--methods",
                "lowrank_global", "--out", "{tmp}/out"],
}
# every crafted save through cstar.load and cstar eval; the code-running ones through every reader
SAVE_CASES = [(s, r) for s in SAVES for r in ("api", "eval")] + [
    (s, r) for s in ("factory-runs-shell", "planted-module-in-cwd", "num-classes-1e9", "nan-weights",
                     "json-nested-100k") for r in READERS if r != "eval"]


@pytest.mark.parametrize("crafted, reader", SAVE_CASES, ids=[f"{s}-{r}" for s, r in SAVE_CASES])
def test_a_crafted_save_is_refused(capsys, home, crafted, reader):
    save = cstar.save(_digits_model(), home / "save")
    craft, words = SAVES[crafted]
    craft(save, home)
    if reader == "api":
        refused_api(lambda: cstar.load(save), words, tmp=home)
    else:
        argv = [a.replace("{save}", str(save)).replace("{tmp}", str(home)) for a in READERS[reader]]
        refused_cli(capsys, argv, words, tmp=home, left=[home / "out"])
    assert_no_marker(home)


def test_a_model_json_larger_than_any_model_needs_is_refused_unread(home, monkeypatch):
    from cstar.files import serialize

    save = cstar.save(_digits_model(), home / "save")
    monkeypatch.setattr(serialize, "MAX_RECORD_BYTES", 100)
    refused_api(lambda: cstar.load(save), ["bytes, more than"], tmp=home)


def test_a_crafted_size_is_refused_before_memory_is_taken(home):
    """A conv of 9e12 weights described in model.json: refused from a meta-device build, nothing allocated."""
    save = cstar.save(_digits_model(), home / "save")
    _edit(save, _huge_conv)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused_api(lambda: cstar.load(save), ["does not fit"])
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below 36 TB


# ----------------------------------------------------------------------------- crafted checkpoints (.pt)


class _Shell:
    """A pickle that runs a shell command when unpickled (what weights_only=True refuses)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


def _checkpoint(path: Path, **changes) -> Path:
    model = _digits_model()
    state = {"model": model.state_dict(), "model_config": model.cstar_config, "dataset": "digits", "eps": 0.2}
    state.update(changes)
    torch.save(state, path)
    return path


def _config(**changes):
    return {**_digits_model().cstar_config, **changes}


def _nan_state():
    state = _digits_model().state_dict()
    first = next(k for k, v in state.items() if v.is_floating_point())
    state[first] = torch.full_like(state[first], float("inf"))
    return state


CHECKPOINTS = {
    "pickle-runs-shell": (lambda p, t: p.write_bytes(pickle.dumps({"model": _Shell(marker_command(t))})),
                          ["pickled code"]),
    "factory-runs-shell": (lambda p, t: _checkpoint(p, model_config=_config(
        name="subprocess:getoutput", cmd=marker_command(t))), ["--model subprocess:getoutput"]),
    "planted-module-in-cwd": (lambda p, t: _checkpoint(p, model_config=_config(name=f"{PLANTED}:make")),
                              [f"--model {PLANTED}:make"]),
    "config-a-string": (lambda p, t: _checkpoint(p, model_config="small_cnn"), ["not a mapping"]),
    "name-a-list": (lambda p, t: _checkpoint(p, model_config=_config(name=["small_cnn"])), ["not a text"]),
    "num-classes-1e9": (lambda p, t: _checkpoint(p, model_config=_config(num_classes=10**9)), ["num_classes"]),
    "input-size-negative": (lambda p, t: _checkpoint(p, model_config=_config(input_size=-8)), ["input_size"]),
    "model-a-list": (lambda p, t: _checkpoint(p, model=[1, 2]), ["not a mapping of tensor names"]),
    "wrong-shapes": (lambda p, t: _checkpoint(p, model_config=_config(num_classes=5)), ["does not match"]),
    "inf-weights": (lambda p, t: _checkpoint(p, model=_nan_state()), ["NaN or Inf"]),
    "no-model-entry": (lambda p, t: torch.save({"weights": 1}, p), ["without cstar's model description", "--model"]),
    "not-a-dict": (lambda p, t: torch.save([1, 2], p), ["without cstar's model description", "--model"]),
    "empty-file": (lambda p, t: p.write_bytes(b""), ["empty"]),
    "text-file": (lambda p, t: p.write_text("import os\n"), ["not a PyTorch file"]),
}
CKPT_READERS = {k: v for k, v in READERS.items() if k != "compare"}
CKPT_READERS["compare"] = READERS["compare"]
CHECKPOINT_CASES = [(c, r) for c in CHECKPOINTS for r in ("eval", "compress")] + [
    (c, r) for c in ("pickle-runs-shell", "factory-runs-shell", "planted-module-in-cwd", "num-classes-1e9")
    for r in CKPT_READERS if r not in ("eval", "compress")]


@pytest.mark.parametrize("crafted, reader", CHECKPOINT_CASES, ids=[f"{c}-{r}" for c, r in CHECKPOINT_CASES])
def test_a_crafted_checkpoint_is_refused(capsys, home, crafted, reader):
    path = home / "model.pt"
    craft, words = CHECKPOINTS[crafted]
    craft(path, home)
    argv = [a.replace("{save}", str(path)).replace("{tmp}", str(home)) for a in CKPT_READERS[reader]]
    refused_cli(capsys, argv, words, tmp=home, left=[home / "out"])


@pytest.mark.parametrize("eps, dataset, words", [
    ("abc", "digits", ["eps"]), (5.0, "digits", ["eps"]), (float("nan"), "digits", ["eps"]),
    (0.2, ["digits"], ["dataset"]), (0.2, "../../etc", ["dataset"]),
])
def test_a_checkpoints_crafted_threat_model_is_refused_by_eval(capsys, home, eps, dataset, words):
    path = _checkpoint(home / "model.pt", eps=eps, dataset=dataset)
    refused_cli(capsys, ["eval", path, "--n", "10"], words, tmp=home)


@pytest.mark.parametrize("eps, dataset, words", [
    ("abc", "digits", ["eps"]), (5.0, "digits", ["eps"]), (float("nan"), "digits", ["eps"]),
    (0.2, ["digits"], ["dataset"]), (0.2, "../../etc", ["dataset"]),
])
def test_a_saves_crafted_threat_model_is_refused_by_eval(capsys, home, eps, dataset, words):
    save = cstar.save(_digits_model(), home / "save")
    _edit(save, lambda r, _: r["attributes"].update(cstar_trained_on={"dataset": dataset, "eps": eps}))
    refused_cli(capsys, ["eval", save, "--n", "10"], words, tmp=home)


@pytest.mark.parametrize("record, words", [
    ("- 1\n- 2\n", ["not a mapping"]), ("data: [digits\n", ["not valid YAML"]),
])
def test_a_crafted_run_record_beside_a_checkpoint_is_refused_by_eval(capsys, home, record, words):
    path = _checkpoint(home / "model.pt")
    (home / "config.yaml").write_text(record)
    refused_cli(capsys, ["eval", path, "--data", "digits", "--n", "10"], words, tmp=home)


# ----------------------------------------------------------------------------- crafted run records (--resume)


@pytest.mark.parametrize("command", ["train", "compress"])
@pytest.mark.parametrize("factory", [f"{PLANTED}:make", "subprocess:getoutput"])
def test_a_run_record_naming_a_factory_is_not_imported_on_resume(capsys, home, command, factory):
    run = home / "run"
    run.mkdir()
    (run / "cstar-run.json").write_text(json.dumps({"command": command, "cstar": cstar.__version__}))
    (run / "config.yaml").write_text(f"model: {factory}\nmodel_arg: ['cmd={marker_command(home)}']\ndata: digits\n")
    argv = [command, "--resume", "--out", run]
    refused_cli(capsys, argv, [f"--model {factory}"], tmp=home)


def test_a_run_records_factory_is_built_when_the_user_names_it(capsys, home):
    """The same record resumes once the user names the factory: naming it is the user's decision."""
    (home / "resumenet.py").write_text("import torch.nn as nn\n"
                                   "def net(num_classes=10, in_channels=1):\n"
                                   "    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, num_classes))\n")
    run = home / "run"
    assert cstar.cli.main(["train", "--model", "resumenet:net", "--data", "digits", "--epochs", "1", "--attack", "clean",
                           "--eval-attacks", "clean", "--out", str(run)]) == 0
    refused_cli(capsys, ["train", "--resume", "--out", run], ["--model resumenet:net"], tmp=home)
    assert cstar.cli.main(["train", "--resume", "--out", str(run), "--model", "resumenet:net"]) == 0


def test_every_torch_load_in_the_project_refuses_pickled_code():
    """No reader in cstar/ or benchmarks/ calls torch.load without weights_only=True."""
    import ast

    root = Path(__file__).resolve().parents[1]
    unsafe = []
    for path in [*root.glob("cstar/**/*.py"), *root.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load" and \
                    getattr(node.func.value, "id", None) == "torch":
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                if flags.get("weights_only") is not True:
                    unsafe.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not unsafe, unsafe


def _nan_model():
    model = _digits_model()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    return model


@pytest.mark.parametrize("call", ["select_ranks", "decompose", "save-then-load"])
def test_a_model_with_nan_weights_is_refused_by_the_api(tmp_path, call):
    from cstar.lowrank import decompose, select_ranks

    model = _nan_model()
    calls = {"select_ranks": lambda: select_ranks(model, 2.0),
             "decompose": lambda: decompose(model, select_ranks(_digits_model(), 2.0)),
             "save-then-load": lambda: cstar.load(cstar.save(model, tmp_path / "save"))}
    refused_api(calls[call], ["NaN or Inf"])


@pytest.mark.parametrize("command", [["info"], ["eval", "--data", "digits"], ["ranks", "--ratio", "2"]])
def test_a_model_flag_contradicting_the_checkpoint_is_refused(capsys, home, command):
    path = _checkpoint(home / "model.pt")
    refused_cli(capsys, [command[0], path, "--model", "resnet18", *command[1:]], ["contradicts"], tmp=home)


def test_compressing_a_checkpoint_on_another_dataset_says_so(capsys, home):
    """The note cstar eval prints for a model evaluated on another dataset than its own, for compress too."""
    import argparse

    from cstar.cli import _inputs

    path = _checkpoint(home / "model.pt", dataset="fashion_mnist")

    args = argparse.Namespace(checkpoint=str(path), model=None, width=None, data="digits", command="compress")
    train_set = cstar.data.load("digits", split="train")
    _inputs.starting_model(args, train_set, torch.device("cpu"))
    out = capsys.readouterr().out
    assert "was trained on fashion_mnist" in out and "digits" in out, out


def test_a_crafted_data_root_in_the_run_record_beside_a_checkpoint_is_refused(capsys, home):
    path = _checkpoint(home / "model.pt")
    (home / "config.yaml").write_text("data: digits\nroot: [1, 2]\n")
    refused_cli(capsys, ["eval", path, "--n", "10"], ["data root", "--root"], tmp=home)


@pytest.mark.parametrize("how", ["parent-path", "absolute-path", "link-out-of-the-folder"])
def test_an_onnx_file_whose_weights_point_outside_its_folder_is_refused(capsys, tmp_path, how):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"S" * 64)
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"parent-path": "../secret.bin", "absolute-path": str(secret), "link-out-of-the-folder": "link.bin"}[how]
    if how == "link-out-of-the-folder":
        (folder / "link.bin").symlink_to(secret)
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[16, 10],
                              data_location=onnx.TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", "0"), ("length", "640")):
        weight.external_data.add(key=key, value=value)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["x"], ["f"]), onnx.helper.make_node("MatMul", ["f", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 1, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 10])], [weight])
    path = folder / "crafted.onnx"
    path.write_bytes(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
                     .SerializeToString())
    words = ["points at data outside the model's folder", "crafted"]
    refused_api(lambda: cstar.load_exported(path), words)
    refused_cli(capsys, ["eval", path, "--data", "digits", "--attacks", "clean"], words, tmp=tmp_path)
