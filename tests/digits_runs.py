"""Settings and helpers of the tests that run the command line on digits (tiny, in-package data); the runs
themselves (``trained``, ``compressed``, ``compared``, ``mnist_run``) are fixtures in ``conftest.py``."""

import os
from pathlib import Path

import cstar
from cstar._core.io import save_checkpoint
from cstar.cli import main

DATA = os.environ.get("CSTAR_TEST_DATA")
ROOT = Path(__file__).resolve().parent.parent
FAST = ["--epochs", "1", "--attack-steps", "2", "--batch-size", "64", "--val-size", "100", "--check-size", "50",
        "--eval-attacks", "clean,pgd3", "--eval-n", "100", "--no-progress", "--optimizer", "adam", "--lr", "0.002"]
SECTION = "{epochs: 1, optimizer: adam, lr: 0.002, attack_steps: 2, batch_size: 64, check_size: 50}"
PIPELINE = ["--data", "digits", "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean,pgd3",
            "--no-progress", "--finetune", SECTION, "--search", SECTION]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``cstar argv``."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def refused(capsys, *argv) -> str:
    """The one error line of a refused command (exit 2)."""
    code, _, err = run(capsys, *argv)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def old_model_pt(run: Path, path: Path, **entries) -> Path:
    """The model of the ``cstar train`` run ``run`` written to ``path`` as the ``model.pt`` that 'cstar train'
    wrote before it wrote a save directory (weights, model config, dataset and eps; ``entries`` replace them)."""
    model = cstar.load(run / "model")
    return save_checkpoint(path, {"model": model.state_dict(), "model_config": model.cstar_config,
                                  **model.cstar_trained_on, **entries})
