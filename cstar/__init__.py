"""cstar: compact, structured and adversarially robust CNNs.

The public API, by concept (each lives in one module, see docs/DESIGN.md):

- data: :mod:`cstar.data` (``load``, ``make_loader``, ``DATASETS``)
- architectures: :mod:`cstar.models` (``create``, ``list_models``)
- attacks: :mod:`cstar.attacks` (``fgsm``, ``pgd``, ``nfgsm``, ``autoattack``)
- training and evaluation: :func:`fit` with :class:`TrainConfig`, :func:`evaluate`
- counting: :func:`count_params`, :func:`count_flops`, :func:`layer_table`
- low rank: :func:`tucker2`, :func:`tucker2_project`, :func:`svd_factors`,
  :func:`svd_project`, :func:`select_ranks`, :func:`decompose`
- CSTAR: :func:`compress` with :class:`CompressConfig`; :class:`ADMM`
- files: :func:`save`, :func:`load`, :func:`export`; :func:`optimize_for_inference`
- pruning baselines: :mod:`cstar.prune` (``find_groups``, ``prune_channels``,
  ``magnitude_prune``, ``hydra_prune``, ``robust_prune``)
- multi-process runs (torchrun, DDP): :mod:`cstar.distributed`
"""

__version__ = "0.1.0"

from . import attacks, data, distributed, models
from ._errors import CstarError
from .admm import ADMM, ADMMConfig
from .compress import CompressConfig, compress
from .counting import count_flops, count_params, layer_table
from .evaluate import evaluate
from .inference import fold_batchnorm, optimize_for_inference
from .lowrank import (LayerPlan, LowRankConv1x1, LowRankLinear, RankPlan, Tucker2Conv2d, decompose, mode_spectra,
                      select_ranks, svd_factors, svd_project, tucker2, tucker2_project)
from .serialize import export, load, save
from .train import TrainConfig, TrainHook, fit
from . import prune
from .prune import (ChannelGroup, ChannelMask, ChannelPlan, ScoredModel, channel_scores, find_groups, hydra_prune,
                    learn_channel_scores, magnitude_prune, prune_channels, robust_prune, select_channels)

__all__ = [
    "ADMM", "ADMMConfig", "CompressConfig", "CstarError", "LayerPlan", "LowRankConv1x1", "LowRankLinear",
    "RankPlan", "TrainConfig", "TrainHook", "Tucker2Conv2d", "__version__", "attacks", "compress", "count_flops",
    "count_params", "data", "decompose", "distributed", "evaluate", "export", "fit", "fold_batchnorm", "layer_table", "load",
    "mode_spectra", "models", "optimize_for_inference", "save", "select_ranks", "svd_factors", "svd_project",
    "tucker2", "tucker2_project",
    "prune", "ChannelGroup", "ChannelMask", "ChannelPlan", "ScoredModel", "channel_scores", "find_groups",
    "hydra_prune", "learn_channel_scores", "magnitude_prune", "prune_channels", "robust_prune", "select_channels",
]
