"""Checksummed, atomic downloads and safe tar extraction.

A file only ever appears at its destination complete: data is streamed to a
temporary file in the same directory, checked, then moved into place with
``os.replace``. On any failure the temporary file is deleted.
"""

import hashlib
import http.client
import logging
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from .._core.errors import CstarError

_log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def _stream_to_temp(src: BinaryIO, dest: Path) -> tuple[Path, dict[str, str]]:
    """Copy ``src`` into a new temporary file beside ``dest``; return its path and md5/sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                for h in hashes.values():
                    h.update(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp), {k: h.hexdigest() for k, h in hashes.items()}


def _file_digests(path: Path) -> dict[str, str]:
    hashes = {"md5": hashlib.md5(), "sha256": hashlib.sha256()}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {k: h.hexdigest() for k, h in hashes.items()}


def _mismatches(digests: dict[str, str], expected: dict[str, str]) -> list[str]:
    return [f"{kind} expected {value}, got {digests[kind]}"
            for kind, value in expected.items() if digests[kind] != value.lower()]


def download(url: str, dest_path: str | os.PathLike, sha256: str | None = None,
             md5: str | None = None) -> Path:
    """Fetch ``url`` (``http(s)://`` or ``file://``) to ``dest_path`` atomically; return the path.

    If ``dest_path`` already exists and matches the given checksums (or none
    are given), nothing is fetched. Otherwise the data is streamed to a
    temporary file in the same directory, checked against ``sha256`` and/or
    ``md5`` (hex strings), and moved into place. A network error or checksum
    mismatch raises ``CstarError`` and leaves no file behind.
    """
    dest = Path(dest_path)
    expected = {k: v for k, v in (("sha256", sha256), ("md5", md5)) if v}
    if dest.is_file() and not _mismatches(_file_digests(dest), expected):
        return dest
    _log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            tmp, digests = _stream_to_temp(response, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise CstarError(
            f"could not download {url} ({getattr(e, 'reason', e)}): check the network, set a "
            f"mirror (mirror=URL or env CSTAR_MIRROR), or put the file at {dest} yourself") from e
    if bad := _mismatches(digests, expected):
        tmp.unlink()
        raise CstarError(
            f"checksum mismatch for {url} ({'; '.join(bad)}): the download is corrupt or the "
            f"mirror serves another file; it was deleted, retry (or use another mirror)")
    os.replace(tmp, dest)
    return dest


def _checked_member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's relative path; ``CstarError`` for absolute paths, ``..``, links or devices."""
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
        raise CstarError(
            f"unsafe member {member.name!r} in {archive}: refusing to extract it; "
            f"delete the archive and download it again from the official site")
    return path


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Extract the regular files of a (compressed) tar into ``dest_dir``, each one atomically.

    Every member is checked first: an absolute path, a ``..`` component, a
    link or a device raises ``CstarError`` before anything is written.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [(m, _checked_member_path(m, archive)) for m in tar.getmembers()]
            for member, rel in members:
                if member.isfile():
                    tmp, _ = _stream_to_temp(tar.extractfile(member), dest_dir / rel)
                    os.replace(tmp, dest_dir / rel)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise CstarError(
            f"cannot extract {archive} ({e}): delete it and download it again") from e
