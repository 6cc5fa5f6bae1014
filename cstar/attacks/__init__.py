"""Adversarial attacks on image classifiers: FGSM(-RS), PGD, N-FGSM, AutoAttack, Square (gradient-free).

Inputs are float images in [0, 1] of shape (N, C, H, W) (any shape with a
batch dimension works for the gradient attacks) and int64 labels (N,); ``eps``
and ``step`` are in input units. Every attack returns a detached tensor like
``x``, runs the model in eval mode by default (restoring each submodule's
training flag afterwards) and leaves the parameters' ``.grad`` alone.
"""

from cstar.attacks._autoattack import autoattack, square
from cstar.attacks._common import check_inputs, inputs_checked
from cstar.attacks._gradient import fgsm, nfgsm, pgd
from cstar.attacks._spec import AttackSpec, parse_attack

__all__ = [
    "AttackSpec", "autoattack", "check_inputs", "fgsm", "inputs_checked", "nfgsm", "parse_attack", "pgd", "square",
]
