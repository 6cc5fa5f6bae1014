"""Architectures: build a model by name with :func:`create`.

Every model takes images (N, C, H, W) in [0, 1], normalises them in its first
layer (:class:`Normalize`) and returns logits (N, num_classes). Built-in names:
``resnet18``, ``resnet20``, ``preact_resnet18``, ``wide_resnet28``, ``vgg16``,
``small_cnn``, ``resnet18_imagenet``, ``resnet50_imagenet``; any other model
through a factory name: ``package.module:factory``, ``torchvision:NAME`` or
``timm:NAME`` (those packages are optional extras).
"""

from . import _preact, _resnet, _small_cnn, _vgg  # noqa: F401  (importing registers the builders)
from ._layers import Normalize, normalization_of
from ._registry import create, input_shape, list_models, register

__all__ = ["Normalize", "create", "input_shape", "list_models", "normalization_of", "register"]
