"""How well conditioned the factorised layers are, and a penalty that keeps them so.

Low-rank weights lose robustness through exploding singular values; keeping the
factors near orthonormal and the layer's spectrum bounded keeps them well
conditioned (CondLR, Savostianova et al. 2023; a bound on each layer's
condition number, Schotthöfer et al. 2025).

A layer's *operator* is its weight matricised as (C_out, C_in*kh*kw); a
factorised layer's has rank r at most ``rank`` (:class:`LowRankLinear`,
:class:`LowRankConv1x1`) or ``min(r_out, r_in*kh*kw)`` (:class:`Tucker2Conv2d`).
Its *effective condition number* is ``sigma_1 / sigma_r`` over those r
singular values: the whole operator's, whatever the scale of its factors. They
are found without forming the operator: each outer factor ``U = Q R`` (reduced
QR), and the operator's nonzero singular values are those of the small reduced
core (``core x0 R_out x1 R_in`` unfolded on mode 0 for Tucker-2,
``R_last @ R_first.T`` for the SVD layers), since ``Q``'s orthonormal columns
leave singular values unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._core.checks import number
from .._core.errors import CstarError
from ._layers import LowRankConv1x1, LowRankLinear, Tucker2Conv2d

FACTORISED = (Tucker2Conv2d, LowRankConv1x1, LowRankLinear)
MAX_CONDITION = number(above=1, fix="the largest condition number a layer keeps without penalty, e.g. 10")


def _matrix(weight: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A linear weight, or a 1x1 conv's (out, in, 1, 1) as (out, in), in ``dtype`` (at least float32)."""
    matrix = weight if weight.dim() == 2 else weight[:, :, 0, 0]
    if dtype is None and matrix.dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # QR and SVD need single precision or better
    return matrix if dtype is None else matrix.to(dtype)


def _upper(factor: torch.Tensor) -> torch.Tensor:
    """``R`` of ``factor = Q R`` (reduced QR; differentiable)."""
    return torch.linalg.qr(factor, mode="reduced").R


def orthonormal_factors(layer: nn.Module) -> list[torch.Tensor]:
    """The factors (rows, r) that a decomposition makes orthonormal: Tucker-2's ``u_in`` (``first``'s weight,
    transposed) and ``u_out`` (``last``'s); none for the SVD layers, whose factors share the singular values."""
    if not isinstance(layer, Tucker2Conv2d):
        return []
    return [_matrix(layer.first.weight, None).T, _matrix(layer.last.weight, None)]


def operator_singular_values(layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The r nonzero singular values of a factorised layer's operator, descending (differentiable).

    ``layer`` is a :class:`Tucker2Conv2d` (r = min(r_out, r_in*kh*kw)),
    :class:`LowRankConv1x1` or :class:`LowRankLinear` (r = rank); computed in
    ``dtype`` (default: the weights', at least float32).
    """
    if isinstance(layer, Tucker2Conv2d):
        r_in = _upper(_matrix(layer.first.weight, dtype).T)  # (r_in, r_in)
        r_out = _upper(_matrix(layer.last.weight, dtype))  # (r_out, r_out)
        core = layer.core.weight.to(r_out.dtype)  # (r_out, r_in, kh, kw)
        reduced = torch.einsum("pa,abhw,qb->pqhw", r_out, core, r_in)
        matrix = reduced.reshape(reduced.shape[0], -1)
    elif isinstance(layer, (LowRankConv1x1, LowRankLinear)):
        matrix = _upper(_matrix(layer.last.weight, dtype)) @ _upper(_matrix(layer.first.weight, dtype).T).T
    else:
        raise CstarError(f"{type(layer).__name__} is not a factorised layer: pass a Tucker2Conv2d, LowRankConv1x1 "
                         "or LowRankLinear (cstar.decompose makes them)")
    return torch.linalg.svdvals(matrix)


def condition_excess(values: torch.Tensor, max_condition: float) -> torch.Tensor:
    """``relu(1 - max_condition * sigma_r / sigma_1)^2`` of descending singular values ``values`` (r,): zero while
    the condition number ``sigma_1 / sigma_r`` is at most ``max_condition``, then rising towards 1 (the squared
    shortfall of ``sigma_r`` below ``sigma_1 / max_condition``, relative to it); 0 for a zero operator.

    Bounded by 1 a layer, as its gradient in ``sigma_r`` is by ``2 * max_condition / sigma_1``. The excess of the
    condition number, ``(sigma_1 / sigma_r - max_condition)^2``, is 1e4 at a condition number of 110, and its
    gradient grows as ``1 / sigma_r^2`` (that of its log as ``1 / sigma_r``): on a layer of condition number
    1000, SGD with the log form overshot to 5700 where this form brought it to 8 (the test's setting).
    """
    top = values[0].clamp_min(torch.finfo(values.dtype).tiny)
    excess = torch.relu(1 - max_condition * values[-1] / top).square()
    return torch.where(values[0] > 0, excess, torch.zeros_like(excess))


def factorised_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` of every factorised layer of ``model`` (the model itself as ``""``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FACTORISED)}


@torch.no_grad()
def condition_numbers(model: nn.Module) -> dict[str, float]:
    """``{layer: sigma_1 / sigma_r}`` of every factorised layer's operator (see the module docstring), in
    float64; ``inf`` where sigma_r is 0."""
    numbers = {}
    for name, layer in factorised_layers(model).items():
        values = operator_singular_values(layer, torch.float64)
        numbers[name] = float(values[0] / values[-1]) if values[-1] > 0 else math.inf
    return numbers


def conditioning_penalty(model: nn.Module, max_condition: float = 10.0) -> torch.Tensor:
    """A scalar, summed over the factorised layers of ``model``: ``||F^T F - I||_F^2`` for each of the layer's
    :func:`orthonormal_factors` ``F``, plus :func:`condition_excess` of its operator's singular values at
    ``max_condition`` (> 1). Zero for orthonormal factors and condition numbers within ``max_condition``, and
    for a model without factorised layers."""
    max_condition = MAX_CONDITION("max_condition", max_condition)
    terms = []
    for layer in factorised_layers(model).values():
        for factor in orthonormal_factors(layer):
            gram = factor.T @ factor
            terms.append((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)).square().sum())
        terms.append(condition_excess(operator_singular_values(layer), max_condition))
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def constrained_condition_penalty(weight: torch.Tensor, rank: int, max_condition: float) -> torch.Tensor:
    """:func:`condition_excess` of the ``rank`` leading singular values of a dense weight's operator (C_out,
    C_in*kh*kw): the part of it that a rank-``rank`` projection keeps (ADMM's constrained layers)."""
    matrix = weight.reshape(weight.shape[0], -1)
    if matrix.dtype not in (torch.float32, torch.float64):
        matrix = matrix.float()
    return condition_excess(torch.linalg.svdvals(matrix)[:rank], max_condition)
