"""How a comparison reads: the markdown table of its cells and its Pareto view (accuracy against the
parameter ratio, the MACs ratio and the batch-1 latency), from the ``results`` dict of
:func:`cstar.compare` (or its ``results.json``)."""

from __future__ import annotations

from pathlib import Path

from . import compressors
from .._core.io import atomic_write_bytes
from ..evaluation.evaluate import attack_settings, attack_specs, describe_attacks
from .phases import eps_text


def format_comparison(results: dict) -> str:
    """The markdown table of a comparison: one row per (method, ratio)."""
    cells = list(results["cells"].values())
    labels = sorted({k for c in cells for k in c["accuracy"]}, key=lambda k: (k != "clean", k))
    speed = results.get("speed")  # a latency budget's: every cell timed on its runtime
    head = ["method", "target speed-up" if speed else "target", "params", "params ratio", "MACs", "MACs ratio",
            *labels, "AutoAttack", *([f"speed-up on {speed['runtime']} (measured)"] if speed else []),
            "batch-1 latency (ms, 1 thread)", "train (s)"]
    radius = eps_text(results["eps"], results.get("train_eps"))
    lines = [f"Training budget: {results['budget']}.", f"{radius}; accuracy in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ("dense", *compressors.names())
    for c in sorted(cells, key=lambda c: (c["target_ratio"], order.index(c["method"]) if c["method"] in order
                                          else len(order))):
        aa = c.get("autoattack")
        lines.append("| " + " | ".join([
            c["method"], f"{c['target_ratio']:g}x", f"{c['params']:,}", f"{c['params_ratio']:.2f}x",
            f"{c['macs']:,}", f"{c['macs_ratio']:.2f}x",
            *[f"{100 * c['accuracy'][k]:.2f}" if k in c["accuracy"] else "-" for k in labels],
            f"{100 * aa['accuracy']:.2f} ({aa['subset']})" if aa else "-",
            *([_speedup_text(c)] if speed else []),
            f"{c['latency_ms']:.2f}" if "latency_ms" in c else "-",
            f"{sum(c['train_seconds'].values()):.0f}"]) + " |")
    subsets = sorted({c["subset"] for c in cells})
    lines += ["", f"Evaluated on {', '.join(subsets)} of the test set.", f"Attacks: {_attacks_text(results)}."]
    if speed:
        lines.append(f"Speed-ups: every trained model timed beside the dense one ({speed['dense_ms']:.3f} ms) "
                     f"with {speed['measured_on']}, interleaved in pairs, {speed.get('repeats', 1)} times: the "
                     "median dense / model time and (in brackets) its lowest and highest; the dense row is the "
                     "dense model against a copy of itself, the timing's own spread.")
    return "\n".join(lines) + "\n"


def _speedup_text(cell: dict) -> str:
    """A cell's measured speed-up with its range over the timings, e.g. ``1.87x (1.47-2.10)``."""
    if "speedup" not in cell:
        return "-"
    low, high = cell.get("speedup_range", (cell["speedup"], cell["speedup"]))
    return f"{cell['speedup']:.2f}x ({low:.2f}-{high:.2f})"


def _attacks_text(results: dict) -> str:
    """Each attack's eps, step and steps, as the cells record them; for cells from before that record, as the
    comparison's settings give them (a line per distinct setting where the cells differ)."""
    config = results["config"]
    derived = attack_settings(attack_specs(config["eval_attacks"], results["eps"], step=config.get("eval_step"),
                                           warn=False))
    texts = []
    for c in results["cells"].values():
        aa = c.get("autoattack") or {}
        text = describe_attacks({**c.get("attacks", derived), **aa.get("attacks", {})})
        if text not in texts:
            texts.append(text)
    return " | ".join(texts)


# x axes of the Pareto view: (cell key, label, log scale)
_AXES = (("params_ratio", "parameter compression ratio", True), ("macs_ratio", "MACs compression ratio", True),
         ("speedup", "measured speed-up on the runtime", True),
         ("latency_ms", "batch-1 CPU latency (ms, 1 thread)", False))


def plot_pareto(results: dict, path: Path) -> None:
    """The Pareto view of a comparison's ``results`` into the PNG ``path``: each accuracy (a row) against the
    parameter ratio, the MACs ratio and, when every cell has one, the batch-1 latency (the columns), a line per
    method. Nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    from io import BytesIO

    cells = list(results["cells"].values())
    labels = sorted({k for c in cells for k in c["accuracy"]}, key=lambda k: (k != "clean", k))
    axes_used = [axis for axis in _AXES if all(axis[0] in c for c in cells)]
    fig, grid = plt.subplots(len(labels), len(axes_used), figsize=(4.5 * len(axes_used), 3.6 * len(labels)),
                             squeeze=False)
    for row, label in zip(grid, labels):
        for ax, (key, title, log_scale) in zip(row, axes_used):
            for method in dict.fromkeys(c["method"] for c in cells):
                points = sorted((c[key], 100 * c["accuracy"][label]) for c in cells
                                if c["method"] == method and label in c["accuracy"])
                if points:
                    ax.plot(*zip(*points), marker="o", label=method)
            if log_scale:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(title)
            ax.set_ylabel(f"{label} accuracy (%)")
            ax.grid(alpha=0.3)
    grid[0][0].legend()
    buffer = BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
