"""Run directories: cstar's alone.

A run (``cstar train``, ``compress``, ``compare``, ``demo``) writes into one
directory, which :func:`prepare_run_dir` creates atomically and marks with
``cstar-run.json`` (the command that made it). For the run's lifetime the
process holds an exclusive ``flock`` on ``.cstar.lock`` inside it, so a second
run into the same directory is refused rather than interleaved. ``--force``
empties only a directory cstar recognises as a run of its own (the marker, or
for a run made before the marker existed, the ``env.json`` cstar writes), and
never the working directory, one of its parents, the home directory or a
symbolic link. ``--resume`` continues only a run of the same command.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from pathlib import Path

from .._core.errors import CstarError
from .._core.io import write_json
from .._version import __version__

RUN_RECORD = "cstar-run.json"  # {"command": ..., "cstar": ...}: this directory is a cstar run
LOCK = ".cstar.lock"  # flock'ed by the process running in the directory; never deleted
_HELD: dict[Path, int] = {}  # run directories this process holds locked -> the lock file's descriptor


def recorded_command(path: str | os.PathLike) -> str | None:
    """The command whose run ``path`` holds, as its ``cstar-run.json`` records; None without one."""
    try:
        record = json.loads((Path(path) / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    command = record.get("command") if isinstance(record, dict) else None
    return command if isinstance(command, str) else None


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a run directory cstar made: its marker, or (a run made before the marker)
    an ``env.json`` as cstar writes it (the cstar and torch versions)."""
    path = Path(path)
    if recorded_command(path) is not None:
        return True
    env = path / "env.json"
    try:
        if env.stat().st_size > 1_000_000:
            return False
        record = json.loads(env.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"cstar", "torch"} <= set(record)


def check_run_dir(path: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False) -> None:
    """Raise :class:`CstarError` when a ``command`` run may not use ``path`` as asked; touches nothing.

    A fresh run needs a missing or empty directory; ``force`` one that is a
    cstar run (:func:`is_run_dir`) and not a protected place; ``resume`` a run
    of ``command``. A directory another process runs in is refused always.
    """
    path = Path(path)
    if resume and force:
        raise CstarError("--resume continues the run in --out and --force empties it: pass only one of them")
    if path.is_symlink() and not path.exists():
        raise CstarError(f"output path {path} is a broken symbolic link: choose another --out")
    if path.exists() and not path.is_dir():
        raise CstarError(f"output path {path} is a file: choose a directory with --out")
    if force:
        _check_may_empty(path)
    if path.is_dir() and _in_use(path):
        raise CstarError(f"output directory {path} is in use by another cstar run (it holds {path / LOCK}): "
                         "wait for that run to finish, or choose another --out")
    if resume:
        _check_resumable(path, command)
    elif not _is_empty(path):
        if not is_run_dir(path):
            what = f"{path} holds files and is not a cstar run (no {RUN_RECORD}, no env.json of cstar's)"
            if force:
                raise CstarError(f"--force empties only a cstar run directory: {what}; nothing was deleted; choose "
                                 "another --out")
            raise CstarError(f"output directory {what}: choose another --out (a new or empty directory)")
        if not force:
            resume_it = "" if command == "demo" else ", --resume to continue its run"  # a demo does not resume
            raise CstarError(f"output directory {path} already exists and is not empty: pass --force to overwrite "
                             f"it{resume_it}, or choose another --out")


def _check_may_empty(path: Path) -> None:
    """Refuse ``--force`` on a symbolic link and on places no run owns: /, home, the working directory
    and the directories above it."""
    if path.is_symlink():
        raise CstarError(f"--force does not empty {path}: it is a symbolic link; nothing was deleted; pass the "
                         "directory itself, or choose another --out")
    where = path.resolve()
    cwd, home = Path.cwd().resolve(), _home()
    reasons = [(where == Path(where.anchor), "the root of the file system"), (where == cwd, "the working directory"),
               (where in cwd.parents, "a parent of the working directory"), (where == home, "your home directory"),
               (where in home.parents, "a parent of your home directory")]
    reason = next((text for hit, text in reasons if hit), None)
    if reason:
        raise CstarError(f"--force never empties {path}: it is {reason}; nothing was deleted; give each run a "
                         "directory of its own with --out")


def _home() -> Path:
    """The home directory (the root when there is none: then no home to protect beyond it)."""
    try:
        return Path.home().resolve()
    except RuntimeError:  # no HOME and no password entry
        return Path("/")


def _check_resumable(path: Path, command: str) -> None:
    """Refuse ``--resume`` where there is no run of ``command`` (a run made before the marker is
    recognised by its ``config.yaml``; its options are checked against ``command``'s when read)."""
    fix = "check the path, or start a new run without --resume"
    if not path.is_dir():
        raise CstarError(f"there is no run in {path} to resume (it does not exist): {fix}")
    made_by = recorded_command(path)
    if made_by is None and not (path / "config.yaml").is_file():
        raise CstarError(f"there is no cstar run in {path} to resume (no {RUN_RECORD} or config.yaml): {fix}")
    if made_by not in (None, command):
        raise CstarError(f"{path} holds a 'cstar {made_by}' run, not a 'cstar {command}' run: resume it with "
                         f"'cstar {made_by} --resume --out {path}', or choose another --out")


def _is_empty(path: Path) -> bool:
    """True for a missing directory and one holding nothing but a lock file."""
    return not path.is_dir() or all(p.name == LOCK for p in path.iterdir())


def _in_use(path: Path) -> bool:
    """Whether another process holds ``path``'s lock (this process's own lock does not count)."""
    if path.resolve() in _HELD or not (path / LOCK).is_file():
        return False
    try:
        fd = os.open(path / LOCK, os.O_RDWR)
    except OSError:
        return False  # unreadable: the run's own writes will say what is wrong
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)  # closing releases a lock taken here


def _lock(path: Path) -> None:
    """Take ``path``'s lock for this process (held until :func:`release_run_dirs` or the process ends)."""
    key = path.resolve()
    if key in _HELD:
        return
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CstarError(f"cannot create {path / LOCK} ({exc.strerror}): choose a writable --out") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CstarError(f"output directory {path} is in use by another cstar run (it holds {path / LOCK}): "
                         "wait for that run to finish, or choose another --out") from None
    _HELD[key] = fd


def release_run_dirs() -> None:
    """Release every run directory this process holds (at the end of a command)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def _make(path: Path) -> None:
    """Create ``path``: its parents as needed, the directory itself only if it does not exist yet (an
    existing one, even one another process has just made, is left to the checks under the lock)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        if not path.is_dir():
            raise CstarError(f"output path {path} is a file: choose a directory with --out") from None
    except OSError as exc:
        raise CstarError(f"cannot create output directory {path} ({exc.strerror}): choose a writable --out") from None


def _empty(path: Path) -> None:
    """Delete everything in ``path`` but its lock, following no symbolic link."""
    for entry in path.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def prepare_run_dir(path: str | os.PathLike, command: str, *, force: bool = False, resume: bool = False) -> Path:
    """Create (or with ``resume`` reopen, with ``force`` empty) the directory of a ``command`` run, lock it
    for this process and mark it as cstar's; see :func:`check_run_dir` for what is refused.

    The checks run again once the lock is held, so two processes racing for
    one directory cannot both use it.
    """
    path = Path(path)
    check_run_dir(path, command, force=force, resume=resume)
    _make(path)
    _lock(path)
    check_run_dir(path, command, force=force, resume=resume)
    if force:
        _empty(path)
    if recorded_command(path) is None:
        write_json(path / RUN_RECORD, {"command": command, "cstar": __version__})
    return path
