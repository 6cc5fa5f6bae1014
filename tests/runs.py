"""Run directories for the run-directory tests: cstar runs of each command, made before and after the marker,
and a lock held as a running cstar process holds it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

import yaml

from cstar.files.run_dirs import LOCK, prepare_run_dir, release_run_dirs

# A few options each command records in config.yaml (options only that command takes, as a real record has).
RECORDS = {"train": {"model": "small_cnn", "data": "digits", "epochs": 1, "lr": 0.01},
           "compress": {"model": "small_cnn", "data": "digits", "ratio": 4.0, "eval_phases": "final"},
           "compare": {"model": "small_cnn", "data": "digits", "ratios": "4", "methods": "dense,cstar"}}
ENV = {"cstar": "0.1.0", "torch": "2.0", "seed": 0}  # what cstar's env.json holds (in part)


def make_run(path: Path, command: str, *, marked: bool = True) -> Path:
    """A finished-looking ``command`` run in ``path``: config.yaml, env.json, results.json, and (``marked``)
    the cstar-run.json marker; without it, a run made by a cstar that wrote no marker."""
    if marked:
        prepare_run_dir(path, command)
        release_run_dirs()
    else:
        path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(RECORDS[command]))
    (path / "env.json").write_text(json.dumps(ENV))
    (path / "results.json").write_text("{}")
    return path


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """Hold ``path``'s run lock as a cstar process running there does (another open file: another holder)."""
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and symbolic link (its target) under ``root``, by relative path."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                seen[key] = "-> " + os.readlink(path)
            elif path.is_file():
                seen[key] = path.read_bytes()
    return seen
