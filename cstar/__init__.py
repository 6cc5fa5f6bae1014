"""cstar: compact, structured and adversarially robust CNNs.

The public API, by concept (each lives in one module):

- data: :mod:`cstar.data` (``load``, ``make_loader``, ``DATASETS``)
- architectures: :mod:`cstar.models` (``create``, ``list_models``)
- attacks: :mod:`cstar.attacks` (``fgsm``, ``pgd``, ``nfgsm``, ``autoattack``)
- training and evaluation: :func:`fit` with :class:`TrainConfig`, :func:`evaluate`
- counting: :func:`count_params`, :func:`count_flops`, :func:`layer_table`
"""

__version__ = "0.1.0"

from . import attacks, data, models
from ._errors import CstarError
from .counting import count_flops, count_params, layer_table
from .evaluate import evaluate
from .train import TrainConfig, TrainHook, fit

__all__ = [
    "CstarError", "TrainConfig", "TrainHook", "attacks", "count_flops", "count_params", "data", "evaluate", "fit",
    "layer_table", "models", "__version__",
]
