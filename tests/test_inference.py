"""BatchNorm folding and optimize_for_inference keep the outputs."""

import pytest
import torch
from torch import nn

from cstar.inference import fold_batchnorm, optimize_for_inference
from cstar.lowrank._layers import Tucker2Conv2d
from cstar.models import create
from cstar.files.serialize import load, save

from helpers import factorised_resnet20, randomise_bn


def _count_bn(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _assert_close(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(b(x), a.eval()(x), atol=1e-4, rtol=1e-4)


def test_fold_resnet20_removes_every_bn_and_keeps_outputs():
    model = randomise_bn(create("resnet20"))
    folded = fold_batchnorm(model)
    assert _count_bn(folded) == 0
    _assert_close(model, folded, torch.rand(2, 3, 32, 32))


def test_fold_factorised_resnet20_folds_into_the_last_conv():
    model = factorised_resnet20()
    folded = fold_batchnorm(model)
    block = folded.stages[1][0]
    assert isinstance(block.bn1, nn.Identity) and block.conv1.last.bias is not None
    assert isinstance(block.shortcut.bn, nn.Identity) and block.shortcut.conv.last.bias is not None
    _assert_close(model, folded, torch.rand(2, 3, 32, 32))


def test_fold_sequential_only_folds_bn_that_follows_a_conv():
    torch.manual_seed(0)
    model = randomise_bn(nn.Sequential(
        nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
        Tucker2Conv2d(8, 8, 3, (2, 3)), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 4),
    ))
    folded = fold_batchnorm(model)
    assert [type(m) for m in folded][:3] == [nn.BatchNorm2d, nn.Conv2d, nn.Identity]
    assert isinstance(folded[5], nn.Identity)
    _assert_close(model, folded, torch.rand(2, 3, 8, 8))


def test_fold_keeps_a_bn_whose_conv_output_is_used_elsewhere():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomise_bn(Branch())
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    _assert_close(model, folded, torch.rand(1, 3, 4, 4))


def test_fold_leaves_the_original_untouched():
    model = create("resnet20").train()
    fold_batchnorm(model)
    assert model.training and _count_bn(model) == 21 and model.conv1.bias is None


def test_fold_warns_and_returns_an_unchanged_copy_for_untraceable_models():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return y if y.sum() > 0 else -y

    model = randomise_bn(DataDependent())
    with pytest.warns(UserWarning, match="cannot trace"):
        folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and folded is not model


def test_folded_builtin_model_saves_and_reloads(tmp_path):
    folded = fold_batchnorm(factorised_resnet20())
    loaded = load(save(folded, tmp_path / "m"))
    assert _count_bn(loaded) == 0
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


def test_optimize_for_inference_channels_last_keeps_outputs():
    model = factorised_resnet20()
    fast = optimize_for_inference(model, channels_last=True)
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 32, 32)
    _assert_close(model, fast, x.contiguous(memory_format=torch.channels_last))
    assert _count_bn(fast) == 0


def test_optimize_for_inference_without_folding_keeps_bn():
    model = randomise_bn(create("resnet20"))
    assert _count_bn(optimize_for_inference(model, fold_bn=False)) == 21
