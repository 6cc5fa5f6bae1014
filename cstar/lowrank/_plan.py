"""A rank plan: the ranks, costs and retained energy of every compressible layer (:class:`RankPlan`, one
:class:`LayerPlan` each), as :func:`cstar.lowrank.select_ranks` returns it; readable, saved and loaded as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .._core.checks import number
from .._core.errors import CstarError
from .._core.io import write_json
from .._core.renamed import PLAN, accepting_old_names, old_attribute, renamed


@dataclass
class LayerPlan:
    """The plan of one compressible layer.

    ``kind`` is ``"tucker2"`` (ranks ``(r_out, r_in)``), ``"svd"`` (ranks ``(r,)``)
    or ``"dense"`` (kept as is; ranks are the full mode sizes). ``params`` and
    ``macs`` (per image; None without an input shape) are those of the layer as
    planned, ``dense_*`` those of the original layer; ``energy`` in [0, 1] is the
    retained normalised spectral energy; ``shape`` is the original weight's shape.
    ``dense_latency_alone_ms`` and ``latency_alone_ms`` (``budget="latency"`` only,
    else None): the layer's time per batch on the plan's runtime, timed alone (the
    planned ranks interpolated between timed ones), what the allocation weighs.
    """

    kind: str
    ranks: tuple[int, ...]
    dense_params: int
    params: int
    dense_macs: int | None
    macs: int | None
    energy: float
    shape: tuple[int, ...] = ()
    dense_latency_alone_ms: float | None = None
    latency_alone_ms: float | None = None


@dataclass
class RankPlan:
    """Ranks of every compressible layer of a model, with exact cost accounting.

    ``target_ratio`` is the requested ratio (on parameters for ``budget="params"``
    and ``"joint"``, on MACs for ``"macs"``); ``target_macs_ratio`` the requested
    MACs ratio of a ``"joint"`` budget (None otherwise); :attr:`achieved_ratio` and
    :attr:`achieved_macs_ratio` what the plan reaches. ``excluded`` lists the compressible layers kept dense on
    request, ``skipped`` the declined ones with the reason. Totals are for the
    whole model (every parameter; MACs None without an ``input_shape``).
    A ``"latency"`` budget's plan also records its ``runtime``, where it was
    measured (``measured_on``: runtime version, CPU, threads, batch) and the
    median times per batch of the dense model (``dense_latency_ms``) and of the
    planned structure (``latency_ms``), both measured there in the same run;
    :attr:`achieved_speedup` is their ratio, one run on one machine.
    """

    layers: dict[str, LayerPlan]
    target_ratio: float
    budget: str
    method: str
    input_shape: tuple[int, ...] | None
    excluded: list[str]
    skipped: dict[str, str]
    dense_params: int
    params: int
    dense_macs: int | None
    macs: int | None
    target_macs_ratio: float | None = None
    runtime: str | None = None
    measured_on: str | None = None
    dense_latency_ms: float | None = None
    latency_ms: float | None = None

    @property
    def achieved_speedup(self) -> float | None:
        """Measured dense latency / measured planned latency on ``runtime`` (None unless the budget was latency)."""
        if self.dense_latency_ms is None or not self.latency_ms:
            return None
        return self.dense_latency_ms / self.latency_ms

    @property
    def achieved_ratio(self) -> float:
        """Dense parameters / planned parameters, whole model."""
        return self.dense_params / self.params

    @property
    def achieved_macs_ratio(self) -> float | None:
        """Dense MACs / planned MACs, whole model (None without an input shape)."""
        if self.macs is None or self.dense_macs is None:
            return None
        return self.dense_macs / self.macs

    target = old_attribute("RankPlan", "target", "target_ratio")
    flops_target = old_attribute("RankPlan", "flops_target", "target_macs_ratio")
    ratio = old_attribute("RankPlan", "ratio", "achieved_ratio")
    flops_ratio = old_attribute("RankPlan", "flops_ratio", "achieved_macs_ratio")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (tuples as lists; ``achieved_ratio``/``achieved_macs_ratio`` added for readers)."""
        d = asdict(self)
        d["input_shape"] = None if self.input_shape is None else list(self.input_shape)
        for layer in d["layers"].values():
            layer["ranks"], layer["shape"] = list(layer["ranks"]), list(layer["shape"])
        d["achieved_ratio"], d["achieved_macs_ratio"] = self.achieved_ratio, self.achieved_macs_ratio
        d["achieved_speedup"] = self.achieved_speedup
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RankPlan":
        """Inverse of :meth:`to_dict`; a plan written before the renames (``target``, ``flops_target``, budget
        ``"flops"``) reads as today's."""
        if not isinstance(d, dict):
            raise CstarError(f"a rank plan must be a dict from RankPlan.to_dict(), got {type(d).__name__}")
        d = renamed(d, "a rank plan", note=False, names=PLAN)
        names, layer_names = _required(cls), _required(LayerPlan)
        missing = [k for k in names if k not in d]
        if missing:
            raise CstarError(f"not a rank plan: missing {', '.join(missing)}; pass a dict from RankPlan.to_dict()")
        layers = {}
        for name, layer in d["layers"].items():
            missing = [k for k in layer_names if k not in layer]
            if missing:
                raise CstarError(f"rank plan layer {name!r} lacks {', '.join(missing)}; pass a dict from to_dict()")
            values = {k: layer[k] for k in LayerPlan.__dataclass_fields__ if k in layer}
            values["ranks"], values["shape"] = tuple(layer["ranks"]), tuple(layer["shape"])
            layers[name] = LayerPlan(**values)
        values = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        _check_latency_record(values, "the plan")
        for name, layer in layers.items():
            _check_latency_record(layer.__dict__, f"rank plan layer {name!r}")
        values["layers"] = layers
        values["input_shape"] = None if d["input_shape"] is None else tuple(d["input_shape"])
        values["excluded"], values["skipped"] = list(d["excluded"]), dict(d["skipped"])
        return cls(**values)

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON, atomically; the parent directory must exist."""
        path = Path(path)
        if not path.parent.is_dir():
            raise CstarError(f"cannot save rank plan: directory {path.parent} does not exist; create it first")
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "RankPlan":
        """Read a plan written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise CstarError(f"rank plan {path} does not exist: pass a JSON file written by RankPlan.save")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CstarError(
                f"rank plan {path} is not valid JSON ({exc}); pass a file written by RankPlan.save"
            ) from None
        return cls.from_dict(d)

    def table(self) -> str:
        """Aligned text: one row per layer, then whole-model totals with both ratios."""
        header = ("layer", "kind", "shape", "ranks", "params", "MACs", "energy")
        rows = [
            (name, p.kind, "x".join(map(str, p.shape)), ",".join(map(str, p.ranks)),
             f"{p.dense_params:,} -> {p.params:,}", _macs_text(p.dense_macs, p.macs), f"{p.energy:.3f}")
            for name, p in self.layers.items()
        ]
        macs = "-" if self.achieved_macs_ratio is None else f"{self.achieved_macs_ratio:.2f}x"
        total = ("total", "", "", "", f"{self.dense_params:,} -> {self.params:,}",
                 _macs_text(self.dense_macs, self.macs), "")
        widths = [max(len(r[i]) for r in (header, *rows, total)) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            padded = (c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            return "  ".join(padded).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        lines = [line(header), rule, *map(line, rows), rule, line(total),
                 f"ratio {self.achieved_ratio:.2f}x params, {macs} MACs ({self.method} ranks, {self.budget} budget)"]
        if self.achieved_speedup is not None:
            lines.append(f"latency {self.dense_latency_ms:.3f} ms -> {self.latency_ms:.3f} ms measured "
                         f"({self.achieved_speedup:.2f}x) on {self.measured_on}")
        if self.excluded:
            lines.append(f"excluded (kept dense): {', '.join(self.excluded)}")
        lines += [f"skipped {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


RankPlan.__init__ = accepting_old_names(RankPlan.__init__, PLAN, "RankPlan()")


_LATENCY_FIELDS = ("runtime", "measured_on", "dense_latency_ms", "latency_ms", "dense_latency_alone_ms",
                   "latency_alone_ms")
_A_TIME = number(at_least=0)  # a latency field's time in ms: finite, >= 0, not a bool or text


def _required(cls) -> list[str]:
    """The fields a record of ``cls`` must have: all but the latency ones, which plans before them lack."""
    return [name for name in cls.__dataclass_fields__ if name not in _LATENCY_FIELDS]


def _check_latency_record(values: dict, what: str) -> None:
    """Refuse latency fields of a read plan that are not what cstar writes (text, or a finite time >= 0)."""
    for key in _LATENCY_FIELDS:
        value = values.get(key)
        text = key in ("runtime", "measured_on")
        ok = value is None or (isinstance(value, str) if text else _A_TIME.holds(value))
        if not ok:
            raise CstarError(f"{what}: {key} is {value!r}, not {'text' if text else 'a time in ms'}: pass a plan "
                             "written by RankPlan.save")


def _macs_text(dense: int | None, planned: int | None) -> str:
    return "-" if dense is None else f"{dense / 1e6:,.2f}M -> {planned / 1e6:,.2f}M"
