"""Low-rank engine: Tucker-2 / SVD factorisation, global rank selection and model decomposition.

- :func:`mode_spectra`, :func:`tucker2`, :func:`tucker2_project`, :func:`svd_factors`,
  :func:`svd_project`: factorise or project one weight (``_tucker.py``).
- :class:`RankSpec`: the target a plan must meet, validated once (``_spec.py``).
- :func:`select_ranks` -> :class:`RankPlan` of :class:`LayerPlan`: the ranks of every
  layer for a target compression ratio (``_ranks.py``, costs and allocation ``_allocate.py``,
  ``_plan.py``); :func:`check_reachable`: whether a target can be met, from the layers' shapes
  alone; :func:`check_plan`: whether a plan chosen beforehand fits a model and a target.
- :func:`model_latencies_ms`: whole models timed interleaved on a runtime, as a latency budget's
  plans are, and :func:`where_timed`, where in words (``_latency.py``: the layer timings, their
  cache and the curve of ``budget="latency"``).
- :func:`learn_ranks` -> :class:`RankPlan`: ranks chosen by a score per rank component learned on the
  adversarial loss with the weights frozen (:class:`RankScoredModel`; ``_learned.py``).
- :func:`layer_sensitivity`: how much the adversarial loss depends on each layer, weights for a
  robustness-aware allocation (``RankSpec.layer_weights``; ``_sensitivity.py``).
- :func:`decompose`: a copy of a model with every planned layer replaced by its
  factorised form, :class:`Tucker2Conv2d`, :class:`LowRankConv1x1` or
  :class:`LowRankLinear` (``_decompose.py``, ``_layers.py``).
- :func:`condition_numbers`, :func:`conditioning_penalty`: how well conditioned the factorised
  layers are, and the penalty that keeps them so (``_condition.py``).
"""

from ._condition import condition_numbers, conditioning_penalty
from ._decompose import check_plan, decompose
from ._latency import model_latencies_ms, where_timed
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d
from ._learned import RankScoredModel, learn_ranks
from ._plan import LayerPlan, RankPlan
from ._ranks import check_reachable, select_ranks
from ._sensitivity import layer_sensitivity
from ._spec import RankSpec
from ._tucker import mode_spectra, svd_factors, svd_project, tucker2, tucker2_project

__all__ = [
    "LayerPlan", "LowRankConv1x1", "LowRankLinear", "RankPlan", "RankScoredModel", "RankSpec", "Tucker2Conv2d",
    "check_plan", "check_reachable", "condition_numbers", "conditioning_penalty", "decompose", "layer_sensitivity",
    "learn_ranks", "mode_spectra", "model_latencies_ms", "select_ranks", "svd_factors", "svd_project", "tucker2",
    "tucker2_project", "where_timed",
]
