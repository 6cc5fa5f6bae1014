"""Ranks learned on the adversarial loss: a score per rank component, trained with the weights frozen.

HYDRA (``cstar.prune``) learns which channels to keep; this learns which rank
components to keep. Every compressible layer (those :func:`select_ranks` plans)
is written in its full bases as a sum of rank components: an SVD layer as its
singular pairs, a Tucker-2 kernel as ``core x0 u_out x1 u_in`` in the full
HOSVD bases, whose components are the output-mode columns of ``u_out`` and the
input-mode columns of ``u_in``. With every component kept, the sum is the
layer's weight.

Each component has a score: its energy times ``exp(shift)``, with one learned
``shift`` per component, initialised at 0 (so the scores start as the spectra).
A Tucker-2 core block ``(j, k)`` scores its energy times
``exp(shift_out[j] + shift_in[k])``. A rank keeps the leading components of
its mode (the decomposition keeps them), so a component's score counts once
those before it are kept.

Allocation: the greedy of :func:`select_ranks` on the layers' shares of their
scores in place of their energy shares (the log of the kept share gained per
unit of cost, with the exact parameter and MACs costs), so the plan is never
over budget and ends within one rank step of it. Untrained (every shift 0),
the scores are the energies and the plan is :func:`select_ranks`'s exactly.

Training (:func:`learn_ranks`, with :func:`cstar.fit`): the model's weights
are frozen; each layer's weight is rebuilt as the sum of its components, each
multiplied by the hard 0/1 mask of the current allocation (the layer's ranks),
whose gradient is handed straight through to the component's shift. The
network trained is thus the post-hoc decomposition at the current ranks, and
a component whose mask would lower the adversarial loss gains score. The
allocation is re-run whenever a shift changes (once per optimiser step: one
greedy pass, about 40 ms for a width-64 ResNet-18 on one CPU core). Weight
decay pulls the shifts back to 0, towards the energy allocation. BatchNorm
statistics update as in any training; the model given is not modified.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .._core.checks import check_finite
from .._core.errors import CstarError
from ..training.fit import TrainConfig, fit
from ._plan import RankPlan
from ._ranks import allocation, retained_svd
from ._spec import RankSpec
from ._tucker import _check_kernel, _core, _expand, _factors, _gram, _top_eigvecs, energy_table


class _Components(nn.Module):
    """One layer's weight as a sum of rank components: its full bases (buffers) and one shift per component.

    ``shifts`` holds one tensor per mode: (C_out,) and (C_in,) for Tucker-2, (min(out, in),) for SVD.
    """

    def __init__(self, module: nn.Conv2d | nn.Linear, kind: str) -> None:
        super().__init__()
        weight = module.weight.detach()
        self.kind, self.shape = kind, tuple(weight.shape)
        work = _check_kernel(weight if weight.dim() == 4 else weight[:, :, None, None])
        if kind == "tucker2":
            u_out, u_in = _factors(work, self.shape[0], self.shape[1], 0)
            bases = {"core": _core(work, u_out, u_in), "u_out": u_out, "u_in": u_in}
            sizes = self.shape[:2]
        else:  # the smaller side's Gram eigenvectors q: side = q @ (q.T @ side), rows of q.T @ side = s_i v_i
            matrix = work[:, :, 0, 0]
            self.wide = matrix.shape[0] <= matrix.shape[1]
            side = matrix if self.wide else matrix.T
            q = _top_eigvecs(_gram(side), side.shape[0])
            bases = {"q": q, "scaled": q.T @ side}
            sizes = (side.shape[0],)
        for name, tensor in bases.items():  # recomputed from the frozen weight, so not saved in checkpoints
            self.register_buffer(name, tensor.to(weight.dtype), persistent=False)
        self.shifts = nn.ParameterList([nn.Parameter(torch.zeros(n, device=weight.device)) for n in sizes])

    def weight(self, masks: list[torch.Tensor]) -> torch.Tensor:
        """The layer's weight with each component multiplied by its mode's ``masks`` entry (shape of the weight)."""
        if self.kind == "tucker2":
            m_out, m_in = (m.to(self.core.dtype) for m in masks)
            return _expand(self.core * m_out[:, None, None, None] * m_in[None, :, None, None], self.u_out, self.u_in)
        side = self.q @ (masks[0].to(self.q.dtype)[:, None] * self.scaled)
        return (side if self.wide else side.T).reshape(self.shape)

    def shares(self, blocks: torch.Tensor) -> np.ndarray:
        """The share of the layer's scores kept at every rank (or rank pair), indexed like its energy table.

        ``blocks``: the components' energies, float64 on the CPU ((n,) singular, (C_out, C_in) core blocks).
        """
        scales = [torch.exp(s.detach().double().cpu()) for s in self.shifts]
        if self.kind == "tucker2":
            return energy_table(blocks * scales[0][:, None] * scales[1][None, :]).numpy()
        return retained_svd(blocks * scales[0])

    def kept(self, state: tuple[int, ...] | None) -> list[torch.Tensor]:
        """Per mode, the 0/1 mask of the leading ``state[mode]`` components (all ones for a dense layer)."""
        ranks = [s.numel() for s in self.shifts] if state is None else state
        return [(torch.arange(s.numel(), device=s.device) < r).float() for s, r in zip(self.shifts, ranks)]


class RankScoredModel(nn.Module):
    """``model`` with its weights frozen and each compressible layer's rank components masked by learned scores.

    ``ratio``: the target, a number or a :class:`RankSpec` (as :func:`select_ranks`
    takes it; ``method="global"``). The shifts of the scores are this module's only
    trainable parameters; ``forward(x)`` is ``model(x)`` with every compressible
    layer at the ranks of the current allocation, the masks' gradients going
    straight through to the shifts. :meth:`plan` is the allocation of the current
    scores. ``model`` is used in place (pass a copy to keep the original).
    """

    def __init__(self, model: nn.Module, ratio: float | RankSpec) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise CstarError(f"learned ranks need an nn.Module, got {type(model).__name__}")
        check_finite(model, "learned ranks: the model")
        spec = ratio if isinstance(ratio, RankSpec) else RankSpec(ratio)
        if spec.method != "global":
            raise CstarError(f"learned ranks replace the global allocation's energies by scores; method="
                             f"{spec.method!r} has none: use method='global'")
        if spec.budget == "latency":
            raise CstarError("learned ranks take a parameter or MACs budget (a latency plan times every plan it "
                             "makes, too slow inside training): use budget='params' or 'macs'")
        self.allocation = allocation(model, spec)  # refuses an unreachable target before any work
        self.model = model
        model.requires_grad_(False)
        modules = dict(model.named_modules())
        self.components = nn.ModuleList(_Components(modules[layer.name], layer.kind)
                                        for layer in self.allocation.layers)
        self.cstar_config = getattr(model, "cstar_config", None)
        self._seen: tuple | None = None  # the shifts' versions and device the masks below were made for
        self._kept: list[list[torch.Tensor]] = []

    def _states(self) -> list:
        """The greedy allocation of the current scores: per layer its ranks, or None for dense."""
        for layer, components in zip(self.allocation.layers, self.components):
            layer.objective = components.shares(layer.blocks)
        return self.allocation.allocator.greedy()

    def masks(self) -> list[list[torch.Tensor]]:
        """Per layer and mode, the 0/1 masks of the current allocation, with identity gradient to the shifts;
        the allocation is re-run when a shift has changed since the last call."""
        shifts = [s for components in self.components for s in components.shifts]
        seen = (shifts[0].device, tuple(s._version for s in shifts))
        if seen != self._seen:
            self._kept = [c.kept(state) for c, state in zip(self.components, self._states())]
            self._seen = seen
        return [[hard + (s - s.detach()) for hard, s in zip(kept, c.shifts)]
                for kept, c in zip(self._kept, self.components)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = {f"{layer.name}.weight" if layer.name else "weight": components.weight(masks)
                   for layer, components, masks in zip(self.allocation.layers, self.components, self.masks())}
        return functional_call(self.model, weights, (x,))

    def plan(self) -> RankPlan:
        """The :class:`RankPlan` of the current scores (``method="learned"``; with untrained scores, the plan of
        :func:`select_ranks`), for :func:`decompose`."""
        return self.allocation.plan(self._states(), "learned")


def learn_ranks(model: nn.Module, train_loader, ratio: float | RankSpec, config: TrainConfig, *,
                val: tuple[torch.Tensor, torch.Tensor] | None = None, out_dir: str | Path | None = None,
                resume: bool = False, teacher: nn.Module | None = None) -> RankPlan:
    """The rank plan of ``model`` for ``ratio`` chosen by scores learned on ``config``'s adversarial loss.

    ``ratio`` is a number or a whole :class:`RankSpec` (parameter, MACs or joint
    budget, exclusions, ``multiple_of``...). The scores of a copy of ``model``
    (:class:`RankScoredModel`, see the module docstring) are trained by
    :func:`cstar.fit` with ``config`` on ``train_loader``, ``val`` for its
    per-epoch check, ``out_dir`` for its metrics and checkpoints (``resume=True``
    continues from them) and ``teacher`` for ``config.distill``. Returns the plan
    of the trained scores (``method="learned"``), as :func:`select_ranks` returns
    one; ``model`` is not modified. Pass the plan to :func:`decompose` or
    :func:`cstar.compress`.
    """
    if not isinstance(config, TrainConfig):
        raise CstarError(f"config must be a cstar.TrainConfig, got {type(config).__name__}")
    if train_loader is None:
        raise CstarError("learn_ranks trains scores on adversarial examples: pass a train_loader")
    scored = RankScoredModel(copy.deepcopy(model) if isinstance(model, nn.Module) else model, ratio)
    fit(scored, train_loader, config, val=val, out_dir=out_dir, resume=resume, teacher=teacher)
    return scored.plan()
