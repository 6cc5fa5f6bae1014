"""AttackSpec: one attack with its settings, as named in configs and result tables."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import nn

from cstar._core.checks import check_radius
from cstar._core.errors import CstarError
from cstar.attacks._autoattack import SQUARE_QUERIES, autoattack, square
from cstar.attacks._common import check_count, check_norm, check_number
from cstar.attacks._gradient import fgsm, nfgsm, pgd

NAMES = ("fgsm", "pgd", "nfgsm", "autoattack", "square")
GRADIENT_FREE = ("square",)  # attacks that need only the model's logits
_FORMS = (
    "'fgsm', 'fgsm-rs', 'nfgsm', 'pgd<steps>' (e.g. 'pgd20'), 'pgd<steps>x<restarts>' (e.g. 'pgd50x5'), "
    "'aa' or 'autoattack', 'square' or 'square<queries>' (e.g. 'square1000')"
)


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """An attack and its settings; call it as ``spec(model, x, y, **options)``.

    Fields:
        name: "fgsm", "pgd", "nfgsm", "autoattack" or "square" (gradient-free: :func:`cstar.attacks.square`).
        eps: radius in input units (e.g. 8/255).
        step: step size; ``None`` uses the attack's default (PGD-k:
            ``max(eps / 4, 2.5 * eps / k)``, i.e. 2/255 at 8/255 for k >= 10, so
            that k steps always travel 2.5 eps; FGSM: ``eps``, or ``1.25 * eps``
            with random start; N-FGSM: ``eps``). Not used by AutoAttack or Square.
        steps: iterations (PGD only; 1 otherwise).
        norm: "linf" or "l2" (N-FGSM: "linf" only).
        random_start: FGSM and PGD only; ``None`` uses the attack's default
            (FGSM: False, PGD: True).
        restarts: PGD only; see :func:`cstar.attacks.pgd`.
        queries: Square only: forward passes per image; ``None`` uses
            AutoAttack's 5000.
    """

    name: str
    eps: float
    step: float | None = None
    steps: int = 1
    norm: str = "linf"
    random_start: bool | None = None
    restarts: int = 1
    queries: int | None = None

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise CstarError(f"unknown attack {self.name!r}; use one of {', '.join(map(repr, NAMES))}")
        check_number("eps", self.eps)
        check_norm(self.norm)
        if self.step is not None:
            check_number("step", self.step, positive=True)
        check_count("steps", self.steps)
        check_count("restarts", self.restarts)
        if self.name != "pgd" and (self.steps != 1 or self.restarts != 1):
            raise CstarError(f"{self.name} takes one step and no restarts; use name='pgd' for steps or restarts")
        if self.name == "nfgsm" and self.norm != "linf":
            raise CstarError("nfgsm is an L-inf attack; pass norm='linf' or use 'pgd' for L2")
        if self.name in ("nfgsm", "autoattack", "square") and self.random_start is not None:
            raise CstarError(f"{self.name} has no random_start setting; leave it None")
        if self.name in ("autoattack", "square") and self.step is not None:
            raise CstarError(f"{self.name} chooses its own step sizes; leave step None")
        if self.queries is not None:
            if self.name != "square":
                raise CstarError(f"{self.name} takes no queries (a budget of the Square attack's); leave it None")
            check_count("queries", self.queries)

    @property
    def step_size(self) -> float | None:
        """The step the attack takes: ``step``, or its default (see the class); None for AutoAttack and Square."""
        if self.step is not None or self.name in ("autoattack", "square"):
            return self.step
        if self.name == "pgd":
            return max(self.eps / 4, 2.5 * self.eps / self.steps)
        return 1.25 * self.eps if self.name == "fgsm" and self.random_start else self.eps

    @property
    def settings(self) -> dict:
        """What the attack's figure depends on: ``{"eps", "norm", "step", "steps", "restarts"}`` (AutoAttack:
        ``step`` and ``steps`` None, it chooses its own; Square: also ``"queries"``)."""
        if self.name == "autoattack":
            return {"eps": self.eps, "norm": self.norm, "step": None, "steps": None, "restarts": 1}
        if self.name == "square":
            return {"eps": self.eps, "norm": self.norm, "step": None, "steps": None, "restarts": 1,
                    "queries": self.queries or SQUARE_QUERIES}
        return {"eps": self.eps, "norm": self.norm, "step": self.step_size, "steps": self.steps,
                "restarts": self.restarts}

    def short_reach(self) -> str | None:
        """One line when a gradient attack's steps cannot cross the eps-ball (``steps * step < eps``), which
        overstates robustness; None otherwise (always for the default steps)."""
        if self.name not in ("pgd", "fgsm") or self.step_size * self.steps >= self.eps * (1 - 1e-9):
            return None
        default = dataclasses.replace(self, step=None).step_size
        return (f"{self.label} with step {self.step_size:.4g} moves at most {self.step_size * self.steps:.4g} "
                f"({self.steps} x {self.step_size:.4g}), less than eps {self.eps:.4g}, so its accuracy overstates "
                f"robustness: leave its step to the default ({default:.4g}) or set one >= eps/{self.steps} "
                f"= {self.eps / self.steps:.4g}")

    @property
    def label(self) -> str:
        """Short name for tables: "fgsm", "fgsm-rs", "nfgsm", "pgd20", "pgd50x5", "autoattack", "square",
        "square1000"."""
        if self.name == "fgsm":
            return "fgsm-rs" if self.random_start else "fgsm"
        if self.name == "pgd":
            return f"pgd{self.steps}" + (f"x{self.restarts}" if self.restarts > 1 else "")
        if self.name == "square" and self.queries is not None:
            return f"square{self.queries}"
        return self.name

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
        """Run the attack; ``options`` go to the attack function (e.g. ``amp_dtype``,
        ``model_mode``, ``generator`` for gradient attacks; ``batch_size``, ``log``
        for AutoAttack). At ``eps=0`` the ball holds ``x`` alone: ``x`` is returned, no step taken."""
        if self.eps == 0:
            return x.detach().clone()
        if self.name == "autoattack":
            return autoattack(model, x, y, self.eps, norm=self.norm, **options)
        if self.name == "square":
            return square(model, x, y, self.eps, norm=self.norm, queries=self.queries or SQUARE_QUERIES, **options)
        if self.name == "nfgsm":
            return nfgsm(model, x, y, self.eps, step=self.step, **options)
        if self.name == "fgsm":
            return fgsm(
                model, x, y, self.eps, norm=self.norm, random_start=bool(self.random_start), step=self.step, **options
            )
        random_start = True if self.random_start is None else self.random_start
        return pgd(
            model, x, y, self.eps, self.step_size, self.steps,
            norm=self.norm, random_start=random_start, restarts=self.restarts, **options,
        )


def parse_attack(text: str, eps: float, norm: str = "linf", step: float | None = None) -> AttackSpec:
    """Parse an attack name such as "fgsm", "pgd20", "pgd50x5" or "aa" into an :class:`AttackSpec`.

    Forms: "fgsm", "fgsm-rs" (random start), "nfgsm", "pgd<steps>",
    "pgd<steps>x<restarts>", "aa" / "autoattack", "square" / "square<queries>" (case-insensitive). ``eps``,
    ``norm`` and ``step`` fill the spec; ``step=None`` keeps the attack's default.
    ``parse_attack(spec.label, spec.eps, spec.norm, spec.step)`` gives back
    ``spec`` when its ``random_start`` is the default (``None``).
    """
    key = text.strip().lower() if isinstance(text, str) else ""
    if key in ("fgsm", "fgsm-rs"):
        return AttackSpec("fgsm", eps, step=step, norm=norm, random_start=True if key == "fgsm-rs" else None)
    if key == "nfgsm":
        return AttackSpec("nfgsm", eps, step=step, norm=norm)
    if key in ("aa", "autoattack"):
        return AttackSpec("autoattack", eps, step=step, norm=norm)
    match = re.fullmatch(r"square(\d*)", key)
    if match:
        return AttackSpec("square", eps, step=step, norm=norm, queries=int(match[1]) if match[1] else None)
    match = re.fullmatch(r"pgd(\d+)(?:x(\d+))?", key)
    if match:
        return AttackSpec(
            "pgd", eps, step=step, steps=int(match[1]), norm=norm, restarts=int(match[2] or 1)
        )
    raise CstarError(f"unknown attack {text!r}; use one of {_FORMS}")


def steps_by_attack(step: object, norm: str = "linf") -> tuple[float | None, dict[str, float]]:
    """``(one step for every PGD attack, {attack label: step})`` of an evaluation's ``step`` setting.

    ``step`` is None (the defaults), a number (every PGD attack's step), or a
    mapping of attack names to steps (``{"pgd40": 0.01}``: that attack's step
    only, so a preset's step for PGD-40 never reaches a PGD-5 run with it).
    Keys are read as :func:`parse_attack` reads names; steps must be > 0 (and
    at most 1 for L-inf, whose radii are in [0, 1] image units).
    """
    if step is None:
        return None, {}
    if not isinstance(step, Mapping):
        return check_size("step", step, norm), {}
    steps = {}
    for name, value in step.items():
        spec = parse_attack(name, 1.0)
        if spec.name in ("autoattack", "square"):
            raise CstarError(f"step for {name!r}: {spec.name} chooses its own step sizes; drop it from the steps")
        steps[spec.label] = check_size(f"step of {spec.label}", value, norm)
    return None, steps


def check_size(what: str, value: object, norm: str, *, positive: bool = True) -> float:
    """An eps or step of a ``norm`` attack on images in [0, 1]: in [0, 1] for L-inf (as ``--eps`` takes it),
    finite and >= 0 for L2; > 0 when ``positive``."""
    if norm == "linf":
        return check_radius(what, value, positive=positive)
    return check_number(what, value, positive=positive)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """``attack`` made on another model, the source, and tried on the evaluated one: a transfer attack, for a
    model whose own gradients do not exist (an exported INT8 graph) or are not to be trusted.

    Call it as ``transfer(source, x, y)``; its label is ``"transfer-<attack>"`` and its settings the attack's
    with ``"made_on": "source"``.
    """

    attack: AttackSpec

    @property
    def label(self) -> str:
        return f"transfer-{self.attack.label}"

    @property
    def settings(self) -> dict:
        return {**self.attack.settings, "made_on": "source"}

    def __call__(self, source: nn.Module, x: torch.Tensor, y: torch.Tensor, **options) -> torch.Tensor:
        return self.attack(source, x, y, **options)
