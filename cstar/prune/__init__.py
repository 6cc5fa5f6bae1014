"""Robust structured (channel) pruning: the baselines CSTAR is compared against.

- :func:`find_groups` -> :class:`ChannelGroup`: coupled channels of a model
  (torch.fx analysis, or Torch-Pruning with ``graph="torch_pruning"``) (``_graph.py``).
- :func:`prune_channels`: a physically smaller copy; :class:`ChannelMask`,
  :func:`keep_masks`: the same by masking (``_surgery.py``).
- :func:`select_channels` -> :class:`ChannelPlan`: global channel ranking under
  an exact parameter budget (``_budget.py``).
- :func:`channel_scores`, :func:`magnitude_prune`: filter-norm pruning (``_magnitude.py``).
- :class:`ScoredModel`, :func:`learn_channel_scores`, :func:`hydra_prune`,
  :func:`robust_prune`: scores learned on the adversarial loss, structured
  HYDRA (``_hydra.py``).
- :func:`harp_prune`: HARP, the keep rate of every group learned with the
  scores under a size penalty (``_harp.py``).
- :func:`ratio_for_speedup` -> :class:`PruningSpeed`: the parameter ratio at which
  pruning meets a speed-up measured on a runtime (``_speed.py``).
"""

from ._budget import ChannelPlan, select_channels
from ._find import find_groups
from ._group import ChannelGroup
from ._harp import harp_prune
from ._hydra import ScoredModel, hydra_prune, learn_channel_scores, robust_prune
from ._magnitude import channel_scores, magnitude_plan, magnitude_prune
from ._speed import PruningSpeed, ratio_for_speedup
from ._surgery import ChannelMask, keep_masks, prune_channels

__all__ = [
    "ChannelGroup", "ChannelMask", "ChannelPlan", "PruningSpeed", "ScoredModel", "channel_scores", "find_groups",
    "harp_prune", "hydra_prune", "keep_masks", "learn_channel_scores", "magnitude_plan", "magnitude_prune",
    "prune_channels", "ratio_for_speedup", "robust_prune", "select_channels",
]
