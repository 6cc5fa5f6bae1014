"""Robust evaluation: clean, FGSM, PGD-k, AutoAttack and Square accuracy; transfer attacks from a source model.

:func:`evaluate` streams the test set batch by batch (adversarial examples are
never all held in memory), runs every attack on the same inputs with the model
in eval mode, and returns accuracies in [0, 1]. With ``out_path`` it also writes
a JSON in the spirit of RobustBench's model cards (accuracies in percent).
Under torchrun (:mod:`cstar.distributed`) each rank evaluates its own slice of
the examples and the counts are summed, so every example is counted once.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from .. import attacks, distributed
from .._core import log
from .._core.errors import CstarError
from .._core.io import write_json
from .._core.recorded import check_same
from .batches import (batches, check_counts, check_data, check_gradients, check_labels, check_model, classes_of,
                      data_fingerprint, model_device, weights_sha256)
from ..attacks._autoattack import require_autoattack
from ..attacks._common import check_norm
from ..attacks._spec import GRADIENT_FREE, Transfer, check_size, steps_by_attack
from ..inference import folded_or_same

DEFAULT_ATTACKS = ("clean", "pgd20")


def attack_specs(attacks_to_run, eps: float, *, norm: str = "linf", step=None, warn: bool = True) -> list:
    """The attacks of an evaluation, checked: ``"clean"`` or an :class:`~cstar.attacks.AttackSpec` each.

    A named attack gets its step from ``step`` (see
    :func:`cstar.attacks._spec.steps_by_attack`: a number sets every PGD attack's step,
    a mapping the named attacks'), else its default, which follows its number
    of steps. With ``warn``, an attack whose steps cannot cross the eps-ball is
    warned about in one line. Raises :class:`CstarError` for a single name
    instead of a list, no attack, an unknown form or an attack named twice.
    """
    if isinstance(attacks_to_run, (str, bytes, attacks.AttackSpec)):
        raise CstarError(f"attacks_to_run={attacks_to_run!r} is one attack, not a list (a string is read letter "
                         f"by letter): pass a list, e.g. [{attacks_to_run!r}] or ['clean', 'pgd20']")
    if not isinstance(attacks_to_run, Iterable):
        raise CstarError(f"attacks_to_run={attacks_to_run!r}: pass a list of attacks, e.g. ['clean', 'pgd20']")
    check_norm(norm)
    eps = check_size("eps", eps, norm, positive=False)
    scalar, by_label = steps_by_attack(step, norm)
    specs = [_spec(item, eps, norm, scalar, by_label) for item in attacks_to_run]
    if not specs:
        raise CstarError("no attack to evaluate: name at least one, e.g. ['clean', 'pgd20'] "
                         "(on the command line: --attacks clean,pgd20)")
    labels = [_label(spec) for spec in specs]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise CstarError(f"{', '.join(twice)} named twice: name each attack once")
    for spec in specs:
        if spec != "clean" and spec.name in ("autoattack", "square"):
            require_autoattack(spec.label)
    for spec in specs if warn else ():
        short = spec != "clean" and spec.short_reach()
        if short:
            warnings.warn(short)  # from this line only: shown once per process
    return specs


def _spec(item, eps: float, norm: str, scalar: float | None, by_label: dict):
    """One attack of :func:`attack_specs`."""
    if isinstance(item, attacks.AttackSpec):
        check_size(f"eps of {item.label}", item.eps, item.norm, positive=False)
        return item
    if not isinstance(item, str):
        raise CstarError(f"attack {item!r}: pass names such as 'clean' or 'pgd20', or AttackSpec objects")
    if item.strip().lower() == "clean":
        return "clean"
    spec = attacks.parse_attack(item, eps, norm=norm)
    step = by_label.get(spec.label, scalar if spec.name == "pgd" else None)
    return spec if step is None else dataclasses.replace(spec, step=step)


def _label(spec) -> str:
    return "clean" if spec == "clean" else spec.label


def attack_settings(specs) -> dict[str, dict]:
    """``{label: {"eps", "norm", "step", "steps", "restarts"}}`` of the attacks (clean has none)."""
    return {spec.label: spec.settings for spec in specs if spec != "clean"}


def describe_attacks(settings: dict[str, dict]) -> str:
    """The attacks' settings in one line: ``pgd40: eps 0.3, step 0.01, 40 steps; square: eps 0.3, 5000 queries;
    transfer-pgd20: eps 0.3, step 0.075, 20 steps, made on the source model``."""
    parts = []
    for label, s in settings.items():
        made_on = ", made on the source model" if s.get("made_on") == "source" else ""
        if s.get("queries") is not None:
            parts.append(f"{label}: eps {s['eps']:.4g}, {s['queries']} queries{made_on}")
        elif s.get("steps") is None:
            parts.append(f"{label}: eps {s['eps']:.4g} (its own steps){made_on}")
        else:
            restarts = f", {s['restarts']} restarts" if s.get("restarts", 1) > 1 else ""
            parts.append(f"{label}: eps {s['eps']:.4g}, step {s['step']:.4g}, {s['steps']} step"
                         f"{'s' if s['steps'] > 1 else ''}{restarts}{made_on}")
    return "; ".join(parts)


# what each key of an evaluation's saved progress stands for, in a refusal to resume it
_PROGRESS_KEYS = {"model": "the model's weights", "data": "the test data", "n": "n", "eps": "eps",
                  "attacks": "the attacks or their eps/step/steps", "labels": "the attacks", "batch_size": "batch_size",
                  "seed": "seed", "source": "the source model's weights"}


def _shard(data, n: int | None, batch_size: int, device: torch.device):
    """This rank's contiguous slice of the first ``n`` examples: ``(data, n, sharded)``.

    Rank ``r`` of ``w`` gets examples ``[r * count // w, (r + 1) * count // w)``, so
    every example is evaluated exactly once. An iterable of batches cannot be
    sliced: every rank then evaluates all of it (``sharded`` is False).
    """
    r, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return data, n, False
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        count = len(data[0]) if n is None else min(n, len(data[0]))
        start, end = r * count // world, (r + 1) * count // world
        return (data[0][start:end], data[1][start:end]), None, True
    if isinstance(data, torch.utils.data.Dataset):
        count = len(data) if n is None else min(n, len(data))
        part = torch.utils.data.Subset(data, range(r * count // world, (r + 1) * count // world))
        loader = torch.utils.data.DataLoader(part, batch_size=batch_size, num_workers=2,
                                             pin_memory=device.type == "cuda")
        return loader, None, True
    return data, n, False


def subset_label(n: int | None, total: int) -> str:
    """How a result names the test examples it used: ``total`` of them, the first ``n`` asked for (None: all)."""
    return f"first {total} examples" if n is not None else f"all {total} examples"


def evaluate(model: nn.Module, data, attacks_to_run: Sequence[str | attacks.AttackSpec] = DEFAULT_ATTACKS, *,
             eps: float, norm: str = "linf", step: float | dict[str, float] | None = None, n: int | None = None,
             batch_size: int = 256,
             seed: int = 0, out_path: str | Path | None = None, meta: dict | None = None,
             progress: bool = False, resume: bool = False, per_example: bool = False, fold_bn: bool = True,
             source: nn.Module | None = None) -> dict:
    """Accuracy of ``model`` on ``data`` under each attack.

    ``attacks_to_run`` holds ``"clean"``, attack names understood by
    :func:`cstar.attacks.parse_attack` (``"fgsm"``, ``"pgd20"``, ``"aa"``...) or
    :class:`~cstar.attacks.AttackSpec` objects. ``n`` evaluates the first ``n``
    examples (all when None). ``step`` sets the steps of the named attacks: a
    number for every PGD attack, or ``{label: step}`` for the attacks it names
    (``{"pgd40": 0.01}``); the others keep their defaults, PGD-k's
    ``max(eps / 4, 2.5 * eps / k)`` (:func:`attack_specs`; a step whose k steps
    cannot cross the eps-ball is warned about). Returns ``{"accuracy": {label: float},
    "n_examples": int, "subset": str, "eps": float, "norm": str, "attacks": {label:
    {"eps", "norm", "step", "steps", "restarts"}}, "seconds": {label: float}}``;
    ``per_example=True`` adds ``"per_example": {label: str}``, one character per
    evaluated example in order, ``"1"`` where the model was right (for paired
    comparisons of two models on the same examples, see :func:`paired_difference`).
    Under torchrun every rank calls it and gets the same result (``seconds`` are
    rank 0's); only rank 0 writes ``out_path``.

    Each batch's attacks are seeded with ``seed + batch index``, so results do
    not depend on where a run started. With ``out_path`` (in one process) the
    counts so far are kept in ``<out_path>.partial`` after every batch; with
    ``resume=True`` a killed evaluation continues after its last finished batch
    (a long AutoAttack run loses at most one batch), and only for the same model
    weights (their SHA-256), data, attacks and settings.

    Bad arguments (a string for ``attacks_to_run``, eps outside [0, 1] for
    L-inf, numpy data, float or one-hot labels, images the model cannot take,
    labels beyond its classes, non-finite weights or logits...) raise
    :class:`CstarError` before any attack runs or any file is written.

    With ``fold_bn`` (default) the attacks and predictions run on a copy of the
    model with each BatchNorm folded into the conv before it
    (:func:`cstar.fold_batchnorm`): the same function within float rounding, and
    1.3x faster attacks on a CIFAR ResNet-18 (``benchmarks/bench_attack_throughput.py``).
    A model that ``torch.fx`` cannot trace is evaluated as it is.

    ``source`` makes the gradient attacks transfer attacks: each is made on
    ``source`` (e.g. the float model an INT8 graph was exported from) and its
    examples classified by ``model``, labelled ``"transfer-<attack>"`` with
    ``"made_on": "source"`` in its settings; ``clean`` and the gradient-free
    ``square`` run on ``model`` itself. A model without gradients of its own
    (:func:`cstar.load_exported`) takes only those, or transfer attacks: a
    gradient attack on it is refused before any attack runs.
    """
    check_model(model)
    if source is not None:
        check_model(source, "source model")
    check_counts(n, batch_size, seed)
    check_data(data)
    specs = attack_specs(attacks_to_run, eps, norm=norm, step=step)
    if source is not None:
        specs = [spec if spec == "clean" or spec.name in GRADIENT_FREE else Transfer(spec) for spec in specs]
    labels = [_label(spec) for spec in specs]
    device = model_device(model)
    was_training = model.training
    correct = dict.fromkeys(labels, 0)
    hits = {k: "" for k in labels}  # filled only with per_example
    seconds = dict.fromkeys(labels, 0.0)
    total = 0
    shard, shard_n, sharded = _shard(data, n, batch_size, device)
    stream = iter(batches(shard, shard_n, batch_size, device))
    first = next(stream, None)
    if first is None and not sharded:
        raise CstarError("the evaluation data is empty: pass a dataset with at least one example")
    model.eval()
    try:
        target = folded_or_same(model) if fold_bn else model
        classes = None if first is None else classes_of(target, *first, data)
        on_model = [s for s in specs if s != "clean" and not isinstance(s, Transfer) and s.name not in GRADIENT_FREE]
        if on_model and first is not None:  # a gradient attack on the model itself needs its gradients
            check_gradients(target, first[0], on_model[0].label)
    finally:
        model.train(was_training)
    source_target = None if source is None else _checked_source(source, fold_bn, first, classes, data)
    partial = Path(f"{out_path}.partial") if out_path is not None and not sharded else None
    state = {"labels": labels, "eps": eps, "n": n, "batch_size": batch_size, "seed": seed}
    if partial is not None:
        state.update(attacks=attack_settings(specs), model=weights_sha256(model), data=data_fingerprint(data))
        if source is not None:
            state["source"] = weights_sha256(source)
    done = 0
    if resume and partial is not None and partial.exists():
        saved = json.loads(partial.read_text())
        if per_example and "per_example" not in saved:
            raise CstarError(f"{partial} holds counts only (written without per_example): delete it to start over, "
                             f"or resume without per_example")
        check_same({k: saved.get(k) for k in state}, state, f"{partial} was written by an evaluation",
                   "resume with the same model, data and settings, or delete it to start over", _PROGRESS_KEYS)
        done, total, correct, seconds = saved["batches"], saved["total"], saved["correct"], saved["seconds"]
        hits = saved.get("per_example", hits)
    model.eval()
    source_was_training = source is not None and source.training
    if source is not None:
        source.eval()
    # each batch's attacks are seeded with seed + index; the caller's random state is restored afterwards
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for index, (xb, yb) in enumerate(itertools.chain([first] if first is not None else [], stream)):
                if index < done:
                    continue
                if index:
                    check_labels(yb, classes)
                torch.manual_seed(seed + index)
                total += len(yb)
                for spec, label in zip(specs, labels):
                    t0 = time.perf_counter()
                    x_eval = _attacked(spec, target, source_target, xb, yb)
                    with torch.no_grad():
                        right = target(x_eval).argmax(1) == yb
                    correct[label] += right.sum().item()
                    if per_example:
                        hits[label] += "".join("1" if r else "0" for r in right.tolist())
                    seconds[label] += time.perf_counter() - t0
                if progress and distributed.is_main():
                    where = " (rank 0's share)" if sharded else ""
                    log.info(f"  {total} images{where}: " + "  ".join(f"{k} {correct[k] / total:.4f}" for k in labels))
                if partial is not None:
                    write_json(partial, {**state, "batches": index + 1, "total": total, "correct": correct,
                                         "seconds": seconds, **({"per_example": hits} if per_example else {})})
        finally:
            model.train(was_training)
            if source is not None:
                source.train(source_was_training)
    if sharded:
        *counts, total = distributed.all_reduce_sum([*(correct[k] for k in labels), total])
        correct = dict(zip(labels, counts))
        if per_example:  # the shards are contiguous and in rank order
            shares = distributed.all_gather_object(hits)
            hits = {k: "".join(share[k] for share in shares) for k in labels}
    if total == 0:
        raise CstarError("the evaluation data is empty: pass a dataset with at least one example")
    result = {
        "accuracy": {k: correct[k] / total for k in labels},
        "n_examples": total,
        "subset": subset_label(n, total),
        "eps": eps,
        "norm": norm,
        "attacks": attack_settings(specs),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if per_example:
        result["per_example"] = hits
    if out_path is not None and distributed.is_main():
        write_json(out_path, robustbench_card(result, meta or {}))
    if partial is not None and partial.exists():
        partial.unlink()
    return result


def _checked_source(source: nn.Module, fold_bn: bool, first, classes: int | None, data) -> nn.Module:
    """The model the transfer attacks are made on (BatchNorm folded where it can be), after checking that it
    takes the first batch and predicts the evaluated model's ``classes``."""
    was_training = source.training
    source.eval()
    try:
        attacked = folded_or_same(source) if fold_bn else source
        if first is not None:
            where = model_device(source)
            source_classes = classes_of(attacked, first[0].to(where), first[1].to(where), data)
            if source_classes != classes:
                raise CstarError(f"the source model predicts {source_classes} classes but the evaluated model "
                                 f"{classes}: pass the float model the evaluated one was made from")
    finally:
        source.train(was_training)
    return attacked


def _attacked(spec, target: nn.Module, source: nn.Module | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The images ``spec`` gives for the batch ``(x, y)``: ``x`` itself (clean), made on ``source`` (a transfer
    attack, on the source's device) or on ``target``."""
    if spec == "clean":
        return x
    if isinstance(spec, Transfer):
        where = model_device(source)
        return spec(source, x.to(where), y.to(where)).to(x.device)
    return spec(target, x, y)


def paired_difference(a: str, b: str, confidence: float = 0.95) -> dict:
    """Accuracy of model A minus model B on the same examples, with its uncertainty.

    ``a`` and ``b`` are per-example strings of :func:`evaluate` (``per_example=True``),
    ``"1"`` where the model was right, over the same examples in the same order.
    Pairing removes the examples' shared difficulty, so the interval is much
    narrower than two separate binomial intervals. Returns ``{"n", "difference",
    "stderr", "ci", "only_a", "only_b", "p_value"}``: the difference and its
    standard error in [0, 1] units, the normal-approximation ``confidence``
    interval ``(low, high)``, the counts of examples only A or only B got right,
    and the two-sided exact McNemar p-value (a sign test on those two counts).
    """
    if len(a) != len(b) or not a:
        raise CstarError(f"per-example results of {len(a)} and {len(b)} examples: compare two evaluations of the "
                         f"same (non-empty) examples")
    if set(a) - {"0", "1"} or set(b) - {"0", "1"}:
        raise CstarError("per-example results must be strings of '0' and '1' (evaluate(..., per_example=True))")
    if not 0 < confidence < 1:
        raise CstarError(f"confidence={confidence}: pass a level between 0 and 1, e.g. 0.95")
    n = len(a)
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    mean = (only_a - only_b) / n
    variance = ((only_a + only_b) / n - mean ** 2) * n / (n - 1) if n > 1 else 0.0
    stderr = math.sqrt(max(variance, 0.0) / n)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    discordant, fewer = only_a + only_b, min(only_a, only_b)
    tail = sum(math.comb(discordant, k) for k in range(fewer + 1))
    p_value = min(1.0, 2 * tail / 2 ** discordant) if discordant else 1.0
    return {"n": n, "difference": mean, "stderr": stderr, "ci": (mean - z * stderr, mean + z * stderr),
            "only_a": only_a, "only_b": only_b, "p_value": p_value}


def robustbench_card(result: dict, meta: dict) -> dict:
    """A RobustBench-style model card: accuracies in percent, threat model, eps, each attack's eps, step and
    steps (and the per-example results, when evaluated with them)."""
    acc = result["accuracy"]
    card = {
        **meta,
        "threat_model": {"linf": "Linf", "l2": "L2"}.get(result["norm"], result["norm"]),
        "eps": result["eps"],
        "n_examples": result["n_examples"],
        "subset": result["subset"],
        "attacks": result["attacks"],
    }
    for label, value in acc.items():
        key = "autoattack_acc" if label == "autoattack" else f"{label}_acc"
        card[key] = round(100 * value, 2)
    card["seconds"] = result["seconds"]
    if "per_example" in result:
        card["per_example"] = result["per_example"]
    return card


def format_results(rows: dict[str, dict], labels: Sequence[str] | None = None) -> str:
    """A markdown table: one row per model/phase, one column per attack (percent); then each attack's eps,
    step and steps (a line per model where the models' settings differ)."""
    labels = list(labels or next(iter(rows.values()))["accuracy"].keys())
    lines = ["| model | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, res in rows.items():
        cells = [f"{100 * res['accuracy'][k]:.2f}" if k in res["accuracy"] else "-" for k in labels]
        lines.append(f"| {name} | {res['n_examples']} | " + " | ".join(cells) + " |")
    settings = {name: describe_attacks(res["attacks"]) for name, res in rows.items() if res.get("attacks")}
    if len(set(settings.values())) == 1:
        lines.append(f"\nattacks: {next(iter(settings.values()))}")
    else:
        lines += [f"\nattacks of {name}: {text}" for name, text in settings.items()]
    return "\n".join(lines)
