"""Models of any class in and out: compress or prune a model written as torchvision writes its ResNets,
save it, and reload it on a freshly built instance (issue "Any model in, any model out").

torchvision does not import beside the CPU torch build here, so the architecture is
written below in the style of ``torchvision.models.resnet`` (BasicBlock with a
``downsample`` branch, ``layerN`` stages, ``avgpool``, ``fc``), plus a layer-scale
parameter as timm's blocks carry.
"""

import pytest
import torch
from torch import nn

import cstar
from cstar import CstarError, data
from cstar.pipeline.compress import CompressConfig
from cstar.lowrank import Tucker2Conv2d, decompose, select_ranks
from cstar.prune import magnitude_prune
from cstar.files.serialize import load, save


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: two 3x3 convs with BatchNorm, an identity or ``downsample`` shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class LayerScale(nn.Module):
    """timm's LayerScale: a learned per-channel gain (its parameter is not a constructor argument cstar records)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))

    def forward(self, x):
        return x * self.gamma


class SmallResNet(nn.Module):
    """A two-stage ResNet in torchvision's layout, for ``in_channels`` x 8 x 8 images."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(width, width))
        down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, 2, bias=False), nn.BatchNorm2d(2 * width))
        self.layer2 = nn.Sequential(BasicBlock(width, 2 * width, 2, down))
        self.scale = LayerScale(2 * width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.scale(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _trained_looking(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics, so that a wrongly restored buffer changes the outputs."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    model.scale.gamma.data.uniform_(0.5, 1.5)
    return model.eval()


X = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_a_factorised_model_of_a_user_class_reloads_on_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    dense = _trained_looking(SmallResNet())
    small = decompose(dense, select_ranks(dense, 2, input_shape=(1, 8, 8))).eval()
    assert any(isinstance(m, Tucker2Conv2d) for m in small.modules())
    save(small, tmp_path / "small")
    loaded = load(tmp_path / "small", model=SmallResNet())
    assert isinstance(loaded, SmallResNet) and not loaded.training
    assert [type(m) for m in loaded.modules()] == [type(m) for m in small.modules()]
    assert torch.equal(loaded(X), small(X))


def test_a_channel_pruned_model_of_a_user_class_reloads_on_a_fresh_instance(tmp_path):
    torch.manual_seed(0)
    dense = _trained_looking(SmallResNet())
    pruned = magnitude_prune(dense, 2, input_shape=(1, 8, 8)).eval()
    assert pruned.layer1[0].conv1.out_channels < 8  # channels were removed
    save(pruned, tmp_path / "pruned")
    loaded = load(tmp_path / "pruned", model=SmallResNet())
    assert loaded.layer1[0].conv1.out_channels == pruned.layer1[0].conv1.out_channels
    assert torch.equal(loaded(X), pruned(X))


def test_loading_without_a_fresh_instance_names_the_class_and_the_fix(tmp_path):
    save(SmallResNet(), tmp_path / "m")
    with pytest.raises(CstarError, match=r"SmallResNet.*model=SmallResNet\(\.\.\.\)"):
        load(tmp_path / "m")


def test_a_fresh_instance_of_another_class_is_refused(tmp_path):
    save(SmallResNet(), tmp_path / "m")
    with pytest.raises(CstarError, match="model= is a .*BasicBlock but .* holds a .*SmallResNet"):
        load(tmp_path / "m", model=BasicBlock(4, 4))


def test_a_fresh_instance_built_otherwise_is_refused_before_loading(tmp_path):
    save(SmallResNet(width=8), tmp_path / "m")
    fresh = SmallResNet(width=4)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CstarError, match="scale.gamma"):  # the one tensor no recorded layer describes
        load(tmp_path / "m", model=fresh)
    assert fresh.scale.gamma.shape == before["scale.gamma"].shape
    assert torch.equal(fresh.scale.gamma, before["scale.gamma"])  # no weight was copied


def test_compress_runs_on_a_user_class_and_its_model_reloads(tmp_path):
    train_set = data.load("digits", split="train")
    test_set = data.load("digits", split="test").take(64)
    phase = cstar.TrainConfig(epochs=1, batch_size=64, attack_steps=1, optimizer="adam", lr=1e-3, weight_decay=0,
                              check_size=32, progress=False)
    config = CompressConfig(ratio=2, search=phase, finetune=phase, eval_attacks=["clean"], eval_phases=["final"])
    torch.manual_seed(0)
    results = cstar.compress(SmallResNet(), train_set, test_set, config, tmp_path / "run", pretrained=True,
                             val_size=100)
    assert results["params"]["ratio"] >= 2
    final = load(tmp_path / "run" / "model", model=SmallResNet())
    predictions = final(test_set.images.float() / 255).argmax(1)
    assert (predictions == test_set.labels).float().mean().item() == pytest.approx(
        results["accuracy"]["final"]["clean"], abs=1e-6)
