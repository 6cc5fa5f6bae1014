"""ADMM for adversarial training under low-rank constraints (CSTAR's Algorithm 2).

The problem ``min_W E[max_delta CE(f(x + delta; W), y)]`` subject to ``W_l`` having
Tucker-2 (conv) or SVD (linear, 1x1 conv) ranks ``r_l`` is split, per compressed
layer, into the weights ``W`` (trained by SGD), an auxiliary ``Z`` (the projection
onto the rank constraint) and a scaled dual ``U``:

- W-step, every optimiser step: the adversarial loss plus
  ``rho/2 * sum_l ||W_l - Z_l + U_l||^2`` (:meth:`ADMM.penalty`);
- Z-step, every ``interval`` steps (default once an epoch):
  ``Z_l = Proj_{r_l}(W_l + U_l)`` (:func:`cstar.lowrank.tucker2_project` or
  :func:`cstar.lowrank.svd_project`: Algorithm 1);
- U-step, right after: ``U_l <- U_l + W_l - Z_l``.

With ``decoupled=True`` the penalty leaves the loss (and so the optimiser's
normalisation, as AdamW's weight decay leaves Adam's): after every optimiser
step ``W_l <- W_l - rho * (W_l - Z_l + U_l)``, ``rho`` then being the fraction
of the way to ``Z_l - U_l`` moved per step (at most 1). Under Adam the coupled
penalty's gradient also enters the second-moment estimate, which shrinks the
steps the adversarial loss gets as ``rho`` grows; the decoupled pull does not.

With ``condition_weight`` > 0 the penalty also bounds how well conditioned the
constrained layers are (as :class:`cstar.TrainConfig`'s ``condition_weight``
bounds the factorised ones): ``condition_weight * sum_l relu(log(sigma_1 /
sigma_r) - log(max_condition))^2`` over the ``r`` leading singular values of
``W_l``'s (C_out, C_in*kh*kw) matricisation, ``r`` the planned rank (for
Tucker-2, ``min(r_out, r_in*kh*kw)``): the part that the projection keeps
(:func:`cstar.lowrank._condition.constrained_condition_penalty`; an SVD of
each constrained weight every step). It stays in the loss when ``decoupled``.

``rho`` may grow by ``rho_growth`` at every Z-step up to ``rho_max``; ranks may be
re-selected globally at the first ``reselect`` Z-steps. The primal residual
``||W_l - Z_l|| / ||W_l||`` of every layer is recorded at every Z-step. With
SGD the penalty pulls ``W`` towards ``Z - U`` by a fraction ``lr * rho`` a step,
so ``rho`` must be large enough for the run's length (``lr * rho * steps`` of
order 1): when the mean residual has not fallen by 10% after 6 Z-steps, a
warning says so.

Under torchrun the weights are the same on every rank (DDP keeps them in sync),
and ``Z``, ``U`` and re-selected plans are broadcast from rank 0 after each
Z-step, so that every rank adds the same penalty even where the projection's
eigendecompositions are not bitwise reproducible.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .. import distributed
from .._core.checks import check_fields, check_mapping, flag, integer, number
from .._core.errors import CstarError, check_options
from ..lowrank import RankPlan, RankSpec, select_ranks, svd_project, tucker2_project
from ..lowrank._condition import constrained_condition_penalty
from ..training.config import RULES as TRAIN_RULES
from ..training.fit import TrainHook


# What each field of ADMMConfig must be (cstar._core.checks); ``--admm`` sections and config files land here too.
_RULES = {
    "rho": number(above=0, fix="the penalty weight, e.g. 1e-3 (the default)"),
    "rho_growth": number(at_least=1, fix="1 keeps rho constant"), "rho_max": number(above=0),
    "interval": integer(1, optional=True, fix="optimiser steps between Z-steps, or none: once an epoch"),
    "n_iter": integer(0, fix="HOOI sweeps (0: plain HOSVD)"),
    "reselect": integer(0, fix="Z-steps that re-select ranks"),
    "decoupled": flag(),
}


@dataclass
class ADMMConfig:
    """ADMM settings. ``interval=None`` runs the Z/U steps once an epoch;
    ``n_iter`` HOOI sweeps refine each Tucker-2 projection (0: plain HOSVD);
    ``decoupled`` pulls the weights after each optimiser step instead of adding
    the penalty to the loss (``rho``, ``rho_max`` then fractions per step, <= 1)."""

    rho: float = 1e-3
    rho_growth: float = 1.0
    rho_max: float = 1.0
    interval: int | None = None
    n_iter: int = 0
    reselect: int = 0
    decoupled: bool = False

    def __post_init__(self) -> None:
        check_fields(self, _RULES)
        if self.rho_max < self.rho:
            raise CstarError(f"rho_max={self.rho_max} is below rho={self.rho}: raise rho_max")
        if self.decoupled and self.rho_max > 1:
            raise CstarError(f"rho_max={self.rho_max}: with decoupled=True rho is the fraction of the way to the "
                             "constraint moved per step, so rho and rho_max must be <= 1")

    @classmethod
    def from_dict(cls, values: dict) -> "ADMMConfig":
        """Build from a dict (an ``--admm`` section, a YAML config); unknown keys are an error."""
        check_mapping(values, "the ADMM settings", "{rho: 0.01, rho_growth: 1.2}")
        check_options(values, [f.name for f in fields(cls)], "ADMM")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def project(weight: torch.Tensor, kind: str, ranks: tuple[int, ...], n_iter: int = 0) -> torch.Tensor:
    """The nearest weight (as the decomposition finds it) of the planned ranks."""
    if kind == "tucker2":
        return tucker2_project(weight, tuple(ranks), n_iter=n_iter)
    if kind == "svd":
        return svd_project(weight, ranks[0])
    raise CstarError(f"cannot project a layer of kind '{kind}': expected 'tucker2' or 'svd'")


class ADMM(TrainHook):
    """ADMM state (``Z``, ``U``, ``rho``) for the compressed layers of ``plan``.

    ``steps_per_epoch`` sets the default interval. ``rank_spec`` (the
    :class:`cstar.lowrank.RankSpec` ``plan`` was made for) is needed only when
    ``config.reselect > 0``. ``condition_weight`` (default 0, off) and
    ``max_condition`` bound the constrained layers' condition numbers (see the
    module docstring; :func:`cstar.compress` passes its ADMM phase's training
    settings of those names).
    """

    def __init__(self, model: nn.Module, plan: RankPlan, config: ADMMConfig, steps_per_epoch: int,
                 rank_spec: RankSpec | None = None, *, condition_weight: float = 0.0,
                 max_condition: float = 10.0) -> None:
        if config.reselect and rank_spec is None:
            raise CstarError("ADMM rank re-selection needs the RankSpec the plan was made for: pass rank_spec")
        if config.reselect and rank_spec.budget == "latency":
            raise CstarError("ADMM rank re-selection with a latency budget would time the runtime beside training: "
                             "set reselect=False, or use a parameter or MACs budget")
        self.condition_weight = TRAIN_RULES["condition_weight"]("condition_weight", condition_weight)
        self.max_condition = TRAIN_RULES["max_condition"]("max_condition", max_condition)
        self.config, self.rank_spec = config, rank_spec
        self.device = next(model.parameters()).device
        self.interval = config.interval or steps_per_epoch
        self.rho = config.rho
        self.z_steps = 0
        self.history: list[dict] = []
        self._warned = False
        self._set_plan(model, plan)
        with torch.no_grad():
            self.Z = {name: self._project(name, w.detach()) for name, w in self._weights(model).items()}
            self.U = {name: torch.zeros_like(w) for name, w in self._weights(model).items()}
        self._sync()

    def _set_plan(self, model: nn.Module, plan: RankPlan) -> None:
        modules = dict(model.named_modules())
        missing = [name for name in plan.layers if name not in modules]
        if missing:
            raise CstarError(f"the rank plan names layers the model lacks ({', '.join(missing[:3])}): "
                             "make the plan from this model with select_ranks")
        self.plan = plan
        self.names = [name for name, layer in plan.layers.items() if layer.kind != "dense"]
        if not self.names:
            raise CstarError("the rank plan compresses no layer: choose a higher ratio")

    def _weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        modules = dict(model.named_modules())
        return {name: modules[name].weight for name in self.names}

    def _sync(self) -> None:
        """Rank 0's ``Z`` and ``U`` on every rank (no-op in one process)."""
        distributed.broadcast_tensors([self.Z[n] for n in self.names] + [self.U[n] for n in self.names])

    def _project(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        layer = self.plan.layers[name]
        return project(weight, layer.kind, layer.ranks, self.config.n_iter)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """``rho/2 * sum_l ||W_l - Z_l + U_l||^2`` (not when decoupled) plus the conditioning term (when
        ``condition_weight``): a differentiable scalar, or None when both are off."""
        terms = []
        if not self.config.decoupled:
            total = sum((w - self.Z[n] + self.U[n]).pow(2).sum() for n, w in self._weights(model).items())
            terms.append(0.5 * self.rho * total)
        if self.condition_weight:
            terms.append(self.condition_weight * self.condition_penalty(model))
        return sum(terms) if terms else None

    def condition_penalty(self, model: nn.Module) -> torch.Tensor:
        """``sum_l relu(log(sigma_1 / sigma_r) - log(max_condition))^2`` over the constrained layers, ``r`` each
        one's planned rank of its (C_out, C_in*kh*kw) matricisation (unweighted)."""
        terms = []
        for name, w in self._weights(model).items():
            layer = self.plan.layers[name]
            rank = min(layer.ranks[0], layer.ranks[1] * w[0, 0].numel()) if layer.kind == "tucker2" else layer.ranks[0]
            terms.append(constrained_condition_penalty(w, rank, self.max_condition))
        return torch.stack(terms).sum()

    def after_step(self, model: nn.Module, step: int) -> None:
        if self.config.decoupled:
            with torch.no_grad():
                for name, w in self._weights(model).items():
                    w.sub_(self.rho * (w - self.Z[name] + self.U[name]))
        if step % self.interval == 0:
            self.z_step(model, step)

    @torch.no_grad()
    def z_step(self, model: nn.Module, step: int | None = None) -> dict | None:
        """Z- and U-steps (and rank re-selection, at first); returns the residual record.

        Weights that are not finite (a diverging run, which :func:`cstar.fit`
        stops at its next check) are not projected: None, and nothing changes.
        """
        if not all(torch.isfinite(w).all() for w in self._weights(model).values()):
            return None
        if self.z_steps < self.config.reselect:
            self._reselect(model)
        residuals = {}
        for name, w in self._weights(model).items():
            w = w.detach()
            self.Z[name] = self._project(name, w + self.U[name])
            self.U[name] += w - self.Z[name]
            residuals[name] = ((w - self.Z[name]).norm() / w.norm().clamp_min(1e-12)).item()
        self._sync()
        self.z_steps += 1
        record = {"z_step": self.z_steps, "step": step, "rho": self.rho,
                  "residual_mean": sum(residuals.values()) / len(residuals),
                  "residual_max": max(residuals.values()), "residual": residuals}
        self.history.append(record)
        self.rho = min(self.config.rho_max, self.rho * self.config.rho_growth)
        return record

    def _reselect(self, model: nn.Module) -> None:
        """New global ranks from the current weights; a newly compressed layer's dual starts at 0
        (every Z is recomputed by the Z-step that follows)."""
        self._set_plan(model, distributed.broadcast_object(select_ranks(model, self.rank_spec)))
        self.U = {n: self.U.get(n, torch.zeros_like(w)) for n, w in self._weights(model).items()}

    def after_epoch(self, model: nn.Module, record: dict) -> None:
        if len(self.history) >= 6 and not self._warned:
            first, last = self.history[0]["residual_mean"], self.history[-1]["residual_mean"]
            if last > 0.9 * first:
                self._warned = True
                warnings.warn(f"the ADMM residual is not falling ({first:.3f} at the first Z-step, {last:.3f} after "
                              f"{len(self.history)}): raise rho or rho_growth (rho is now {self.rho:.3g}; with SGD the "
                              "pull towards the constraint is about lr * rho a step)", stacklevel=2)
        if self.history:
            last = self.history[-1]
            record.update(admm_rho=last["rho"], admm_residual_mean=last["residual_mean"],
                          admm_residual_max=last["residual_max"], admm_z_steps=self.z_steps)

    @torch.no_grad()
    def residuals(self, model: nn.Module) -> dict[str, float]:
        """``||W_l - Proj(W_l)|| / ||W_l||`` now, per layer: how far W is from the constraint."""
        return {n: ((w - self._project(n, w)).norm() / w.norm().clamp_min(1e-12)).item()
                for n, w in self._weights(model).items()}

    @torch.no_grad()
    def project_weights(self, model: nn.Module) -> None:
        """Replace every compressed layer's weight by its projection (the final hard projection)."""
        for name, w in self._weights(model).items():
            w.copy_(self._project(name, w))

    def state_dict(self) -> dict:
        return {"Z": self.Z, "U": self.U, "rho": self.rho, "z_steps": self.z_steps, "history": self.history,
                "plan": self.plan.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.plan = RankPlan.from_dict(state["plan"])
        self.names = [name for name, layer in self.plan.layers.items() if layer.kind != "dense"]
        # a checkpoint is read on the CPU: the state goes back to the weights' device
        self.Z = {n: z.to(self.device) for n, z in state["Z"].items()}
        self.U = {n: u.to(self.device) for n, u in state["U"].items()}
        self.rho, self.z_steps, self.history = state["rho"], state["z_steps"], state["history"]
