"""Shared test helpers (imported by the test modules beside this file)."""

import torch
from torch import nn


def randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine terms (so a lost or mis-folded buffer changes outputs); eval mode."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def factorised_resnet20(factorised_fc: bool = False) -> nn.Module:
    """A resnet20 with one Tucker-2 conv and one SVD shortcut (and an SVD classifier if asked), random BN."""
    from cstar.lowrank import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
    from cstar.models import create

    torch.manual_seed(0)
    model = create("resnet20")
    block = model.stages[1][0]
    block.conv1 = Tucker2Conv2d(16, 32, 3, (5, 4), stride=2, padding=1, bias=False)
    block.shortcut.conv = LowRankConv1x1(16, 32, 6, stride=2, bias=False)
    if factorised_fc:
        model.fc = LowRankLinear(64, 10, 3)
    return randomise_bn(model)


class BatchHook:
    """Wraps a training loader; ``on_batch(epoch, index, (x, y))`` may act or return a replacement batch."""

    def __init__(self, loader, on_batch):
        self.loader, self.on_batch, self.epoch = loader, on_batch, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            yield self.on_batch(self.epoch, i, batch) or batch


def tiny_compress(out, **settings) -> dict:
    """:func:`cstar.compress` of a small untrained CNN on 300 digits (1 epoch of clean training a phase, enough
    to tell the digits apart; 64 test images, the final model evaluated clean and with PGD-3) into ``out``, with
    ``settings`` over those of CompressConfig; a few seconds. Returns the results."""
    import cstar
    from cstar import CompressConfig, TrainConfig, data

    train_set = data.load("digits", split="train").take(300)
    test_set = data.load("digits", split="test").take(64)
    phase = TrainConfig(attack="clean", epochs=1, batch_size=50, optimizer="adam", lr=1e-2, weight_decay=0,
                        check_size=0, progress=False)
    config = CompressConfig(**{"ratio": 2, "search": phase, "finetune": phase, "eval_attacks": ["clean", "pgd3"],
                               "eval_phases": ["final"], **settings})
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 10))
    return cstar.compress(dense, train_set, test_set, config, out, pretrained=True, resume=True, val_size=50)


def macs_of(module: nn.Module, x: torch.Tensor) -> int:
    """MACs of one forward of ``module`` on the batch ``x``, counted by hooks on every conv and linear
    (independent of cstar's counter)."""
    total = []

    def hook(layer, inputs, output):
        per_output = layer.in_features if isinstance(layer, nn.Linear) else \
            layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]
        total.append(output.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        module.eval()(x)
    for handle in handles:
        handle.remove()
    return sum(total)
