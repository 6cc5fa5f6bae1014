"""Architectures written as torchvision and timm write theirs, small enough for 8x8 images and one CPU core.

torchvision and timm do not import beside the CPU torch build here, so their
building blocks are written below in their style (names, layouts, the layers
they use): ResNet's BasicBlock and Bottleneck with a ``downsample`` branch,
MobileNetV3's InvertedResidual (depthwise conv, squeeze-excitation, Hardswish),
ConvNeXt's block (depthwise 7x7, LayerNorm over channels, pointwise MLP, layer
scale) and a ViT (patch embedding, class token, position embedding, blocks of
qkv attention and MLP). Each ``*_net`` factory takes ``num_classes`` and
``in_channels`` as cstar passes them to ``--model tests.archs:<factory>``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- torchvision ResNet


class BasicBlock(nn.Module):
    expansion = 1

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


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, relu, layer1..layer2, avgpool, fc) with two stages."""

    def __init__(self, block, num_classes: int = 10, in_channels: int = 3, width: int = 8):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, width, 1)
        self.layer2 = self._make_layer(block, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def basic_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    return ResNet(BasicBlock, num_classes, in_channels, width)


def bottleneck_resnet(num_classes: int = 10, in_channels: int = 3, width: int = 8) -> nn.Module:
    return ResNet(Bottleneck, num_classes, in_channels, width)


# ----------------------------------------------------------------------------- MobileNetV3


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: pooled channels -> fc1 (1x1) -> ReLU -> fc2 (1x1) -> Hardsigmoid gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x):
        return x * self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))


def conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act=nn.Hardswish) -> nn.Sequential:
    """torchvision's Conv2dNormActivation."""
    layers = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand 1x1, depthwise kxk, squeeze-excitation, project 1x1; residual when shapes allow."""

    def __init__(self, cin: int, expanded: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        self.block = nn.Sequential(
            conv_bn_act(cin, expanded, 1),
            conv_bn_act(expanded, expanded, kernel, stride, groups=expanded),
            SqueezeExcitation(expanded, max(8, expanded // 4)),
            conv_bn_act(expanded, cout, 1, act=None),
        )

    def forward(self, x):
        out = self.block(x)
        return out + x if self.use_res_connect else out


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_act(in_channels, 16, 3),
            InvertedResidual(16, 64, 16),
            InvertedResidual(16, 64, 24, kernel=5, stride=2),
            conv_bn_act(24, 96, 1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return MobileNetV3(num_classes, in_channels)


# ----------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over the channels of an (N, C, H, W) tensor."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock: depthwise 7x7 -> LayerNorm (channels last) -> Linear 4x -> GELU -> Linear -> gamma."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, 4 * dim))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(4 * dim, dim))
        self.gamma = nn.Parameter(1e-1 * torch.ones(dim))

    def forward(self, x):
        shortcut = x
        x = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        x = (self.mlp(x) * self.gamma).permute(0, 3, 1, 2)
        return x + shortcut


class ConvNeXt(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims: tuple[int, int] = (16, 32)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 2, 2), LayerNorm2d(dims[0], eps=1e-6))
        self.stages = nn.Sequential(
            nn.Sequential(ConvNeXtBlock(dims[0])),
            nn.Sequential(LayerNorm2d(dims[0], eps=1e-6), nn.Conv2d(dims[0], dims[1], 2, 2), ConvNeXtBlock(dims[1])),
        )
        self.head = nn.Sequential()
        self.head.add_module("norm", nn.LayerNorm(dims[1], eps=1e-6))
        self.head.add_module("fc", nn.Linear(dims[1], num_classes))

    def forward(self, x):
        x = self.stages(self.stem(x)).mean((2, 3))
        return self.head(x)


def convnext(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ConvNeXt(num_classes, in_channels)


# ----------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    """timm's Attention: one qkv Linear, scaled dot-product attention over heads, a proj Linear."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's VisionTransformer layout: patch_embed.proj, cls_token, pos_embed, blocks, norm, head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, img_size: int = 8, patch: int = 2,
                 dim: int = 32, depth: int = 2, num_heads: int = 4):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img_size // patch) ** 2 + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return VisionTransformer(num_classes, in_channels)


def imagenet_vit(in_channels: int = 3) -> nn.Module:
    """A factory that fixes its own head, as an ImageNet checkpoint's does: 1000 classes whatever the data."""
    return VisionTransformer(1000, in_channels)


FACTORIES = {"basic_resnet": basic_resnet, "bottleneck_resnet": bottleneck_resnet, "mobilenet_v3": mobilenet_v3,
             "convnext": convnext, "vit": vit}
