"""cstar: compact, structured and adversarially robust CNNs.

The public API, by concept (each lives in one module, see docs/DESIGN.md):

- data: :mod:`cstar.data` (``load``, ``make_loader``, ``DATASETS``)
- architectures: :mod:`cstar.models` (``create``, ``list_models``)
- attacks: :mod:`cstar.attacks` (``fgsm``, ``pgd``, ``nfgsm``, ``autoattack``)
- training and evaluation: :func:`fit` with :class:`TrainConfig`, :func:`evaluate`,
  :func:`paired_difference`
- counting: :func:`count_params`, :func:`count_flops`, :func:`layer_table`
- low rank: :func:`tucker2`, :func:`tucker2_project`, :func:`svd_factors`,
  :func:`svd_project`, :class:`RankSpec`, :func:`select_ranks`, :func:`decompose`
- CSTAR: :func:`compress` with :class:`CompressConfig`; :class:`ADMM`
- comparison with the baselines: :func:`compare` with :class:`CompareConfig`; the
  compression methods it runs: :mod:`cstar.compressors` (``register`` adds one)
- files: :func:`save`, :func:`load`, :func:`load_weights` (weights trained elsewhere), :func:`export`;
  :func:`optimize_for_inference`;
  :func:`full_float32` (TF32 off, for exactness checks on GPUs)
- pruning baselines: :mod:`cstar.prune` (``find_groups``, ``prune_channels``,
  ``magnitude_prune``, ``hydra_prune``, ``robust_prune``)
- multi-process runs (torchrun, DDP): :mod:`cstar.distributed`
"""

from ._version import __version__
from . import attacks, compressors, data, distributed, models, prune
from ._errors import CstarError
from .admm import ADMM, ADMMConfig
from ._compare import CompareConfig, compare
from ._compress import CompressConfig, compress
from .counting import count_flops, count_params, layer_table
from ._evaluate import evaluate, paired_difference
from ._precision import full_float32
from .inference import fold_batchnorm, optimize_for_inference
from .lowrank import (LayerPlan, LowRankConv1x1, LowRankLinear, RankPlan, RankSpec, Tucker2Conv2d, decompose,
                      layer_sensitivity, mode_spectra, select_ranks, svd_factors, svd_project, tucker2,
                      tucker2_project)
from .prune import (ChannelGroup, ChannelMask, ChannelPlan, ScoredModel, channel_scores, find_groups, hydra_prune,
                    learn_channel_scores, magnitude_prune, prune_channels, robust_prune, select_channels)
from ._export import export
from .serialize import load, save
from ._weights import load_weights
from .train import TrainConfig, TrainHook, fit

__all__ = [
    "ADMM", "ADMMConfig", "ChannelGroup", "ChannelMask", "ChannelPlan", "CompareConfig", "CompressConfig",
    "CstarError", "LayerPlan", "LowRankConv1x1", "LowRankLinear", "RankPlan", "RankSpec", "ScoredModel", "TrainConfig",
    "TrainHook", "Tucker2Conv2d", "__version__", "attacks", "channel_scores", "compare", "compress", "compressors",
    "count_flops",
    "count_params", "data", "decompose", "distributed", "evaluate", "export", "find_groups", "fit",
    "fold_batchnorm", "full_float32", "hydra_prune", "layer_sensitivity", "layer_table", "learn_channel_scores", "load", "load_weights",
    "magnitude_prune",
    "mode_spectra", "models", "optimize_for_inference", "paired_difference", "prune", "prune_channels",
    "robust_prune", "save", "select_channels", "select_ranks", "svd_factors", "svd_project", "tucker2",
    "tucker2_project",
]
