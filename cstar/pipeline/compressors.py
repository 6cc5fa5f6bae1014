"""The compression methods that :func:`cstar.compare` runs, one registered function each.

A compressor turns the dense robust model into a compressed and adversarially
trained one at a parameter ratio. It takes one :class:`Cell` (the dense model,
the ratio, the data, the training settings, its own directory) and returns the
trained model and the training seconds of its phases (a compressor that saved
the model itself says where in ``cell.model_dir``). Every compressor gets the
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
scores learned on the adversarial loss, weights frozen), ``harp`` (HYDRA with each
layer's keep rate learned as well), ``magnitude`` (channels
pruned by filter norm), ``lowrank_global`` / ``lowrank_uniform`` (post-hoc
decomposition with global / uniform ranks), ``cstar_equal_macs`` /
``lowrank_equal_macs``: the low-rank methods held to the parameter ratio and,
at once, to the MACs ratio that magnitude pruning reaches there (equal size
and equal compute: pruning removes MACs faster than low rank does), and
``cstar_sensitivity`` / ``lowrank_sensitivity``: their global ranks weighed by
each layer's sensitivity of the adversarial loss
(:func:`cstar.lowrank.layer_sensitivity`), robustness-aware ranks; and
``lowrank_learned`` / ``cstar_learned``: ranks learned on the adversarial loss
(:func:`cstar.lowrank.learn_ranks`: a score per rank component, weights frozen),
then post-hoc decomposition / ADMM at those ranks;
``lowrank_conditioned``: ``lowrank_global`` trained with the factorised
layers kept well conditioned (CondLR's idea; :func:`cstar.lowrank.conditioning_penalty`).

A comparison at measured speed-ups (``CompareConfig(budget="latency")``)
runs the methods registered with a ``speed`` kind: they read the structure
they are held to from the cell (:meth:`Cell.ranks`, :attr:`Cell.pruning_ratio`:
the parameter ratio where ``cell.ratio`` is one), e.g. the method above with
``register("l1_channels", speed="pruning")`` and ``cell.pruning_ratio``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .. import data, distributed, prune
from .._core.errors import CstarError
from ..models._recorded import short
from .phases import train_phase, training_loader, training_seconds
from .speed import KINDS, SpeedTarget
from .admm import ADMMConfig
from .compress import CompressConfig, compress
from ..evaluation.counting import count_macs
from ..lowrank import RankPlan, condition_numbers, decompose, layer_sensitivity, learn_ranks, select_ranks
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
    ``model_dir``: where the compressor saved the model it returns, when it did
    (:func:`cstar.save`, inside ``out_dir``; cstar's saves ``out_dir/cstar/model``);
    None (the default): compare saves it in ``out_dir/model``.
    ``speed``: in a comparison at measured speed-ups (``CompareConfig(budget="latency")``, where ``ratio`` is
    the speed-up) the structures the methods are held to (:class:`cstar.pipeline.speed.SpeedTarget`: read
    them through :meth:`ranks` and :attr:`pruning_ratio`); None: ``ratio`` is a parameter ratio.
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
    model_dir: Path | None = None
    speed: SpeedTarget | None = None

    @property
    def device(self):
        return next(self.dense.parameters()).device

    def fresh_copy(self) -> nn.Module:
        """A copy of the dense model to compress."""
        return copy.deepcopy(self.dense)

    def ranks(self, model: nn.Module, method: str = "global") -> RankPlan:
        """The rank plan of ``model`` (a fresh copy) with allocation ``method``: at the parameter ratio, or the
        comparison's latency plan for the speed-up."""
        if self.speed is None:
            return select_ranks(model, self.ratio, method=method)
        return self.speed.plans[method]

    @property
    def pruning_ratio(self) -> float:
        """The parameter ratio to prune channels to: ``ratio``, or the one at which channel pruning met the
        speed-up (:func:`cstar.prune.ratio_for_speedup`)."""
        return self.ratio if self.speed is None else self.speed.pruning.params_ratio

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


def cell_model(cell: str | Path, row: dict) -> Path:
    """The save directory of the model of finished cell ``cell``, whose ``result.json`` is ``row``: where its
    ``model_dir`` says, inside the cell (``model``; ``cstar/model`` for CSTAR, where compress saved it),
    ``cell/model`` for a row from before that record."""
    place = row.get("model_dir", "model")
    if not isinstance(place, str) or not place or Path(place).is_absolute() or ".." in Path(place).parts:
        raise CstarError(f"{Path(cell) / 'result.json'} records the model_dir {short(place)}, not a path inside the "
                         "cell: the file is corrupt or crafted; delete the cell's directory to train it again")
    return Path(cell) / place


def recorded_model_dir(cell: Path, saved: Path | None) -> str:
    """What a cell's row records as its ``model_dir``: ``saved`` (where its compressor saved the model) relative
    to the cell, else ``model``, where compare saves it."""
    if saved is None:
        return "model"
    try:
        return Path(saved).resolve().relative_to(cell.resolve()).as_posix()
    except ValueError:
        raise CstarError(f"the compressor of cell {cell.name} saved its model in {saved}, outside the cell's "
                         f"directory {cell}: save it inside cell.out_dir") from None


Compressor = Callable[[Cell], "tuple[nn.Module, dict[str, float]]"]

# The built-in methods whose parameter ratio is a rank plan: compare checks that each ratio is reachable on the
# dense model's layers before any work, as compress does (:func:`cstar.lowrank.check_reachable`).
RANK_PLANNED = ("cstar", "lowrank_global", "lowrank_uniform", "cstar_equal_macs", "lowrank_equal_macs",
                "cstar_sensitivity", "lowrank_sensitivity", "lowrank_learned", "cstar_learned", "lowrank_conditioned")


@dataclass(frozen=True)
class _Entry:
    function: Compressor
    settings: tuple[str, ...]  # the CompareConfig sections a cell's model depends on (recorded, checked on resume)
    speed: str | None  # how it meets a measured speed-up (cstar.pipeline.speed.KINDS); None: it cannot


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, *, settings: tuple[str, ...] = ("search", "finetune"),
             speed: str | None = None) -> Callable[[Compressor], Compressor]:
    """Decorator: register ``function(cell) -> (model, {phase: seconds})`` as the compression method ``name``.

    ``settings``: the comparison's sections the method's result depends on
    (``search``, ``finetune``, ``admm``), recorded with each cell so that a
    resume with other ones is refused. ``speed``: how the method meets a
    speed-up measured on a runtime (a comparison with ``budget="latency"``):
    ``"global"`` / ``"uniform"`` (it factorises by :meth:`Cell.ranks` with that
    allocation) or ``"pruning"`` (it prunes to :attr:`Cell.pruning_ratio`);
    None (default): it cannot, and such a comparison refuses it. Registering a
    name twice is an error.
    """
    if not isinstance(name, str) or not name.isidentifier() or name == "dense":
        raise CstarError(f"compressor name {name!r}: use an identifier other than 'dense', e.g. 'l1_channels'")
    unknown = sorted(set(settings) - {"search", "finetune", "admm"})
    if unknown:
        raise CstarError(f"compressor {name}: unknown settings {', '.join(unknown)}; choose from search, finetune, "
                         "admm")
    if speed is not None and speed not in KINDS:
        raise CstarError(f"compressor {name}: unknown speed {speed!r}; choose from {', '.join(KINDS)}, or None")

    def add(function: Compressor) -> Compressor:
        if name in _REGISTRY:
            raise CstarError(f"a compressor named {name!r} is already registered: choose another name")
        _REGISTRY[name] = _Entry(function, tuple(settings), speed)
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


def speed_of(name: str) -> str | None:
    """How method ``name`` meets a measured speed-up (``"global"``, ``"uniform"``, ``"pruning"``; None: it
    cannot)."""
    check_names([name])
    return _REGISTRY[name].speed


def check_names(methods: list[str], allow_dense: bool = False) -> None:
    """One line naming the unknown methods of ``methods`` and the known ones."""
    known = (("dense",) if allow_dense else ()) + names()
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise CstarError(f"unknown method(s) {', '.join(map(str, unknown))}: choose from {', '.join(known)} "
                         "(or register one with cstar.compressors.register)")


def _cstar(cell: Cell, plan: RankPlan | None = None, search: TrainConfig | None = None,
           **target) -> tuple[nn.Module, dict[str, float]]:
    """:func:`cstar.compress` of the dense model in ``out_dir/cstar`` at ``cell.ratio`` and ``target`` (budget
    settings of :class:`cstar.CompressConfig`), with ``plan``'s ranks when given and ADMM trained with ``search``
    (default ``cell.search``); the trained model (saved by compress: ``cell.model_dir``) and its phases' seconds."""
    if cell.speed is not None:  # held to the comparison's latency plan
        plan, target = cell.speed.plans["global"], {**target, **cell.speed.budget}
    settings = CompressConfig(ratio=cell.ratio, search=search or cell.search, finetune=cell.finetune,
                              admm=cell.admm, eval_phases=[], **target)
    phases = compress(cell.fresh_copy(), cell.train_set, None, settings, cell.out_dir / "cstar", pretrained=True,
                      resume=True, val_size=len(cell.train_set) - len(cell.train_part), seed=cell.seed,
                      plan=plan)["phases"]
    cell.model_dir = cell.out_dir / "cstar" / "model"
    model = load(cell.model_dir, model=cell.fresh_copy()).to(cell.device)
    return model, {"search": phases["search"]["seconds"], "finetune": phases["finetune"]["seconds"]}


def pruning_macs_ratio(cell: Cell) -> float:
    """The MACs ratio (dense / pruned) that magnitude channel pruning reaches at ``cell.ratio`` parameters: the
    speed target of the equal-MACs methods (computed from the dense model; nothing is trained)."""
    shape = tuple(cell.train_set.spec.image_shape)  # magnitude_prune prunes a copy; count_macs restores modes
    return count_macs(cell.dense, shape) / count_macs(prune.magnitude_prune(cell.dense, cell.ratio, shape), shape)


@register("cstar", settings=("search", "finetune", "admm"), speed="global")
def cstar_admm(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """ADMM adversarial training under the rank constraints (``search`` settings), the exact decomposition, then
    fine-tuning: :func:`cstar.compress`."""
    return _cstar(cell)


def learned_pruning(cell: Cell, prune_function: Callable) -> tuple[nn.Module, dict[str, float]]:
    """``prune_function(model, loader, ratio, config, ...)`` (a pruning learned with the weights frozen, as
    :func:`cstar.prune.hydra_prune`) run resumably with the ``search`` settings in ``out_dir/search``, then the
    weights fine-tuned."""
    loader = training_loader(cell.train_part, cell.search, cell.device, cell.seed)
    model = prune_function(cell.fresh_copy(), loader, cell.pruning_ratio, cell.search, val=cell.val,
                           out_dir=cell.out_dir / "search", resume=True, teacher=cell.dense)
    return model, {"search": logged_seconds(cell.out_dir / "search"), "finetune": cell.train(model, "finetune")}


def logged_seconds(out: Path) -> float:
    """The training seconds a :func:`cstar.fit` run logged in ``out/metrics.jsonl`` (rank 0's; other nodes may
    not see it, and their figure is unused)."""
    log = out / "metrics.jsonl"
    history = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return round(training_seconds(history), 1)


@register("hydra", speed="pruning")
def hydra(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Channel scores learned on the adversarial loss with the weights frozen (``search``), the lowest-scored
    channels removed, then the weights fine-tuned."""
    return learned_pruning(cell, prune.hydra_prune)


@register("magnitude", speed="pruning")
def magnitude(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Global channel pruning by filter norm, then both phases on the weights."""
    return cell.train_weights(prune.magnitude_prune(cell.fresh_copy(), cell.pruning_ratio))


@register("lowrank_global", speed="global")
def lowrank_global(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc decomposition with globally allocated ranks (no ADMM), then both phases on the factors."""
    model = cell.fresh_copy()
    return cell.train_weights(decompose(model, cell.ranks(model, "global")))


@register("lowrank_uniform", speed="uniform")
def lowrank_uniform(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc decomposition with the same rank fraction in every layer, then both phases on the factors."""
    model = cell.fresh_copy()
    return cell.train_weights(decompose(model, cell.ranks(model, "uniform")))


@register("cstar_equal_macs", settings=("search", "finetune", "admm"))
def cstar_equal_macs(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """CSTAR held to the parameter ratio and, at once, to the MACs ratio magnitude pruning reaches there (the
    joint budget): equal size and equal compute against pruning."""
    return _cstar(cell, budget="joint", macs_ratio=pruning_macs_ratio(cell))


@register("lowrank_equal_macs")
def lowrank_equal_macs(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """Post-hoc global low rank at the parameter ratio and the MACs ratio magnitude pruning reaches there."""
    model = cell.fresh_copy()
    plan = select_ranks(model, cell.ratio, budget="joint", macs_ratio=pruning_macs_ratio(cell),
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


@register("harp", speed="pruning")
def harp(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """HARP: each layer's keep rate learned with the channel scores on the adversarial loss under a size penalty,
    weights frozen (``search``); the channels at the learned rates kept, then the weights fine-tuned."""
    return learned_pruning(cell, prune.harp_prune)


def learned_ranks(cell: Cell, settings: TrainConfig, out: Path) -> tuple[RankPlan, float]:
    """Ranks of the dense model at ``cell.ratio`` learned on the adversarial loss (:func:`cstar.lowrank.learn_ranks`)
    with ``settings``, resumably in ``out``, and the seconds they trained."""
    loader = training_loader(cell.train_part, settings, cell.device, cell.seed)
    plan = learn_ranks(cell.dense, loader, cell.ratio, settings, val=cell.val, out_dir=out, resume=True,
                       teacher=cell.dense)
    return plan, logged_seconds(out)


SCORE_SHARE = 1 / 8  # the share of the search epochs (rounded up) in which the learned-rank methods learn ranks


def split_search(cell: Cell, method: str) -> tuple[TrainConfig, TrainConfig]:
    """The ``search`` settings of a learned-rank method, split: ``ceil(epochs * SCORE_SHARE)`` epochs for the rank
    scores, the others for the weights (ADMM for ``cstar_learned``, the factors for ``lowrank_learned``)."""
    epochs = cell.search.epochs
    if epochs < 2:
        raise CstarError(f"{method} splits the search epochs between its rank scores and its weights: use search "
                         f"epochs >= 2 (got {epochs})")
    scores = math.ceil(epochs * SCORE_SHARE)
    return replace(cell.search, epochs=scores), replace(cell.search, epochs=epochs - scores)


@register("lowrank_learned")
def lowrank_learned(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """``cstar_learned`` without ADMM: ranks learned on the adversarial loss with the weights frozen in
    ``ceil(search.epochs / 8)`` of the ``search`` epochs, the post-hoc decomposition at those ranks, its factors
    trained in the other search epochs, then fine-tuned (the same budget as every method)."""
    scores, factors = split_search(cell, "lowrank_learned")
    plan, seconds = learned_ranks(cell, scores, cell.out_dir / "scores")
    model, phases = replace(cell, search=factors).train_weights(decompose(cell.fresh_copy(), plan))
    return model, {"search": round(seconds + phases["search"], 1), "finetune": phases["finetune"]}


@register("cstar_learned", settings=("search", "finetune", "admm"))
def cstar_learned(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """CSTAR at learned ranks: the scores learn in ``ceil(search.epochs / 8)`` of the ``search`` epochs, ADMM trains
    under the learned ranks in the others (the same budget as every method), then the decomposition and
    fine-tuning."""
    if cell.admm.reselect:
        raise CstarError(f"cstar_learned keeps its learned ranks: use admm reselect 0 (got {cell.admm.reselect})")
    scores, admm = split_search(cell, "cstar_learned")
    plan, seconds = learned_ranks(cell, scores, cell.out_dir / "scores")
    model, phases = _cstar(cell, plan=plan, search=admm)
    return model, {**phases, "search": round(seconds + phases["search"], 1)}


CONDITION_WEIGHT = 0.1  # lowrank_conditioned's penalty weight where the comparison's settings leave it at 0


@register("lowrank_conditioned", speed="global")
def lowrank_conditioned(cell: Cell) -> tuple[nn.Module, dict[str, float]]:
    """``lowrank_global`` with both phases' ``condition_weight`` on (the settings', or :data:`CONDITION_WEIGHT`
    where they leave it 0): factors near orthonormal, condition numbers bounded by ``max_condition``. The model's
    ``cstar_conditioning`` holds each factorised layer's condition number before and after training."""
    model = cell.fresh_copy()
    model = decompose(model, cell.ranks(model, "global")).to(cell.device)
    before = condition_numbers(model)
    conditioned = {phase: replace(settings, condition_weight=settings.condition_weight or CONDITION_WEIGHT)
                   for phase, settings in (("search", cell.search), ("finetune", cell.finetune))}
    model, seconds = replace(cell, **conditioned).train_weights(model)
    model.cstar_conditioning = {"max_condition": cell.finetune.max_condition, "before": before,
                                "after": condition_numbers(model)}
    return model, seconds
