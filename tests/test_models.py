import pytest
import torch
from torch import nn

from cstar._core.errors import CstarError
from cstar.models import Normalize, create, list_models, register
from cstar.models import _registry

# Small but representative settings per model, so the whole file runs in seconds.
CASES = {
    "resnet18": dict(width=8),
    "resnet20": dict(),
    "preact_resnet18": dict(width=8),
    "wide_resnet28": dict(widen_factor=1, dropout=0.3),
    "vgg16": dict(num_classes=7),
    "small_cnn": dict(in_channels=1, input_size=8),
    "resnet18_imagenet": dict(input_size=64, num_classes=5),
    "resnet50_imagenet": dict(input_size=64, num_classes=5),
}


def _build(name):
    return create(name, **CASES[name])


def _input(model, batch=2):
    cfg = model.cstar_config
    return torch.rand(batch, cfg["in_channels"], cfg["input_size"], cfg["input_size"])


def test_every_registered_model_is_tested():
    assert sorted(CASES) == list_models()


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_backward_and_structure(name):
    torch.manual_seed(0)
    model = _build(name)
    x = _input(model).requires_grad_()
    out = model(x)
    assert out.shape == (2, model.cstar_config["num_classes"])
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is not None for p in model.parameters())
    children = list(model.named_children())
    assert children[0][0] == "normalize" and isinstance(children[0][1], Normalize)
    assert not any(isinstance(m, nn.Sequential) for m in model.modules())


@pytest.mark.parametrize("name", sorted(CASES))
def test_config_rebuilds_the_model(name):
    model = _build(name).eval()
    config = model.cstar_config
    assert config["name"] == name
    rebuilt = create(**config).eval()
    assert rebuilt.cstar_config == config
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())
    x = _input(model)
    torch.testing.assert_close(rebuilt(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_trace_and_script(name):
    model = _build(name).eval()
    x = _input(model)
    expected = model(x)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), expected)
    torch.testing.assert_close(torch.jit.script(model)(x), expected)


@pytest.mark.parametrize(
    "name, kwargs, expected",
    [
        ("resnet18", {}, 11_173_962),  # the usual CIFAR ResNet-18 count
        ("resnet20", {}, 272_474),  # 269,722 of He et al. (option A) + 1x1 projections with BN
        ("wide_resnet28", {}, 36_479_194),  # WRN-28-10
        ("small_cnn", dict(in_channels=1, input_size=28), 3_274_634),  # Madry et al. MNIST model
        ("resnet18_imagenet", dict(num_classes=1000, input_size=224), 11_689_512),
        ("resnet50_imagenet", dict(num_classes=1000, input_size=224), 25_557_032),
    ],
)
def test_reference_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):  # shapes only: skips allocation and initialisation
        model = create(name, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vgg16_flatten_adapts_to_input_size():
    model = create("vgg16", input_size=64)
    assert model.fc.in_features == 512 * 2 * 2
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 10)


def test_normalize_layer():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    model = create("resnet20", mean=mean, std=std)
    norm = model.normalize
    assert norm.mean.shape == (1, 3, 1, 1) and norm.std.shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 4, 4)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert model.cstar_config["mean"] == mean and model.cstar_config["std"] == std


def test_defaults_are_half_per_channel_and_recorded():
    model = create("small_cnn", in_channels=1, input_size=28)
    assert model.cstar_config == {
        "name": "small_cnn", "num_classes": 10, "in_channels": 1, "input_size": 28,
        "mean": [0.5], "std": [0.5],
    }
    assert create("resnet18", width=8).cstar_config["width"] == 8
    assert create("wide_resnet28", widen_factor=1).cstar_config["dropout"] == 0.0


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (("resnet1000",), {}, "resnet18, resnet18_imagenet"),
        (("resnet20", 1), {}, "num_classes"),
        (("resnet20", 2.5), {}, "num_classes"),
        (("resnet20",), dict(in_channels=0), "in_channels"),
        (("resnet20",), dict(depth=3), "valid options: none"),
        (("resnet18",), dict(widht=8), "valid options: width"),
        (("resnet18",), dict(width=0), "width"),
        (("wide_resnet28",), dict(dropout=1.5), "dropout"),
        (("resnet20",), dict(mean=[0.5, 0.5]), "in_channels=3"),
        (("resnet20",), dict(mean=0.5), "mean"),
        (("resnet20",), dict(std=[1.0, 0.0, 1.0]), "positive"),
        (("resnet20",), dict(mean=["a", "b", "c"]), "mean"),
        (("vgg16",), dict(input_size=16), "input_size"),
        (("small_cnn",), dict(input_size=3), "input_size"),
    ],
)
def test_bad_arguments_raise_cstar_error(args, kwargs, match):
    with pytest.raises(CstarError, match=match):
        create(*args, **kwargs)


def test_register_custom_model(monkeypatch):
    monkeypatch.setattr(_registry, "_BUILDERS", dict(_registry._BUILDERS))

    @register("tiny")
    def tiny(*, num_classes, in_channels, input_size, mean, std, hidden: int = 4):
        return nn.Linear(in_channels * input_size * input_size, num_classes)

    assert "tiny" in list_models()
    model = create("tiny", 3, input_size=2, hidden=5)
    assert model.cstar_config["hidden"] == 5 and model.out_features == 3
    with pytest.raises(CstarError, match="already registered"):
        register("tiny")(tiny)
    with pytest.raises(CstarError, match="fix: std, depth"):
        register("needs_depth")(lambda *, num_classes, in_channels, input_size, mean, depth: None)
