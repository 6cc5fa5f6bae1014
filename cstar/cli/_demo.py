"""``cstar demo``: the whole job, on scikit-learn's bundled 8x8 digits, in about two minutes on 2 CPU cores.

Adversarially trains a small CNN (PGD-7, eps 0.2), then compresses it with
CSTAR beside magnitude channel pruning and post-hoc low rank at the same
ratios and training budget (:func:`cstar.compare`), and prints one table:
parameters, MACs, ratio, clean and PGD-20 accuracy, batch-1 latency.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import data, models
from ..pipeline.admm import ADMMConfig
from ..pipeline.compare import CompareConfig, compare
from ..pipeline.compare_report import format_comparison
from ..training.fit import TrainConfig

METHODS = ("dense", "cstar", "magnitude", "lowrank_global")
VAL_SIZE = 100  # training images held out for the per-epoch PGD check


def demo_config(dense_epochs: int = 20, phase_epochs: int = 4, ratios: tuple[float, ...] = (4.0, 8.0),
                seed: int = 0) -> CompareConfig:
    """The demo's comparison: ``dense_epochs`` of dense PGD-7 training, then ``phase_epochs`` of each
    method's first phase (ADMM for CSTAR) and ``phase_epochs`` of fine-tuning, at ``ratios``."""
    eps = data.DATASETS["digits"].eps

    def phase(epochs: int, lr: float) -> TrainConfig:
        return TrainConfig(attack="pgd", epochs=epochs, batch_size=64, eps=eps, attack_steps=7, optimizer="adam",
                           lr=lr, weight_decay=0.0, check_size=VAL_SIZE, check_steps=5, seed=seed, progress=False)

    return CompareConfig(ratios=list(ratios), methods=list(METHODS), dense=phase(dense_epochs, 2e-3),
                         search=phase(phase_epochs, 1e-3), finetune=phase(phase_epochs, 5e-4),
                         # decoupled: Adam's normalisation would shrink a coupled penalty's pull (see cstar.pipeline.admm)
                         admm=ADMMConfig(rho=0.05, rho_growth=1.5, rho_max=0.5, interval=10, decoupled=True),
                         eval_attacks=["clean", "pgd20"], latency_runs=50)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out: str | Path, config: CompareConfig, seed: int = 0) -> dict:
    """Train the dense robust model and run ``config``'s comparison into ``out``; print and return the results."""
    train_set = data.load("digits", split="train")
    test_set = data.load("digits", split="test")
    spec = train_set.spec
    c, h, _ = spec.image_shape
    torch.manual_seed(seed)
    model = models.create("small_cnn", spec.num_classes, in_channels=c, input_size=h, mean=spec.mean, std=spec.std)
    print(f"cstar demo: small_cnn on scikit-learn's digits ({len(train_set) - VAL_SIZE} train / {len(test_set)} test "
          f"8x8 images), L-inf eps {spec.eps}; {config.dense.epochs} epochs of PGD-7 training, then each method "
          f"at {', '.join(f'{r:g}x' for r in config.ratios)}: {config.budget_text()}", flush=True)
    with _threads(1):  # an 8x8 model: thread start-up costs more than it gives
        results = compare(model, train_set, test_set, config, out, pretrained=False, val_size=VAL_SIZE, seed=seed)
    print()
    print(format_comparison(results), end="")
    print(f"\ncstar is CSTAR (ADMM low-rank training); magnitude is robust channel pruning; lowrank_global is "
          f"post-hoc low rank with the same global ranks. Results in {Path(out) / 'results.json'}")
    return results
