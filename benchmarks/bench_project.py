"""Speed of the Tucker-2 projection (the ADMM Z-step) on every conv of CIFAR ResNet-18.

Usage: ``python benchmarks/bench_project.py [--repeats 5] [--threads N]``

Builds width-64 CIFAR ResNet-18 with random initial weights (timings do not
depend on the values), plans ranks for 16x fewer parameters with
``select_ranks``, and times projecting its convs in two settings:

- ``16x plan``: every conv the plan factorises, at the planned ranks (Tucker-2
  for k x k convs, SVD for 1x1 convs);
- ``1/4 ranks``: the 17 3x3 convs at a quarter of each mode, the setting of the
  published projection-speed reference (a quarter of each mode).

Methods: (a) ``tucker2_project``/``svd_project`` (eigendecompositions of the
small Gram matrices), (a') the same with one HOOI sweep, (b) truncated HOSVD
from ``torch.linalg.svd`` of the unfoldings (the slow way, written here), (c)
TensorLy's ``partial_tucker`` (HOOI, its defaults) if ``tensorly`` is importable
(k x k convs only: TensorLy has no 1x1 path of its own; the 1x1 convs are
projected by ``svd_project`` in that row). Each time is the median of
``--repeats`` runs; the relative error is ``sqrt(sum ||W - P(W)||^2 / sum ||W||^2)``
over the projected convs. Writes ``benchmarks/results/project.json`` and ``project.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from cstar.records import describe_device, machine, write_json, write_text
from cstar.lowrank import select_ranks, svd_project, tucker2_project
from cstar.models import create

RESULTS = Path(__file__).resolve().parent / "results"


def svd_hosvd_project(weight: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """Truncated HOSVD projection from ``torch.linalg.svd`` of both channel unfoldings."""
    c_out, c_in = weight.shape[:2]
    u_out = torch.linalg.svd(weight.reshape(c_out, -1), full_matrices=False)[0][:, : ranks[0]]
    u_in = torch.linalg.svd(weight.transpose(0, 1).reshape(c_in, -1), full_matrices=False)[0][:, : ranks[1]]
    core = torch.einsum("oihw,oa,ib->abhw", weight, u_out, u_in)
    return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)


def svd_matrix_project(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank-``rank`` projection of a 1x1 kernel from ``torch.linalg.svd``."""
    u, s, vh = torch.linalg.svd(weight[:, :, 0, 0], full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank])[:, :, None, None]


def tensorly_project():
    """TensorLy's partial_tucker on modes (0, 1), or None if tensorly is not installed."""
    try:
        import tensorly
        from tensorly.decomposition import partial_tucker
    except ImportError:
        return None
    tensorly.set_backend("pytorch")

    def project(weight: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
        result = partial_tucker(weight, rank=list(ranks), modes=[0, 1])
        core, (u_out, u_in) = result[0] if isinstance(result[0], tuple) else result  # 0.8+: ((core, factors), errors)
        return torch.einsum("abhw,oa,ib->oihw", core, u_out, u_in)

    return project, tensorly.__version__


def run(jobs: list[tuple[torch.Tensor, tuple[int, ...]]], kxk, pointwise, repeats: int) -> dict:
    """Median seconds over ``repeats`` of projecting every job, and the relative error."""

    def once() -> list[torch.Tensor]:
        return [kxk(w, r) if w.shape[2:] != (1, 1) else pointwise(w, r[0]) for w, r in jobs]

    times, projected = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        projected = once()
        times.append(time.perf_counter() - start)
    error = sum(float((w - p).square().sum()) for (w, _), p in zip(jobs, projected))
    energy = sum(float(w.square().sum()) for w, _ in jobs)
    return {"seconds": statistics.median(times), "all_seconds": times, "rel_error": (error / energy) ** 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create("resnet18", 10).eval()
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    plan = select_ranks(model, 16)
    settings = {
        "16x plan": [(convs[n].weight.detach(), p.ranks) for n, p in plan.layers.items() if p.kind != "dense"],
        "1/4 ranks": [(m.weight.detach(), (max(1, m.out_channels // 4), max(1, m.in_channels // 4)))
                      for m in convs.values() if m.kernel_size == (3, 3)],
    }
    methods = {
        "tucker2_project (eigh of Gram)": (tucker2_project, svd_project),
        "tucker2_project, 1 HOOI sweep": (lambda w, r: tucker2_project(w, r, n_iter=1), svd_project),
        "torch.linalg.svd of unfoldings": (svd_hosvd_project, svd_matrix_project),
    }
    tensorly = tensorly_project()
    if tensorly is not None:
        methods[f"TensorLy {tensorly[1]} partial_tucker"] = (tensorly[0], svd_project)

    rows = []
    for setting, jobs in settings.items():
        baseline = None
        for method, (kxk, pointwise) in methods.items():
            result = run(jobs, kxk, pointwise, args.repeats)
            baseline = baseline or result["seconds"]
            rows.append({"setting": setting, "convs": len(jobs), "method": method, **result})
        for row in rows:
            if row["setting"] == setting:
                row["speedup_vs_eigh"] = row["seconds"] / baseline

    device = describe_device("cpu")
    lines = [
        "# Tucker-2 projection of every conv, CIFAR ResNet-18 (width 64, random weights)",
        "",
        f"Machine: {device}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"torch {torch.__version__}; median of {args.repeats} runs. "
        f"16x plan: {plan.achieved_ratio:.2f}x params ({plan.params:,} of {plan.dense_params:,}).",
        "" if tensorly is not None else "TensorLy is not installed: its row is skipped (pip install tensorly).",
        "",
        "| setting | convs | method | seconds | x slower than eigh | rel. error |",
        "|---|---|---|---|---|---|",
        *(f"| {r['setting']} | {r['convs']} | {r['method']} | {r['seconds']:.3f} | {r['speedup_vs_eigh']:.1f} | "
          f"{r['rel_error']:.4f} |" for r in rows),
        "",
        "Command: `python benchmarks/bench_project.py" + (f" --threads {args.threads}" if args.threads else "")
        + f" --repeats {args.repeats}`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "project.json", {"environment": machine("cpu"), "plan_ratio": plan.achieved_ratio,
                                          "tensorly": None if tensorly is None else tensorly[1], "rows": rows})
    write_text(RESULTS / "project.md", text)


if __name__ == "__main__":
    main()
