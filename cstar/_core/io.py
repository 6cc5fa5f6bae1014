"""Atomic files and checkpoints (run directories: :mod:`cstar.files.run_dirs`).

Everything cstar writes goes through :func:`atomic_write_bytes` (a temporary
file in the target's directory, flushed and fsynced, then ``os.replace``), so a
killed process or a full disk never leaves a half-written file behind: the
previous version stays intact. Checkpoints hold only tensors and plain Python
values and are read back with ``torch.load(weights_only=True)``, which never
unpickles arbitrary code.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CstarError


_WRITE_FIXES = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some disk space (quota)",
                errno.EACCES: "make the directory writable or choose another --out",
                errno.EROFS: "choose a directory on a writable file system"}


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, keep_previous: Path | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; the parent directory must exist.

    With ``keep_previous``, an existing ``path`` is first moved there (one older
    version kept). A failed write (full disk, no permission) raises
    :class:`CstarError` and leaves the previous file untouched.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results and models are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as exc:
        fix = _WRITE_FIXES.get(exc.errno, "check the output directory")
        raise CstarError(f"cannot write {path} ({exc.strerror or exc}): {fix}; "
                         "the previous version of the file, if any, is intact") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON record as a line (a log: appends are not atomic, lines are)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def state_mismatch(model: nn.Module, shapes: dict[str, torch.Size], tied: dict[str, str] | None = None
                   ) -> str | None:
    """What differs between ``shapes`` and the model's state dict (aliases excluded), or None if nothing."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in (tied or {})}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        return (f"missing tensors: {', '.join(missing[:5]) or 'none'}; "
                f"unexpected tensors: {', '.join(extra[:5]) or 'none'}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            return f"tensor {key!r} has shape {tuple(shapes[key])} but the architecture needs {shape}"
    return None


def previous_checkpoint(path: str | os.PathLike) -> Path:
    """Where :func:`save_checkpoint` with ``keep_previous`` keeps the older version: ``<stem>.prev<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_checkpoint(path: str | os.PathLike, state: dict, *, keep_previous: bool = False) -> Path:
    """Save a dict of tensors and plain values atomically (loadable with weights_only).

    ``keep_previous=True`` keeps the version it replaces as
    :func:`previous_checkpoint`, for :func:`load_latest_checkpoint` to fall back on.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue(), keep_previous=previous_checkpoint(path) if keep_previous else None)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CstarError(f"checkpoint {path} does not exist: pass the path of a checkpoint.pt written by 'cstar train'")
    state = load_checkpoint_file(path, map_location)
    if not isinstance(state, dict) or "model" not in state:
        raise CstarError(f"{path} is not a cstar checkpoint (no 'model' entry): pass a checkpoint.pt written by 'cstar train'")
    return state


def load_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Whatever ``torch.load(path, weights_only=True)`` returns (tensors and plain values), or one line saying
    why the file cannot be read (corrupt, not a PyTorch file, or pickled code, which is never run)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle protocol: the refusal below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CstarError(f"cannot read {path}: {_unreadable(path, exc)}; pass a checkpoint cstar wrote or weights "
                         "saved with torch.save(model.state_dict(), path) (cstar loads only tensors and plain values, "
                         "weights_only, never pickled code)") from None
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, from the file's first bytes (torch's own messages are
    often a bare number or a screen long)."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        return "it is empty (corrupt)"
    if head == b"PK\x03\x04":
        kind = "it is a corrupt (damaged or truncated) PyTorch archive"
    elif head[:1] == b"\x80":
        kind = "it is a corrupt (truncated) pickle or holds more than tensors and plain values"
    else:
        return "it is corrupt or not a PyTorch file (a torch.save file starts with a zip or pickle header)"
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        return ("it holds pickled code or objects besides tensors and plain values, which cstar never runs "
                "(refused by torch.load(weights_only=True))")
    detail = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
    return f"{kind} ({detail[:120]})"


def load_latest_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load ``path``, or, when it is missing or unreadable, its previous version with a warning."""
    path = Path(path)
    try:
        return load_checkpoint(path, map_location)
    except CstarError as exc:
        previous = previous_checkpoint(path)
        if not previous.is_file():
            raise
        warnings.warn(f"{exc}; resuming from the previous checkpoint {previous} instead", stacklevel=2)
        return load_checkpoint(previous, map_location)

