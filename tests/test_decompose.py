import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cstar._core.errors import CstarError
from cstar.evaluation.counting import count_macs, count_params
from cstar.lowrank import (
    LowRankConv1x1, LowRankLinear, Tucker2Conv2d, decompose, select_ranks, svd_factors, tucker2,
)
from cstar.models import create

from test_ranks import TINY_SHAPE, TinyNet


def _seeded(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3)
    return module


def _full_rank(plan):
    plan = copy.deepcopy(plan)
    for layer in plan.layers.values():
        if layer.kind == "tucker2":
            layer.ranks = tuple(layer.shape[:2])
        elif layer.kind == "svd":
            layer.ranks = (min(layer.shape[:2]),)
    return plan


def test_tucker2_conv_equals_dense_conv_of_its_kernel():
    conv = _seeded(nn.Conv2d(6, 10, 3, stride=2, padding=2, dilation=2, bias=True))
    core, u_out, u_in = tucker2(conv.weight, (4, 3))
    layer = Tucker2Conv2d.from_factors(core, u_out, u_in, conv.bias, conv)
    kernel = np.einsum("abhw,oa,ib->oihw", core.detach().numpy(), u_out.numpy(), u_in.numpy())
    np.testing.assert_allclose(layer.dense_weight().detach().numpy(), kernel, atol=1e-6)
    x = torch.randn(2, 6, 11, 9)
    expected = F.conv2d(x, torch.from_numpy(kernel), conv.bias, stride=2, padding=2, dilation=2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_lowrank_conv1x1_equals_dense_conv_of_its_kernel():
    conv = _seeded(nn.Conv2d(8, 5, 1, stride=2, bias=True), seed=1)
    u, v = svd_factors(conv.weight[:, :, 0, 0], 3)
    layer = LowRankConv1x1.from_factors(u, v, conv.bias, conv)
    x = torch.randn(2, 8, 7, 7)
    expected = F.conv2d(x, (u @ v)[:, :, None, None], conv.bias, stride=2)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_lowrank_linear_equals_dense_linear_of_its_weight():
    linear = _seeded(nn.Linear(12, 7), seed=2)
    u, v = svd_factors(linear.weight, 4)
    layer = LowRankLinear.from_factors(u, v, linear.bias, linear)
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), F.linear(x, u @ v, linear.bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, shape", [(lambda: create("resnet20", 10), (3, 32, 32)), (TinyNet, TINY_SHAPE)])
def test_full_rank_decomposition_reproduces_the_model(make, shape):
    model = _seeded(make()).eval()
    plan = _full_rank(select_ranks(model, 2, input_shape=shape, exclude=[]))
    assert any(layer.kind == "tucker2" for layer in plan.layers.values())
    factorised = decompose(model, plan).eval()
    x = torch.rand(2, *shape)
    with torch.no_grad():
        expected, got = model(x), factorised(x)
    torch.testing.assert_close(got, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(6, 8, 3, padding=2, dilation=2, padding_mode="circular", bias=False),
    nn.Conv2d(6, 8, 5, stride=2, padding=2, padding_mode="replicate"),
    nn.Conv2d(6, 8, 3, padding="same"),
    nn.Conv2d(6, 8, 3, padding="valid", padding_mode="reflect"),
    nn.Conv2d(6, 8, 1, stride=2, padding=1, padding_mode="reflect"),
], ids=["reflect", "circular-dilated", "replicate-strided", "same", "valid", "1x1-reflect"])
def test_convs_of_any_padding_mode_factorise_exactly_at_full_rank_and_reload(conv, tmp_path):
    from cstar.files.serialize import load, save

    x = torch.randn(2, 6, 9, 9)
    model = _seeded(nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))).eval()
    plan = select_ranks(model, 1.3, input_shape=(6, 9, 9), exclude=["4"])
    assert plan.layers["0"].kind in ("tucker2", "svd"), plan.skipped
    factorised = decompose(model, _full_rank(plan)).eval()
    with torch.no_grad():
        torch.testing.assert_close(factorised(x), model(x), atol=1e-4, rtol=1e-4)
    small = decompose(model, plan).eval()
    save(small, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m")(x), small(x))


def test_input_model_is_unchanged():
    model = create("resnet20", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decompose(model, select_ranks(model, 4))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert isinstance(model.stages[1][0].conv1, nn.Conv2d)


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_counts_equal_the_plan(budget):
    model = TinyNet()
    plan = select_ranks(model, 2, budget=budget, input_shape=TINY_SHAPE, exclude=[])
    factorised = decompose(model, plan)
    assert count_params(factorised) == plan.params
    assert count_macs(factorised, TINY_SHAPE) == plan.macs


def test_structure_is_recorded_and_config_kept():
    model = create("resnet20", 10)
    plan = select_ranks(model, 4)
    factorised = decompose(model, plan)
    assert factorised.cstar_config == model.cstar_config
    planned = {n: {"kind": p.kind, "ranks": list(p.ranks)} for n, p in plan.layers.items() if p.kind != "dense"}
    assert factorised.cstar_lowrank == planned
    modules = dict(factorised.named_modules())
    assert all(isinstance(modules[n], Tucker2Conv2d if p["kind"] == "tucker2" else (LowRankConv1x1, LowRankLinear))
               for n, p in planned.items())


def test_stride_padding_dilation_kept_and_grouped_conv_left_dense():
    model = TinyNet()
    plan = select_ranks(model, 2.5, input_shape=TINY_SHAPE, exclude=[])
    assert plan.layers["body.0"].kind == "tucker2" and plan.layers["body.5"].kind == "svd"
    factorised = decompose(model, plan)
    core = factorised.body[0].core
    assert (core.stride, core.padding, core.dilation) == ((2, 2), (2, 2), (2, 2))
    assert factorised.body[0].first.stride == (1, 1)
    assert factorised.body[5].first.stride == (2, 2)
    assert factorised.body[7].core.kernel_size == (3, 1) and factorised.body[7].core.padding == (1, 0)
    assert type(factorised.body[3]) is nn.Conv2d and factorised.body[3].groups == 4


def test_plan_as_dict_and_hooi_sweeps():
    model = create("resnet20", 10)
    plan = select_ranks(model, 4)
    a = decompose(model, plan.to_dict(), n_iter=2)
    b = decompose(model, plan, n_iter=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_float64_model_stays_float64():
    model = TinyNet().double()
    factorised = decompose(model, select_ranks(model, 2, input_shape=TINY_SHAPE, exclude=[]))
    assert {p.dtype for p in factorised.parameters()} == {torch.float64}


def test_mismatched_plan_names_the_layer():
    plan = select_ranks(create("resnet18", 10, width=8), 2)
    with pytest.raises(CstarError, match=r"'stages.0.0.conv1' has weight shape \(8, 8, 3, 3\)"):
        decompose(create("resnet18", 10, width=16), plan)
    with pytest.raises(CstarError, match="'stages.0.0.conv1' is not a module"):
        decompose(TinyNet(), plan)
    wrong_kind = copy.deepcopy(plan)
    wrong_kind.layers["stages.1.0.shortcut.conv"].kind = "tucker2"
    with pytest.raises(CstarError, match="'stages.1.0.shortcut.conv' has kind 'tucker2'"):
        decompose(create("resnet18", 10, width=8), wrong_kind)
    with pytest.raises(CstarError, match="n_iter"):
        decompose(create("resnet18", 10, width=8), plan, n_iter=-1)
