"""Run directories are cstar's alone: one process at a time, --force empties only a cstar run (without following
links), --resume continues only a run of its own command, and single outputs are replaced only with --force."""

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cstar
from cstar import models
from cstar._core.errors import CstarError
from cstar.files.run_dirs import LOCK, RUN_RECORD, prepare_run_dir, recorded_command, release_run_dirs
from cstar.cli import _commands, _runs, main
from runs import make_run, snapshot

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["train", "--model", "small_cnn", "--data", "digits", "--epochs", "1", "--attack-steps", "1",
              "--batch-size", "64", "--val-size", "100", "--check-size", "50", "--eval-attacks", "clean",
              "--eval-n", "50", "--no-progress"]

# A process that waits for the start signal, then prepares the run directory argv[1] ("force" in argv[3]),
# says "won" or "refused", and as the winner holds the directory until its stdin closes.
RACER = """
import sys, time
from pathlib import Path
from cstar._core.errors import CstarError
from cstar.files.run_dirs import prepare_run_dir
print("ready", flush=True)
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
try:
    prepare_run_dir(sys.argv[1], "train", force=sys.argv[3] == "force")
except CstarError as exc:
    print("refused", exc, flush=True)
else:
    print("won", flush=True)
    sys.stdin.read()
"""


def _race(out: Path, start: Path, force: bool, n: int = 3) -> tuple[list[str], list[subprocess.Popen]]:
    """Start ``n`` racers for ``out`` at once; their answers, and the processes (the winner still holding)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(start), "force" if force else "new"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    assert all(r.stdout.readline().strip() == "ready" for r in racers)
    start.touch()
    return [r.stdout.readline().strip() for r in racers], racers


def _finish(racers: list[subprocess.Popen]) -> None:
    for racer in racers:
        racer.stdin.close()
        assert racer.wait(timeout=60) == 0


def test_of_processes_racing_for_a_new_directory_one_runs_the_others_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    answers, racers = _race(out, tmp_path / "start", force=False)
    try:
        assert sorted(a.split()[0] for a in answers) == ["refused", "refused", "won"], answers
        assert all("in use by another cstar run" in a or "already exists" in a for a in answers if a != "won")
        # while the winner runs, a run started now cannot use (nor empty) its directory either
        before = snapshot(out)
        new = ["train", "--model", "small_cnn", "--data", "digits", "--out", str(out)]
        for argv in (new, [*new, "--force"], ["train", "--resume", "--out", str(out)]):
            assert main(argv) == 2 and "in use by another cstar run" in capsys.readouterr().err
        assert snapshot(out) == before
    finally:
        _finish(racers)
    assert prepare_run_dir(out, "train", force=True) == out  # free once its run has ended
    release_run_dirs()


def test_of_processes_racing_to_force_one_run_one_empties_it(tmp_path):
    out = make_run(tmp_path / "run", "train")
    answers, racers = _race(out, tmp_path / "start", force=True)
    _finish(racers)
    assert sorted(a.split()[0] for a in answers) == ["refused", "refused", "won"], answers
    assert {p.name for p in out.iterdir()} == {LOCK, RUN_RECORD}


def test_a_failed_run_releases_its_directory(tmp_path, capsys, monkeypatch):
    def fails(*args, **kwargs):
        raise CstarError("the training failed")

    monkeypatch.setattr(_commands, "fit", fails)
    out = tmp_path / "run"
    assert main([*TRAIN_FAST, "--out", str(out)]) == 2
    assert "the training failed" in capsys.readouterr().err
    fd = os.open(out / LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if the failed run still held it
    finally:
        os.close(fd)


def test_force_restarts_a_cstar_run_from_scratch(tmp_path, capsys):
    out = make_run(tmp_path / "run", "compress")
    (out / "phases.json").write_text("{}")
    assert main([*TRAIN_FAST, "--out", str(out), "--force"]) == 0, capsys.readouterr().err
    assert not (out / "phases.json").exists() and recorded_command(out) == "train"
    assert json.loads((out / "results.json").read_text())["n_examples"] == 50


@pytest.mark.parametrize("marked", [True, False], ids=["marked", "made-before-the-marker"])
def test_force_empties_a_run_without_following_its_links(tmp_path, marked):
    out = make_run(tmp_path / "run", "train", marked=marked)
    (out / "cells").mkdir()
    (out / "cells" / "result.json").write_text("{}")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "thesis.tex").write_text("years of work")
    os.symlink(keep, out / "linked_dir")
    os.symlink(keep / "thesis.tex", out / "linked_file")
    prepare_run_dir(out, "compare", force=True)
    release_run_dirs()
    assert {p.name for p in out.iterdir()} == {LOCK, RUN_RECORD} and recorded_command(out) == "compare"
    assert (keep / "thesis.tex").read_text() == "years of work"


def test_resuming_a_run_made_before_the_marker_marks_it(tmp_path):
    out = make_run(tmp_path / "run", "compress", marked=False)
    before = (out / "results.json").read_text()
    prepare_run_dir(out, "compress", resume=True)
    release_run_dirs()
    assert recorded_command(out) == "compress" and (out / "results.json").read_text() == before


def test_a_rank_that_does_not_prepare_the_directory_gets_rank_0s_refusal(monkeypatch, tmp_path):
    monkeypatch.setattr(_runs.distributed, "is_main", lambda: False)
    monkeypatch.setattr(_runs.distributed, "broadcast_object",
                        lambda obj: (None, "output directory x is in use by another cstar run"))
    with pytest.raises(CstarError, match="in use"):
        _runs.run_dir(tmp_path / "run", "train", force=False, resume=False)


@pytest.fixture
def save(tmp_path):
    return cstar.save(models.create("small_cnn", 10, in_channels=1, input_size=8), tmp_path / "save")


def test_eval_replaces_its_json_only_with_force_and_resume_continues_it(save, tmp_path, capsys):
    card = tmp_path / "eval.json"
    argv = ["eval", str(save), "--data", "digits", "--attacks", "clean", "--n", "20", "--json", str(card)]
    assert main(argv) == 0
    card.write_text('{"edited": true}')
    assert main(argv) == 2 and "--force" in capsys.readouterr().err
    assert json.loads(card.read_text()) == {"edited": True}
    assert main([*argv, "--resume"]) == 0  # continues the evaluation of its --json: not an overwrite refusal
    card.write_text('{"edited": true}')
    assert main([*argv, "--force"]) == 0 and json.loads(card.read_text())["n_examples"] == 20


def test_decompose_and_ranks_replace_their_output_only_with_force(save, tmp_path, capsys):
    target = tmp_path / "factorised"

    def decompose(ratio: str, *extra: str) -> int:
        return main(["decompose", str(save), "--ratio", ratio, "--out", str(target), *extra])

    assert decompose("2") == 0
    weights = (target / "model.safetensors").read_bytes()
    assert decompose("3") == 2
    assert "already exists" in capsys.readouterr().err and (target / "model.safetensors").read_bytes() == weights
    assert decompose("3", "--force") == 0 and (target / "model.safetensors").read_bytes() != weights
    plan = tmp_path / "plan.json"
    plan.write_text("mine")
    ranks = ["ranks", "--model", "small_cnn", "--data", "digits", "--ratio", "2", "--json", str(plan)]
    assert main(ranks) == 2 and plan.read_text() == "mine"
    assert main([*ranks, "--force"]) == 0 and json.loads(plan.read_text())


def test_a_demo_into_an_existing_run_is_not_told_to_resume(tmp_path, capsys):
    out = make_run(tmp_path / "run", "compare")
    assert main(["demo", "--out", str(out)]) == 2
    line = capsys.readouterr().err.strip()
    assert "--force" in line and "--resume" not in line  # cstar demo has no --resume
