import pytest
from torch import nn

from cstar._core.errors import CstarError
from cstar.evaluation.counting import LayerStats, count_macs, count_params, format_table, layer_table
from cstar.models import create


def test_count_params_counts_frozen_parameters_not_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    assert count_params(model) == sum(p.numel() for p in model.parameters()) == 108 + 4 + 8 + 10
    assert count_params(create("resnet20")) == 272_474


def test_single_conv_macs_and_shapes():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    (row,) = layer_table(conv, (3, 16, 16))
    assert row == LayerStats("", "Conv2d", 8 * 3 * 9 + 8, 8 * 8 * 8 * 3 * 3 * 3, (1, 3, 16, 16), (1, 8, 8, 8))
    assert count_macs(conv, (1, 3, 16, 16)) == 13_824


def test_grouped_and_depthwise_conv_macs():
    assert count_macs(nn.Conv2d(8, 16, 3, padding=1, groups=4), (8, 10, 10)) == 16 * 10 * 10 * (8 // 4) * 9
    assert count_macs(nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 10, 10)) == 8 * 10 * 10 * 1 * 9


def test_linear_macs_including_leading_dims():
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 7))
    assert count_macs(model, (3, 4, 4)) == 48 * 7
    # a linear over the last axis of (1, 3, 2, 4): 3 * 2 rows of 4 -> 5
    assert count_macs(nn.Linear(4, 5), (3, 2, 4)) == 3 * 2 * 4 * 5


def test_reused_module_macs_are_summed():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1, bias=False)

        def forward(self, x):
            return self.conv(self.conv(x))

    (row,) = layer_table(Twice(), (2, 3, 3))
    assert row.macs == 2 * (2 * 3 * 3 * 2) and row.params == 4


def test_resnet18_cifar_macs_match_reference():
    model = create("resnet18")
    macs = count_macs(model, (3, 32, 32))
    # stem 1.77M + stage 1 151.0M + stages 2-4 134.2M each + fc 5,120 MACs
    assert macs == 555_422_720
    assert abs(macs / 0.556e9 - 1) < 0.01  # the commonly quoted 0.56 GMACs


def test_layer_table_order_totals_and_kinds():
    model = create("resnet20")
    rows = layer_table(model, (3, 32, 32))
    names = [r.name for r in rows]
    module_order = [n for n, _ in model.named_modules()]
    assert names == sorted(names, key=module_order.index)
    assert names[:4] == ["normalize", "conv1", "bn1", "relu"] and names[-1] == "fc"
    assert sum(r.params for r in rows) == count_params(model)
    assert sum(r.macs for r in rows) == count_macs(model, (3, 32, 32))
    kinds = {"Normalize", "Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Linear"}
    assert {r.kind for r in rows} == kinds
    assert rows[-1].in_shape == (1, 64) and rows[-1].out_shape == (1, 10)


def test_identity_and_dropout_are_not_listed_but_unused_parameters_are():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.skip = nn.Identity()
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(4, 2)
            self.unused = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.drop(self.skip(x)).flatten(1))

    rows = layer_table(Model(), (1, 2, 2))
    assert [(r.name, r.macs, r.out_shape) for r in rows] == [("fc", 8, (1, 2)), ("unused", 0, None)]
    assert sum(r.params for r in rows) == 10 + 12


def test_modes_restored_and_no_gradients():
    model = create("resnet20").train()
    model.bn1.eval()
    layer_table(model, (3, 32, 32))
    assert model.training and not model.bn1.training and model.stages[0][0].bn1.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    count_macs(model, (3, 32, 32))
    assert not any(m.training for m in model.modules())


def test_bad_input_shape():
    for shape in [(32, 32), (2, 3, 32, 32), (3, 0, 32)]:
        with pytest.raises(CstarError, match="input_shape"):
            layer_table(nn.Conv2d(3, 3, 1), shape)


def test_format_table():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    text = format_table(layer_table(model, (3, 4, 4)))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "kind", "params", "MACs", "out", "shape"]
    assert lines[2].split() == ["0", "Conv2d", "224", "3,456", "1x8x4x4"]
    assert lines[-1].split() == ["total", f"{224 + 1290:,}", f"{3456 + 1280:,}"]
    end = lines[0].index("MACs") + len("MACs")  # the MACs column is right-aligned under its header
    body_and_total = lines[2:6] + lines[-1:]
    assert [line[:end].split()[-1] for line in body_and_total] == ["3,456", "0", "0", "1,280", "4,736"]
    assert all(line[end:end + 1] in ("", " ") for line in body_and_total)
