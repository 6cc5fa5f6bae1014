"""cstar: compact, structured and adversarially robust CNNs.

The public API, by concept (each lives in one module, see docs/DESIGN.md):

- data: :mod:`cstar.data` (``load``, ``make_loader``, ``DATASETS``)
- architectures: :mod:`cstar.models` (``create``, ``list_models``)
- attacks: :mod:`cstar.attacks` (``fgsm``, ``pgd``, ``nfgsm``, ``autoattack``)
- training and evaluation: :func:`fit` with :class:`TrainConfig`, :func:`evaluate`,
  :func:`paired_difference`
- counting: :func:`count_params`, :func:`count_macs`, :func:`layer_table`
- low rank: :func:`tucker2`, :func:`tucker2_project`, :func:`svd_factors`,
  :func:`svd_project`, :class:`RankSpec`, :func:`select_ranks`, :func:`check_reachable`,
  :func:`check_plan`, :func:`learn_ranks` (:class:`RankScoredModel`), :func:`decompose`;
  :func:`condition_numbers`, :func:`conditioning_penalty` (well-conditioned factorised layers)
- CSTAR: :func:`compress` with :class:`CompressConfig`; :class:`ADMM`
- comparison with the baselines: :func:`compare` with :class:`CompareConfig`; the
  compression methods it runs: :mod:`cstar.compressors` (``register`` adds one)
- files: :func:`save`, :func:`load`, :func:`load_weights` (weights trained elsewhere), :func:`export`;
  :func:`export_int8` (INT8 for onnxruntime or OpenVINO), :func:`load_exported` (an exported graph as a module);
  :func:`optimize_for_inference`;
  :func:`full_float32` (TF32 off, for exactness checks on GPUs)
- pruning baselines: :mod:`cstar.prune` (``find_groups``, ``prune_channels``,
  ``magnitude_prune``, ``hydra_prune``, ``harp_prune``, ``robust_prune``)
- multi-process runs (torchrun, DDP): :mod:`cstar.distributed`
- records of runs and measurements for scripts (atomic files, the machine, comparisons): :mod:`cstar.records`
"""

from ._version import __version__
from . import attacks, data, distributed, models, prune, records
from .pipeline import compressors
from ._core.errors import CstarError
from ._core.signals import Interrupted
from .pipeline.admm import ADMM, ADMMConfig
from .pipeline.compare import CompareConfig, compare
from .pipeline.compress import CompressConfig, compress
from .evaluation.counting import count_flops, count_macs, count_params, layer_table  # count_flops: old name
from .evaluation.evaluate import evaluate, paired_difference
from ._core.precision import full_float32
from .inference import fold_batchnorm, optimize_for_inference
from .lowrank import (LayerPlan, LowRankConv1x1, LowRankLinear, RankPlan, RankScoredModel, RankSpec, Tucker2Conv2d,
                      check_plan, check_reachable, condition_numbers, conditioning_penalty, decompose,
                      layer_sensitivity, learn_ranks, mode_spectra, select_ranks, svd_factors, svd_project, tucker2,
                      tucker2_project)
from .prune import (ChannelGroup, ChannelMask, ChannelPlan, ScoredModel, channel_scores, find_groups, harp_prune,
                    hydra_prune, learn_channel_scores, magnitude_prune, prune_channels, robust_prune, select_channels)
from .files.export import export
from .files.exported import load_exported
from .files.quantize import export_int8
from .files.serialize import load, save
from .files.weights import load_weights
from .training.fit import TrainConfig, TrainHook, fit

__all__ = [
    "ADMM", "ADMMConfig", "ChannelGroup", "ChannelMask", "ChannelPlan", "CompareConfig", "CompressConfig",
    "CstarError", "Interrupted", "LayerPlan", "LowRankConv1x1", "LowRankLinear", "RankPlan", "RankScoredModel",
    "RankSpec", "ScoredModel", "TrainConfig", "TrainHook", "Tucker2Conv2d", "__version__", "attacks", "channel_scores",
    "check_plan", "check_reachable", "compare", "compress", "compressors", "condition_numbers", "conditioning_penalty",
    "count_macs", "count_params", "data", "decompose", "distributed", "evaluate", "export", "export_int8", "find_groups", "fit",
    "fold_batchnorm", "full_float32", "harp_prune",
    "hydra_prune", "layer_sensitivity", "layer_table", "learn_channel_scores", "learn_ranks", "load", "load_exported", "load_weights",
    "magnitude_prune",
    "mode_spectra", "models", "optimize_for_inference", "paired_difference", "prune", "prune_channels", "records",
    "robust_prune", "save", "select_channels", "select_ranks", "svd_factors", "svd_project", "tucker2",
    "tucker2_project",
]
