"""Shared test settings.

The tests use tiny models, for which torch's thread pool costs more than it
gives; one thread also keeps timings stable when other jobs share the cores.
Real-data tests read ``CSTAR_TEST_DATA`` and ``CSTAR_TEST_CIFAR10`` (README, Tests).
"""

import pytest
import torch
from digits_runs import DATA, FAST, PIPELINE, SECTION

from cstar.cli import main

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- runs of the command line on digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small_cnn trained 1 epoch on digits by 'cstar train' with Adam."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--model", "small_cnn", "--data", "digits", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    if not DATA:
        pytest.skip("CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
    out = tmp_path_factory.mktemp("runs") / "mnist"
    assert main(["train", "--model", "small_cnn", "--data", "mnist", "--root", DATA, "--train-n", "600",
                 "--attack", "clean", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("compress") / "run"
    assert main(["compress", "--checkpoint", str(trained / "model"), *PIPELINE, "--ratio", "2",
                 "--admm", "{interval: 5}", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("compare") / "run"
    assert main(["compare", "--checkpoint", str(trained / "model"), "--data", "digits", "--train-n", "800",
                 "--val-size", "100", "--eval-n", "100", "--eval-attacks", "clean", "--no-progress", "--ratios", "2",
                 "--methods", "dense,magnitude", "--search", SECTION, "--finetune", SECTION, "--latency-runs", "0",
                 "--out", str(out)]) == 0
    return out
