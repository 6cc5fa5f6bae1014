"""A model trained elsewhere: the user's class, a weights file in whatever form their script wrote it."""

from __future__ import annotations

import argparse
import json

import pytest
import safetensors.torch
import torch
import torch.nn as nn

import cstar
from cstar.cli import _inputs, main
from hostile import refused_api, refused_cli

NET = '''
import torch, torch.nn as nn


class Net(nn.Module):
    """A user's CNN: no normalisation of its own, inputs in [0, 1], a shortcut built with torch.cat."""

    def __init__(self, num_classes=10, in_channels=1, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(3 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, num_classes)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.bn(self.conv2(a)))
        c = torch.relu(self.conv3(torch.cat([a, b], 1)))
        return self.fc(nn.functional.max_pool2d(c, 2).flatten(1))
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(directory holding mynet.py, the trained Net's state dict, its clean accuracy on digits' test set)."""
    home = tmp_path_factory.mktemp("own")
    (home / "mynet.py").write_text(NET)
    namespace: dict = {}
    exec(compile(NET, "mynet.py", "exec"), namespace)
    torch.manual_seed(0)
    net = namespace["Net"]()
    train, test = cstar.data.load("digits", split="train"), cstar.data.load("digits", split="test")
    x, y = train.images / 255, train.labels
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(15):
        for i in range(0, len(x), 64):
            loss = nn.functional.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(test.images / 255).argmax(1) == test.labels).float().mean().item()
    assert accuracy > 0.8  # the user's model works before cstar sees it
    return home, net.state_dict(), accuracy


def _cuda_saved(state, path, monkeypatch):
    """torch.save as on a GPU machine: every storage tagged 'cuda:0' (loading it without map_location fails)."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)


def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


FORMATS = {
    "plain.pt": lambda s, p, mp: torch.save(s, p),
    "state_dict.pth": lambda s, p, mp: torch.save({"state_dict": s, "epoch": 15, "best_acc": 0.9}, p),
    "model.pth": lambda s, p, mp: torch.save({"model": s}, p),
    "model_state_dict.pth": lambda s, p, mp: torch.save({"model_state_dict": s, "optimizer_state_dict": {}}, p),
    "net.pth": lambda s, p, mp: torch.save({"net": s}, p),
    "two-levels.pth": lambda s, p, mp: torch.save({"model": {"state_dict": s, "step": 3}}, p),
    "ema.pth": lambda s, p, mp: torch.save({"ema": s, "state_dict": _prefixed(s, "x.")}, p),
    "ddp.pt": lambda s, p, mp: torch.save(_prefixed(s, "module."), p),
    "compiled.pt": lambda s, p, mp: torch.save(_prefixed(s, "_orig_mod."), p),
    "robustbench.pt": lambda s, p, mp: torch.save({"state_dict": _prefixed(s, "module.model.")}, p),
    "weights.safetensors": lambda s, p, mp: safetensors.torch.save_file({k: v.contiguous() for k, v in s.items()}, p),
    "cuda.pt": lambda s, p, mp: _cuda_saved({"state_dict": s}, p, mp),
    "no-bn-counter.pt": lambda s, p, mp: torch.save({k: v for k, v in s.items() if "num_batches" not in k}, p),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_weights_format_evaluates_as_the_model_did(capsys, monkeypatch, trained, name):
    home, state, accuracy = trained
    monkeypatch.chdir(home)
    FORMATS[name](state, home / name, monkeypatch)
    assert main(["eval", name, "--model", "mynet:Net", "--data", "digits", "--attacks", "clean",
                 "--json", f"{name}.json"]) == 0
    result = json.loads((home / f"{name}.json").read_text())
    assert abs(result["clean_acc"] / 100 - accuracy) < 1e-4  # the card rounds to 0.01 point; one image is 0.28
    assert "normalisation: none" in capsys.readouterr().out


@pytest.mark.parametrize("name", FORMATS)
def test_each_weights_format_is_the_starting_model_of_compress_and_compare(monkeypatch, trained, name):
    """compress and compare start from --checkpoint through inputs.starting_model: the same weights, exactly."""
    home, state, _ = trained
    monkeypatch.chdir(home)
    FORMATS[name](state, home / name, monkeypatch)
    args = argparse.Namespace(checkpoint=name, model="mynet:Net", model_arg=[], width=None, normalize=None,
                              data="digits", command="compress")
    model = _inputs.starting_model(args, cstar.data.load("digits", split="train"), torch.device("cpu"))
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in state.items() if "num_batches" not in k)
    assert model.cstar_config["mean"] == [0.0] and model.cstar_config["std"] == [1.0]


def test_a_user_model_compresses_and_its_report_states_the_normalisation(capsys, monkeypatch, trained):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save({"state_dict": state}, home / "their.pth")
    assert main(["compress", "--model", "mynet:Net", "--checkpoint", "their.pth", "--normalize", "none",
                 "--data", "digits", "--ratio", "2", "--search", "{epochs: 1, lr: 0.01}",
                 "--finetune", "{epochs: 1, lr: 0.001}",
                 "--eval-attacks", "clean,pgd5", "--out", "run"]) == 0
    report = (home / "run" / "report.md").read_text()
    assert "input normalisation: none (inputs in [0, 1])" in report
    assert "normalize: none" in (home / "run" / "config.yaml").read_text()
    final = json.loads((home / "run" / "results.json").read_text())["accuracy"]["final"]
    assert main(["eval", "run/model", "--model", "mynet:Net", "--data", "digits", "--attacks", "clean,pgd5",
                 "--json", "final.json"]) == 0
    again = json.loads((home / "final.json").read_text())
    assert again["clean_acc"] / 100 == pytest.approx(final["clean"], abs=1e-4)
    assert again["pgd5_acc"] / 100 == pytest.approx(final["pgd5"], abs=0.003)  # one image: the attack's random start
    saved = json.loads((home / "run" / "model" / "model.json").read_text())["attributes"]
    assert saved["cstar_normalize"] == "none (inputs in [0, 1])"


def test_a_user_model_is_compared_against_pruning(monkeypatch, trained):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save(state, home / "their.pt")
    assert main(["compare", "--model", "mynet:Net", "--checkpoint", "their.pt", "--data", "digits",
                 "--ratios", "2", "--methods", "dense,magnitude,lowrank_global", "--search", "{epochs: 1}",
                 "--finetune", "{epochs: 1}", "--eval-attacks", "clean", "--latency-runs", "1", "--out", "cmp"]) == 0
    results = json.loads((home / "cmp" / "results.json").read_text())
    assert set(results["cells"]) == {"dense", "magnitude-2x", "lowrank_global-2x"}
    assert "normalize: none" in (home / "cmp" / "config.yaml").read_text()  # the default chosen, recorded


def test_normalize_data_puts_the_datasets_front_and_says_so(capsys, monkeypatch, trained):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save(state, home / "their.pt")
    assert main(["eval", "their.pt", "--model", "mynet:Net", "--data", "digits", "--attacks", "clean",
                 "--normalize", "data"]) == 0
    assert "normalisation: data (digits mean 0.3053, std 0.3759)" in capsys.readouterr().out


def test_a_save_of_the_users_own_class_evaluates_when_the_factory_is_named(monkeypatch, trained):
    home, state, accuracy = trained
    monkeypatch.chdir(home)
    monkeypatch.syspath_prepend(str(home))
    import mynet  # the class the save records, importable under its module's name

    net = mynet.Net()
    net.load_state_dict(state)
    cstar.save(net, home / "saved")
    assert main(["eval", "saved", "--model", "mynet:Net", "--data", "digits", "--attacks", "clean",
                 "--json", "saved.json"]) == 0
    assert json.loads((home / "saved.json").read_text())["clean_acc"] / 100 == pytest.approx(accuracy, abs=1e-4)


@pytest.mark.parametrize("command", [
    ["eval", "bad.pt", "--data", "digits"],
    ["compress", "--checkpoint", "bad.pt", "--data", "digits", "--ratio", "2", "--out", "out"],
    ["compare", "--checkpoint", "bad.pt", "--data", "digits", "--ratios", "2", "--out", "out"],
])
def test_weights_of_another_architecture_are_refused_naming_the_keys(capsys, monkeypatch, trained, command):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save({**state, "head.weight": torch.zeros(3)}, home / "bad.pt")
    refused_cli(capsys, [*command, "--model", "mynet:Net"], ["unexpected head.weight"], tmp=home,
                left=[home / "out"])


@pytest.mark.parametrize("state, words", [
    ({"fc.weight": torch.zeros(10, 256)}, ["missing conv1.weight"]),
    ({"conv1.weight": torch.zeros(8, 1, 5, 5)}, ["conv1.weight is (8, 1, 5, 5) in the file, (8, 1, 3, 3)"]),
    ({"epoch": 3, "optimizer": {"lr": 0.1}}, ["holds no state dict"]),
])
def test_load_weights_names_what_does_not_fit(tmp_path, trained, state, words):
    home, good, _ = trained
    if "conv1.weight" in state and len(state) == 1:
        state = {**good, **state}
    torch.save(state, tmp_path / "w.pt")
    namespace: dict = {}
    exec(compile(NET, "mynet.py", "exec"), namespace)
    refused_api(lambda: cstar.load_weights(namespace["Net"](), tmp_path / "w.pt"), words)


def test_load_weights_refuses_nan_weights_before_copying_any(tmp_path, trained):
    _, state, _ = trained
    bad = {k: v.clone() for k, v in state.items()}
    bad["fc.bias"][0] = float("nan")
    torch.save(bad, tmp_path / "w.pt")
    namespace: dict = {}
    exec(compile(NET, "mynet.py", "exec"), namespace)
    net = namespace["Net"]()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    refused_api(lambda: cstar.load_weights(net, tmp_path / "w.pt"), ["NaN or Inf"])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_weights_without_a_model_name_the_flag_to_pass(capsys, monkeypatch, trained):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save(state, home / "their.pt")
    refused_cli(capsys, ["eval", "their.pt", "--data", "digits"], ["--model package.module:factory"], tmp=home)


@pytest.mark.parametrize("text", ["abc", "0.5", "0.5,0", "0.5,nan", "1,2,3"])
def test_a_bad_normalize_is_refused(capsys, monkeypatch, trained, text):
    home, state, _ = trained
    monkeypatch.chdir(home)
    torch.save(state, home / "their.pt")
    refused_cli(capsys, ["eval", "their.pt", "--model", "mynet:Net", "--data", "digits", "--normalize", text],
                ["--normalize"], tmp=home)


@pytest.mark.parametrize("command", [
    ["info", "saved", "--data", "digits"],
    ["ranks", "saved", "--data", "digits", "--ratio", "2"],
    ["decompose", "saved", "--data", "digits", "--ratio", "2", "--out", "small"],
    ["export", "saved", "--data", "digits", "--out", "saved.onnx"],
    ["compress", "--checkpoint", "saved", "--data", "digits", "--ratio", "2", "--search", "{epochs: 1}",
     "--finetune", "{epochs: 1}", "--eval-attacks", "clean", "--out", "run-saved"],
    ["compare", "--checkpoint", "saved", "--data", "digits", "--ratios", "2", "--methods", "dense,lowrank_global",
     "--search", "{epochs: 1}", "--finetune", "{epochs: 1}", "--eval-attacks", "clean", "--latency-runs", "1",
     "--out", "cmp-saved"],
])
def test_a_save_of_the_users_own_class_works_on_every_command(monkeypatch, trained, command):
    pytest.importorskip("onnx") if command[0] == "export" else None
    home, state, _ = trained
    monkeypatch.chdir(home)
    monkeypatch.syspath_prepend(str(home))
    import mynet

    if not (home / "saved").exists():
        net = mynet.Net()
        net.load_state_dict(state)
        cstar.save(net, home / "saved")
    assert main([*command, "--model", "mynet:Net"]) == 0


@pytest.mark.parametrize("command", [["eval", "model.pt", "--data", "digits"],
                                     ["compress", "--checkpoint", "model.pt", "--data", "digits", "--ratio", "2",
                                      "--out", "out"]])
def test_normalize_is_refused_for_a_model_cstar_saved_with_its_own(capsys, monkeypatch, tmp_path, command):
    monkeypatch.chdir(tmp_path)
    model = cstar.models.create("small_cnn", 10, in_channels=1, input_size=8)
    torch.save({"model": model.state_dict(), "model_config": model.cstar_config}, tmp_path / "model.pt")
    refused_cli(capsys, [*command, "--normalize", "none"], ["drop --normalize"], tmp=tmp_path, left=[tmp_path / "out"])


@pytest.mark.parametrize("name, said", [
    ("state_dict.pth", "the weights under 'state_dict'"), ("two-levels.pth", "under 'model'/'state_dict'"),
    ("robustbench.pt", "under 'state_dict', key prefix 'module.model.' dropped"),
    ("ddp.pt", "the weights, key prefix 'module.' dropped"),
])
def test_the_run_says_where_in_the_file_the_weights_were(capsys, monkeypatch, tmp_path, trained, name, said):
    _, state, _ = trained
    FORMATS[name](state, tmp_path / name, monkeypatch)
    namespace: dict = {}
    exec(compile(NET, "mynet.py", "exec"), namespace)
    capsys.readouterr()
    cstar.load_weights(namespace["Net"](), tmp_path / name)
    assert said in capsys.readouterr().out
