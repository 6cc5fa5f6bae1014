"""The compression methods that :func:`cstar.compare` runs, one registered function each.

A compressor turns the dense robust model into a compressed and adversarially
trained one at a parameter ratio. It takes one :class:`Cell` (the dense model,
the ratio, the data, the training settings, its own directory) and returns the
trained model and the training seconds of its phases. Every compressor gets the
same budget: a first phase with ``cell.search`` settings (what it trains there
is its own), then ``cell.finetune``. Adding a method is one function and one
line, as timm registers models::

    from cstar import compressors, prune

    @compressors.register("l1_channels")
    def l1_channels(cell):
        \"\"\"Channels pruned by their L1 norm, then the weights trained.\"\"\"
        return cell.train_weights(prune.magnitude_prune(cell.fresh_copy(), cell.ratio, norm=1))

after which ``compare(..., CompareConfig(methods=["dense", "l1_channels"]))``
runs it beside the built-in ones (listed by :func:`names`): ``cstar`` (ADMM
under the rank constraints, then the exact decomposition), ``hydra`` (channel
scores learned on the adversarial loss, weights frozen), ``magnitude`` (channels
pruned by filter norm), ``lowrank_global`` / ``lowrank_uniform`` (post-hoc
decomposition with global / uniform ranks), ``cstar_equal_macs`` /
``lowrank_equal_macs``: the low-rank methods held to the parameter ratio and,
at once, to the MACs ratio that magnitude pruning reaches there (equal size
and equal compute: pruning removes MACs faster than low rank does), and
``cstar_sensitivity`` / ``lowrank_sensitivity``: their global ranks weighed by
each layer's sensitivity of the adversarial loss
(:func:`cstar.lowrank.layer_sensitivity`), robustness-aware ranks.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import data, distributed, prune
from .._core.errors import CstarError
from .phases import train_phase, training_loader, training_seconds
from .admm import ADMMConfig
from .compress import CompressConfig, compress
from ..evaluation.counting import count_flops
from ..lowrank import decompose, layer_sensitivity, select_ranks
from ..files.serialize import load
from ..training.fit import TrainConfig


@dataclass
class Cell:
    """What a compressor gets for one (method, ratio) of a comparison.

    ``dense`` is the trained dense model (do not modify it: :meth:`fresh_copy`);
    ``ratio`` the parameter ratio (dense / compressed, > 1); ``train_set`` the
    whole training set, ``train_part`` the part to train on and ``val`` the
    held-out rest (for the per-epoch check); ``search``, ``finetune`` and
    ``admm`` the comparison's settings; ``out_dir`` the cell's directory (a
    phase in ``out_dir/<phase>`` resumes from its checkpoint); ``seed`` the run's.
    """

    dense: nn.Module
    ratio: float
    train_set: object
    train_part: object
    val: object
    search: TrainConfig
    finetune: TrainConfig
    admm: ADMMConfig
    out_dir: Path
    seed: int

    @property
    def device(self):
        return next(self.dense.parameters()).device

    def fresh_copy(self) -> nn.Module:
        """A copy of the dense model to compress."""
        return copy.deepcopy(self.dense)

    def train(self, model: nn.Module, phase: str) -> float:
        """Train ``model`` in place with the ``phase`` ("search" or "finetune") settings, resumably, with the
        dense model as teacher (used when the settings distill); returns the phase's training seconds."""
        if phase not in ("search", "finetune"):
            raise CstarError(f"unknown phase {phase!r}: a cell trains 'search' or 'finetune'")
        settings = {"search": self.search, "finetune": self.finetune}[phase]
        name = f"{self.out_dir.name} {phase}"  # e.g. "magnitude-4x search"
        _, seconds = train_phase(model, self.train_part, self.val, settings, self.out_dir / phase, resume=True,
                                 seed=self.seed, name=name, teacher=self.dense)
        return round(seconds, 1)

    def train_weights(self, model: nn.Module) -> tuple[nn.Module, dict[str, float]]:
        """Both phases on the weights of an already compressed ``model`` (moved to the dense model's device)."""
        model = model.to(self.device)
        seconds = {"search": self.train(model, "search")}
        seconds["finetune"] = self.train(model, "finetune")
        return model, seconds


Compressor = Callable[[Cell], "tuple[nn.Module, dict[str, float]]"]

# The built-in methods whose parameter ratio is a rank plan: compare checks that each ratio is reachable on the
# dense model's layers before any work, as compress does (:func:`cstar.lowrank.check_reachable`).
RANK_PLANNED = ("cstar", "lowrank_global", "lowrank_uniform", "cstar_equal_macs", "lowrank_equal_macs",
                "cstar_sensitivity", "lowrank_sensitivity")


@dataclass(frozen=True)
class _Entry:
    function: Compressor
    settings: tuple[str, ...]  # the CompareConfig sections a cell's model depends on (recorded, checked on resume)


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, settings: tuple[str, ...] = ("search", "finetune")) -> Callable[[Compressor], Compressor]:
    """Decorator: register ``function(cell) -> (model, {phase: seconds})`` as the compression method ``name``.

    ``settings``: the comparison's sections the method's result depends on
    (``search``, ``finetune``, ``admm``), recorded with each cell so that a
    resume with other ones is refused. Registering a name twice is an error.
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "dense":
        raise CstarError(f"compressor name {name!r}: use an identifier other than 'dense', e.g. 'l1_channels'")
    unknown = sorted(set(settings) - {"search", "finetune", "admm"})
    if unknown:
        raise CstarError(f"compressor {name}: unknown settings {', '.join(unknown)}; choose from search, finetune, "
                         "admm")

    def add(function: Compressor) -> Compressor:
        if name in _REGISTRY:
            raise CstarError(f"a compressor named {name!r} is already registered: choose another name")
        _REGISTRY[name] = _Entry(function, tuple(settings))
        return function

    return add


def names() -> tuple[str, ...]:
    """The registered compression methods, in registration order (the built-in ones first)."""
    return tuple(_REGISTRY)


def get(name: str) -> Compressor:
    """The compressor registered as ``name``."""
    check_names([name])
    return _REGISTRY[name].function


def settings_of(name: str) -> tuple[str, ...]:
    """The comparison sections that method ``name`` depends on."""
    check_names([name])
    return _REGISTRY[name].settings


def check_names(methods: list[str], allow_dense: bool = False) -> None:
    """One line naming the unknown methods of ``methods`` and the known ones."""
    known = (("dense",) if allow_dense else ()) + names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise CstarError(f"unknown method(s) {', '.join(map(str, unknown))}: choose from {', '.join(known)} "
                         "(or register one with cstar.compressors.register)")


def _cstar(cell: Cell, **target) -> tuple[nn.Module, dict[str, float]]:
    """:func:`cstar.compress` of the dense model in ``out_dir/cstar`` at ``cell.ratio`` and ``target`` (budget
    settings of :class:`cstar.CompressConfig`); the trained model and its phases' seconds."""
    settings = CompressConfig(ratio=cell.ratio, admm_train=cell.search, finetune=cell.finetune, admm=cell.admm,
                              eval_phases=[], **target)
    phases = compress(cell.fresh_copy(), cell.train_set, None, settings, cell.out_dir / "cstar", pretrained=True,
                      resume=True, val_size=len(cell.train_set) - len(cell.train_part), seed=cell.seed)["phases"]
    model = load(cell.out_dir / "cstar" / "model", model=cell.fresh_copy()).to(cell.device)
    return model, {"search": phases["admm"]["seconds"], "finetune": phases["finetune"]["seconds"]}


def pruning_macs_ratio(cell: Cell) -> float:
    """The MACs ratio (dense / pruned) that magnitude channel pruning reaches at ``cell.ratio`` parameters: the
    speed target of the equal-MACs methods (computed from the dense model; nothing is trained)."""
    shape = tuple(cell.train_set.spec.image_shape)  # magnitude_prune prunes a copy; count_flops restores modes
    return count_flops(cell.dense, shape) / count_flops(prune.magnitude_prune(cell.dense, cell.ratio, shape), shape)


@register("cstar", settings=("search", "finetune", "admm"))
def cstar_admm(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """ADMM adversarial training under the rank constraints (``search`` settings), the exact decomposition, then
    fine-tuning: :func:`cstar.compress`."""
    return _cstar(cell)


@register("hydra")
def hydra(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Channel scores learned on the adversarial loss with the weights frozen (``search``), the lowest-scored
    channels removed, then the weights fine-tuned."""
    loader = training_loader(cell.train_part, cell.search, cell.device, cell.seed)
    model = prune.hydra_prune(cell.fresh_copy(), loader, cell.ratio, cell.search, val=cell.val,
                              out_dir=cell.out_dir / "search", resume=True, teacher=cell.dense)
    log = cell.out_dir / "search" / "metrics.jsonl"  # rank 0's; other nodes may not see it (their figure is unused)
    history = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    seconds = {"search": round(training_seconds(history), 1), "finetune": cell.train(model, "finetune")}
    return model, seconds


@register("magnitude")
def magnitude(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Global channel pruning by filter norm, then both phases on the weights."""
    return cell.train_weights(prune.magnitude_prune(cell.fresh_copy(), cell.ratio))


@register("lowrank_global")
def lowrank_global(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc decomposition with globally allocated ranks (no ADMM), then both phases on the factors."""
    model = cell.fresh_copy()
    return cell.train_weights(decompose(model, select_ranks(model, cell.ratio, method="global")))


@register("lowrank_uniform")
def lowrank_uniform(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc decomposition with the same rank fraction in every layer, then both phases on the factors."""
    model = cell.fresh_copy()
    return cell.train_weights(decompose(model, select_ranks(model, cell.ratio, method="uniform")))


@register("cstar_equal_macs", settings=("search", "finetune", "admm"))
def cstar_equal_macs(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """CSTAR held to the parameter ratio and, at once, to the MACs ratio magnitude pruning reaches there (the
    joint budget): equal size and equal compute against pruning."""
    return _cstar(cell, budget="joint", flops_ratio=pruning_macs_ratio(cell))


@register("lowrank_equal_macs")
def lowrank_equal_macs(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc global low rank at the parameter ratio and the MACs ratio magnitude pruning reaches there."""
    model = cell.fresh_copy()
    plan = select_ranks(model, cell.ratio, budget="joint", flops_ratio=pruning_macs_ratio(cell),
                        input_shape=tuple(cell.train_set.spec.image_shape))
    return cell.train_weights(decompose(model, plan))


def dense_sensitivity(cell: Cell, max_batches: int = 8) -> dict[str, float]:
    """The dense model's :func:`cstar.lowrank.layer_sensitivity` on the ``search`` attack's radius and steps, over
    the first ``max_batches`` batches of the training part in order (the same on every process and every resume:
    seeded, and rank 0's under torchrun)."""
    batches = data.make_loader(cell.train_part, cell.search.batch_size, train=False, device=cell.device)
    with torch.random.fork_rng(devices=[cell.device] if cell.device.type == "cuda" else []):
        torch.manual_seed(cell.seed)
        weights = layer_sensitivity(cell.dense, batches, cell.search.eps, steps=cell.search.attack_steps,
                                    max_batches=max_batches)
    return distributed.broadcast_object(weights)


@register("cstar_sensitivity", settings=("search", "finetune", "admm"))
def cstar_sensitivity(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """CSTAR with robustness-aware ranks: the global allocation weighs each layer by its sensitivity of the
    adversarial loss on the dense model (:func:`dense_sensitivity`)."""
    return _cstar(cell, layer_weights=dense_sensitivity(cell))


@register("lowrank_sensitivity")
def lowrank_sensitivity(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc decomposition with robustness-aware global ranks (:func:`dense_sensitivity`), then both phases."""
    model = cell.fresh_copy()
    return cell.train_weights(decompose(model, select_ranks(model, cell.ratio,
                                                            layer_weights=dense_sensitivity(cell))))
