"""The hostile-input harness: every bad input is refused in one line, before any work, leaving nothing behind.

The tables live in ``tests/test_hostile_*.py`` (one file per area); each case
goes through :func:`refused_cli` (a command line) or :func:`refused_api` (a
call of the public API). Both assert what docs/SECURITY.md promises:

- the command exits with code 2 (the API raises :class:`cstar.CstarError`);
- the message is one line, names the problem (``words``) and has no traceback;
- no output path the case names is left behind;
- no marker file is written: crafted files carry code that would create
  ``MARKER`` in the case's directory if cstar ever ran it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cstar._core.errors import CstarError
from cstar.cli import main

MARKER = "PWNED"  # the file a crafted input's code would write beside itself


def marker_command(directory: Path) -> str:
    """A shell command that writes the marker in ``directory`` (what a crafted file asks cstar to run)."""
    return f"touch {directory / MARKER}"


def marker_code(directory: Path) -> str:
    """Python source that writes the marker in ``directory`` when it is executed or imported."""
    return f"open({str(directory / MARKER)!r}, 'w').close()\n"


def assert_no_marker(directory: Path) -> None:
    written = sorted(p for p in Path(directory).rglob(MARKER))
    assert not written, f"a crafted input ran code: {written}"


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert "Traceback" not in text, text
    return lines[0]


def refused_cli(capsys, argv: list[str], words: list[str], *, tmp: Path, left: list[Path] = ()) -> str:
    """Run ``cstar argv``; assert exit 2, one ``error:`` line holding ``words``, none of ``left`` created,
    no marker under ``tmp``. Returns the line."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr:\n{err}"
    line = one_line("\n".join(l for l in err.splitlines() if not l.startswith(("warning", "  warnings.warn"))
                              and "Warning:" not in l))
    assert line.startswith("error: "), line
    for word in words:
        assert word in line, (word, line)
    for path in left:
        assert not Path(path).exists(), f"a refused command left {path} behind"
    assert_no_marker(tmp)
    return line


def refused_api(call, words: list[str], *, tmp: Path | None = None) -> str:
    """Call ``call()``; assert it raises :class:`CstarError` whose one-line message holds ``words``."""
    with pytest.raises(CstarError) as info:
        call()
    message = one_line(str(info.value))
    for word in words:
        assert word in message, (word, message)
    if tmp is not None:
        assert_no_marker(tmp)
    return message
