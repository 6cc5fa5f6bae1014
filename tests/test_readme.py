"""Every code block of the README runs as written, in order, on a token budget (``readme_budget/sitecustomize.py``
on the blocks' ``PYTHONPATH``: one epoch per training phase, the first images of each dataset).

The blocks share one working directory, as a reader's terminal would (the tour
writes ``runs/mnist``, which the ``cstar compress`` example then reads). The
data root comes from ``CSTAR_DATA`` (``CSTAR_TEST_DATA`` here). A block preceded
by ``<!-- readme-test: skip REASON -->`` is not run (the test command itself,
GPU-only commands); an install prefix ``pip install ... &&`` is dropped, since
the test runs inside that install.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import cstar

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("CSTAR_TEST_DATA")
BLOCK = re.compile(r"(?:<!-- readme-test: skip (?P<skip>[^>]*?) -->[ \t]*\n)?[ \t]*```(?P<lang>python|bash)\n"
                   r"(?P<body>.*?)```", re.S)
BUDGET = ROOT / "tests" / "readme_budget"  # its sitecustomize.py cuts every run to a token budget
INSTALL = re.compile(r"^pip install [^&]*&&\s*", re.M)


def readme_blocks() -> list[tuple[str, str, str | None]]:
    """(language, code, skip reason or None) of every python and bash block, in order."""
    text = (ROOT / "README.md").read_text()
    return [(m["lang"], m["body"], m["skip"]) for m in BLOCK.finditer(text)]


def budget_path() -> str:
    """``PYTHONPATH`` for the blocks: the budget folder first, then what the tests run with."""
    return os.pathsep.join(p for p in (str(BUDGET), os.environ.get("PYTHONPATH")) if p)


def test_every_block_is_run_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 8
    for lang, body, skip in blocks:
        assert skip is None or len(skip.strip()) > 10, f"a skipped block needs its reason: {body[:80]}"
    assert sum(skip is None for _, _, skip in blocks) >= 5


@pytest.mark.skipif(not DATA, reason="CSTAR_TEST_DATA (a root holding MNIST/raw) is not set")
@pytest.mark.timeout(900)
def test_the_readme_examples_run_as_written(tmp_path):
    env = {**os.environ, "CSTAR_DATA": DATA, "OMP_NUM_THREADS": "1", "PYTHONPATH": budget_path(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for index, (lang, body, skip) in enumerate(readme_blocks()):
        if skip is not None:
            continue
        if lang == "python":
            command = [sys.executable, "-c", body]
        else:
            command = ["bash", "-euo", "pipefail", "-c", INSTALL.sub("", body)]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (f"README block {index} ({lang}) failed:\n{body}\n--- stdout ---\n"
                                      f"{proc.stdout[-2000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")


def test_the_budget_caps_training_and_data_from_outside_the_package():
    probe = ("import cstar; print(cstar.TrainConfig(epochs=5, check_size=500).epochs, "
             "cstar.TrainConfig(epochs=5, check_size=500).check_size, len(cstar.data.load('digits', split='test')), "
             "len(cstar.data.load('digits', split='train')))")
    env = {**os.environ, "PYTHONPATH": budget_path()}
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "64", "64", "1256"]  # digits' 1437 training images cut to the cap
    assert "README budget" in proc.stderr
    assert cstar.TrainConfig(epochs=5).epochs == 5  # without the harness: no cap in cstar itself
