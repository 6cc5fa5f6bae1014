"""Atomic files, checkpoints and run directories."""

import os
import stat

import pytest
import torch

from cstar._errors import CstarError
from cstar._io import atomic_write_bytes, load_checkpoint, prepare_run_dir, save_checkpoint


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
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"half")
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


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
    run = prepare_run_dir(tmp_path / "run")
    (run / "results.json").write_text("{}")
    with pytest.raises(CstarError, match="--force"):
        prepare_run_dir(run)
    assert prepare_run_dir(run, resume=True) == run and (run / "results.json").exists()
    prepare_run_dir(run, force=True)
    assert not any(run.iterdir())
