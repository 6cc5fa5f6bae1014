"""Robust evaluation: clean, FGSM, PGD-k and AutoAttack accuracy.

:func:`evaluate` streams the test set batch by batch (adversarial examples are
never all held in memory), runs every attack on the same inputs with the model
in eval mode, and returns accuracies in [0, 1]. With ``out_path`` it also writes
a JSON in the spirit of RobustBench's model cards (accuracies in percent).
Under torchrun (:mod:`cstar.distributed`) each rank evaluates its own slice of
the examples and the counts are summed, so every example is counted once.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from . import attacks, distributed
from .data import make_loader
from . import _log as log
from ._errors import CstarError
from ._io import write_json
from .inference import folded_or_same

DEFAULT_ATTACKS = ("clean", "pgd20")


def _batches(data, n: int | None, batch_size: int, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x float in [0,1], y) batches of the first ``n`` examples of ``data`` on ``device``.

    ``data`` is a dataset with ``images``/``labels`` tensors (uint8 images are
    scaled by 1/255), an ``(images, labels)`` pair, or an iterable of batches.
    """
    if hasattr(data, "images") and hasattr(data, "labels"):
        data = (data.images, data.labels)
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x_all, y_all = data
        if len(x_all) != len(y_all):
            raise CstarError(f"{len(x_all)} images but {len(y_all)} labels: pass matching images and labels")
        count = len(x_all) if n is None else min(n, len(x_all))
        for i in range(0, count, batch_size):
            x = x_all[i:min(i + batch_size, count)].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            yield x, y_all[i:min(i + batch_size, count)].to(device)
        return
    if isinstance(data, torch.utils.data.Dataset):  # e.g. an image folder: stream it with workers
        data = make_loader(data, batch_size, train=False, device=device)
    seen = 0
    for x, y in data:
        if n is not None and seen >= n:
            return
        if n is not None and seen + len(y) > n:
            x, y = x[:n - seen], y[:n - seen]
        seen += len(y)
        x = x.to(device)
        yield (x.float() / 255 if x.dtype == torch.uint8 else x), y.to(device)


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
             eps: float, norm: str = "linf", step: float | None = None, n: int | None = None, batch_size: int = 256,
             seed: int = 0, out_path: str | Path | None = None, meta: dict | None = None,
             progress: bool = False, resume: bool = False, per_example: bool = False, fold_bn: bool = True) -> dict:
    """Accuracy of ``model`` on ``data`` under each attack.

    ``attacks_to_run`` holds ``"clean"``, attack names understood by
    :func:`cstar.attacks.parse_attack` (``"fgsm"``, ``"pgd20"``, ``"aa"``...) or
    :class:`~cstar.attacks.AttackSpec` objects. ``n`` evaluates the first ``n``
    examples (all when None). ``step`` overrides the PGD step (default from
    ``parse_attack``). Returns ``{"accuracy": {label: float}, "n_examples": int,
    "subset": str, "eps": float, "norm": str, "seconds": {label: float}}``;
    ``per_example=True`` adds ``"per_example": {label: str}``, one character per
    evaluated example in order, ``"1"`` where the model was right (for paired
    comparisons of two models on the same examples, see :func:`paired_difference`).
    Under torchrun every rank calls it and gets the same result (``seconds`` are
    rank 0's); only rank 0 writes ``out_path``.

    Each batch's attacks are seeded with ``seed + batch index``, so results do
    not depend on where a run started. With ``out_path`` (in one process) the
    counts so far are kept in ``<out_path>.partial`` after every batch; with
    ``resume=True`` a killed evaluation continues after its last finished batch
    (a long AutoAttack run loses at most one batch).

    With ``fold_bn`` (default) the attacks and predictions run on a copy of the
    model with each BatchNorm folded into the conv before it
    (:func:`cstar.fold_batchnorm`): the same function within float rounding, and
    1.3x faster attacks on a CIFAR ResNet-18 (``benchmarks/bench_attack_throughput.py``).
    A model that ``torch.fx`` cannot trace is evaluated as it is.
    """
    if n is not None and n < 1:
        raise CstarError(f"n={n}: evaluate at least one example, or pass n=None for the whole set")
    specs = []
    for a in attacks_to_run:
        if isinstance(a, attacks.AttackSpec) or a == "clean":
            specs.append(a)
        else:
            specs.append(attacks.parse_attack(a, eps, norm=norm, step=step))
    labels = [s if s == "clean" else s.label for s in specs]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    target = folded_or_same(model) if fold_bn else model
    correct = dict.fromkeys(labels, 0)
    hits = {k: "" for k in labels}  # filled only with per_example
    seconds = dict.fromkeys(labels, 0.0)
    total = 0
    shard, shard_n, sharded = _shard(data, n, batch_size, device)
    partial = Path(f"{out_path}.partial") if out_path is not None and not sharded else None
    state = {"labels": labels, "eps": eps, "n": n, "batch_size": batch_size, "seed": seed}
    done = 0
    if resume and partial is not None and partial.exists():
        saved = json.loads(partial.read_text())
        if {k: saved.get(k) for k in state} != state:
            raise CstarError(f"{partial} was written by an evaluation with other settings "
                             f"({ {k: saved.get(k) for k in state} }): delete it, or resume with the same settings")
        done, total, correct, seconds = saved["batches"], saved["total"], saved["correct"], saved["seconds"]
        if per_example and "per_example" not in saved:
            raise CstarError(f"{partial} holds counts only (written without per_example): delete it to start over, "
                             f"or resume without per_example")
        hits = saved.get("per_example", hits)
    # each batch's attacks are seeded with seed + index; the caller's random state is restored afterwards
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            for index, (xb, yb) in enumerate(_batches(shard, shard_n, batch_size, device)):
                if index < done:
                    continue
                torch.manual_seed(seed + index)
                total += len(yb)
                for spec, label in zip(specs, labels):
                    t0 = time.perf_counter()
                    x_eval = xb if spec == "clean" else spec(target, xb, yb)
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
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if per_example:
        result["per_example"] = hits
    if out_path is not None and distributed.is_main():
        write_json(out_path, robustbench_card(result, meta or {}))
    if partial is not None and partial.exists():
        partial.unlink()
    return result


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
    """A RobustBench-style model card: accuracies in percent, threat model, eps (and the per-example results,
    when evaluated with them)."""
    acc = result["accuracy"]
    card = {
        **meta,
        "threat_model": {"linf": "Linf", "l2": "L2"}.get(result["norm"], result["norm"]),
        "eps": result["eps"],
        "n_examples": result["n_examples"],
        "subset": result["subset"],
    }
    for label, value in acc.items():
        key = "autoattack_acc" if label == "autoattack" else f"{label}_acc"
        card[key] = round(100 * value, 2)
    card["seconds"] = result["seconds"]
    if "per_example" in result:
        card["per_example"] = result["per_example"]
    return card


def format_results(rows: dict[str, dict], labels: Sequence[str] | None = None) -> str:
    """A markdown table: one row per model/phase, one column per attack (percent)."""
    labels = list(labels or next(iter(rows.values()))["accuracy"].keys())
    lines = ["| model | n | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for name, res in rows.items():
        cells = [f"{100 * res['accuracy'][k]:.2f}" if k in res["accuracy"] else "-" for k in labels]
        lines.append(f"| {name} | {res['n_examples']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
