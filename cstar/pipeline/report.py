"""The human-readable report of a compression run: ``report.md`` plus PNG plots.

Plots need matplotlib (the ``plots`` extra); without it the report says so and
holds the same figures as tables.
"""

from __future__ import annotations

from pathlib import Path

from ..evaluation.evaluate import describe_attacks
from .._core.io import atomic_write_bytes, atomic_write_text
from ..lowrank import RankPlan
from .phases import eps_text


def _accuracy_table(results: dict) -> str:
    accuracy = results["accuracy"]
    if not accuracy:
        return "(not evaluated)"
    labels = sorted({k for acc in accuracy.values() for k in acc}, key=lambda k: (k != "clean", k))
    lines = ["| phase | subset | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for phase, acc in accuracy.items():
        cells = [f"{100 * acc[k]:.2f}" if k in acc else "-" for k in labels]
        lines.append(f"| {phase} | {results['eval_subset'][phase]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(value) -> str:
    """A figure for a table: floats to 4 significant digits (``ratio=8.013``, not 8.01329744279946)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _phase_table(results: dict) -> str:
    lines = ["| phase | wall time (s) | details |", "|---|---|---|"]
    for phase, info in results["phases"].items():
        details = ", ".join(f"{k}={_shown(v)}" for k, v in info.items() if k not in ("seconds", "final_residual"))
        lines.append(f"| {phase} | {info.get('seconds', '')} | {details} |")
    return "\n".join(lines)


def _residual_table(history: list[dict]) -> str:
    if not history:
        return "(no Z-step recorded)"
    lines = ["| Z-step | optimiser step | rho | mean residual | max residual |", "|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['z_step']} | {h['step']} | {h['rho']:.3g} | {h['residual_mean']:.4f} | "
                     f"{h['residual_max']:.4f} |")
    return "\n".join(lines)


def _full_rank(layer) -> int:
    """The largest rank a layer's factorisation can have: min(out, in) for an SVD, the larger mode otherwise."""
    if not layer.shape:
        return 0
    out_channels, in_channels = layer.shape[:2]
    return min(out_channels, in_channels) if layer.kind == "svd" else max(out_channels, in_channels)


def _plots(out: Path, results: dict, plan: RankPlan, history: list[dict]) -> list[str]:
    """Write the PNG plots; return their file names (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []

    def save(fig, name: str) -> None:
        from io import BytesIO

        buffer = BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        atomic_write_bytes(out / name, buffer.getvalue())
        written.append(name)

    if results["accuracy"]:
        phases = list(results["accuracy"])
        labels = sorted({k for acc in results["accuracy"].values() for k in acc})
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            values = [100 * results["accuracy"][p].get(label, float("nan")) for p in phases]
            ax.bar([j + i * width for j in range(len(phases))], values, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(phases))], phases)
        shown = [100 * v for acc in results["accuracy"].values() for v in acc.values()]
        low, high = min(shown), max(shown)
        margin = max(1.0, 0.15 * (high - low))  # a 0-100 axis would hide a change of a few points
        ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
        ax.set_ylabel("accuracy (%)")
        ax.set_title("accuracy by phase")
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, not over the first one
        save(fig, "accuracy_by_phase.png")

    names = [n for n, layer in plan.layers.items()]
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 3.5))
    full = [_full_rank(plan.layers[n]) for n in names]
    kept = [max(plan.layers[n].ranks) for n in names]
    ax.bar(range(len(names)), full, color="#cccccc", label="full rank (max over modes)")
    ax.bar(range(len(names)), kept, label="kept rank (max over modes)")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("rank")
    ax.set_title(f"ranks by layer ({plan.budget} budget, {plan.achieved_ratio:.2f}x params)")
    ax.legend()
    save(fig, "ranks_by_layer.png")

    if history:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [h["z_step"] for h in history]
        ax.plot(steps, [h["residual_max"] for h in history], marker="x", linestyle="--", linewidth=2.5,
                label="max over layers")
        ax.plot(steps, [h["residual_mean"] for h in history], marker="o", markersize=3, label="mean")  # on top
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("Z-step")
        ax.set_ylabel("||W - Z|| / ||W||")
        ax.set_yscale("log")
        ax.set_title("ADMM primal residual")
        ax.legend()
        save(fig, "admm_residual.png")
    return written


def write_report(out: Path, results: dict, plan: RankPlan, history: list[dict]) -> Path:
    """Write ``report.md`` (and plots) into ``out``; returns the report's path."""
    plots = _plots(out, results, plan, history)
    params, macs = results["params"], results.get("macs")
    summary = f"parameters {params['dense']:,} -> {params['compressed']:,} ({params['ratio']:.2f}x)"
    if macs:
        summary += f"; MACs {macs['dense']:,} -> {macs['compressed']:,} ({macs['ratio']:.2f}x)"
    threat = results.get("threat_model", {})
    if threat:
        subsets = sorted(set(results.get("eval_subset", {}).values()))
        radius = eps_text(threat["eps"], threat.get("train_eps"))
        summary += (f"\n\n{threat.get('dataset') or 'dataset not named'}, {radius}; "
                    f"evaluated on {', '.join(subsets) or 'no test images'}; training budget: {threat['budget']}")
        if threat.get("normalization"):
            summary += f"\n\ninput normalisation: {threat['normalization']}"
    if results.get("attacks"):
        summary += f"\n\nAttacks: {describe_attacks(results['attacks'])}."
    sections = [
        "# CSTAR compression report", "", summary, "",
        "## Accuracy by phase (%)", "", _accuracy_table(results), "",
        "## Phases", "", _phase_table(results), "",
        "## Ranks, parameters and MACs per layer", "", "```", plan.table(), "```", "",
        "## ADMM primal residual ||W - Z|| / ||W||", "", _residual_table(history), "",
    ]
    if plots:
        sections += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    else:
        sections += ["(plots need matplotlib: pip install 'cstar[plots]')"]
    return atomic_write_text(out / "report.md", "\n".join(sections) + "\n")
