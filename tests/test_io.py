"""Atomic files, checkpoints and run directories."""

import os
import stat
import tempfile

import pytest
import torch

from cstar._core.errors import CstarError
from cstar._core.io import (atomic_write_bytes, load_checkpoint, load_latest_checkpoint, previous_checkpoint, save_checkpoint)
from cstar.files.run_dirs import LOCK, RUN_RECORD, prepare_run_dir


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_a_failed_write_keeps_the_previous_version(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"good")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CstarError, match="free some disk space"):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_an_unwritable_directory_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(CstarError, match="writable"):
            save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, keep_previous=True)
    finally:
        tmp_path.chmod(0o755)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_an_unwritable_directory_as_root_is_simulated(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(CstarError, match="make the directory writable"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}}, keep_previous=True)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_keep_previous_keeps_one_older_version(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for value in (1.0, 2.0, 3.0):
        save_checkpoint(path, {"model": {"w": torch.full((2,), value)}}, keep_previous=True)
    assert load_checkpoint(path)["model"]["w"][0] == 3.0
    assert load_checkpoint(previous_checkpoint(path))["model"]["w"][0] == 2.0


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_with_a_warning(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1}, keep_previous=True)
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 2}, keep_previous=True)
    path.write_bytes(path.read_bytes()[:100])  # truncated, as by a failing disk
    with pytest.warns(UserWarning, match="previous checkpoint"):
        assert load_latest_checkpoint(path)["epoch"] == 1


def test_a_corrupt_checkpoint_without_a_previous_version_is_an_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CstarError, match="corrupt"):
        load_latest_checkpoint(path)


def test_checkpoint_round_trip(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": [{"loss": 0.5}]}
    save_checkpoint(tmp_path / "c.pt", state)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))


def test_checkpoint_needing_pickled_code_is_refused(tmp_path):
    torch.save({"model": {}, "hook": os.getcwd}, tmp_path / "evil.pt")
    with pytest.raises(CstarError, match="weights_only"):
        load_checkpoint(tmp_path / "evil.pt")


def test_truncated_checkpoint_is_reported(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"model": {"w": torch.zeros(100)}})
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "c.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CstarError, match="corrupt"):
        load_checkpoint(tmp_path / "c.pt")


def test_run_dir_is_protected_unless_forced_or_resumed(tmp_path):
    run = prepare_run_dir(tmp_path / "run", "train")
    (run / "results.json").write_text("{}")
    with pytest.raises(CstarError, match="--force"):
        prepare_run_dir(run, "train")
    assert prepare_run_dir(run, "train", resume=True) == run and (run / "results.json").exists()
    prepare_run_dir(run, "train", force=True)
    assert {p.name for p in run.iterdir()} == {LOCK, RUN_RECORD}  # emptied, then marked and locked afresh
