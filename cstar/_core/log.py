"""The progress lines of cstar's long-running functions (fit, evaluate, compress, compare).

They go to the logger ``"cstar"`` at INFO level, which by default writes the
bare message to the current ``sys.stdout`` (looked up at each line, so pytest,
notebooks and redirections that swap it see them). To silence them:
``logging.getLogger("cstar").setLevel(logging.WARNING)``; to route them into
your own logging: ``logging.getLogger("cstar").handlers.clear()`` and set its
``propagate = True``.
"""

from __future__ import annotations

import logging
import sys


class _CurrentStdout(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stdout`` is when a line is logged."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it once; the current sys.stdout is always used
        pass


logger = logging.getLogger("cstar")
if not logger.handlers:
    _handler = _CurrentStdout()
    _handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def info(message: str) -> None:
    """One progress line (or block) to the ``"cstar"`` logger."""
    logger.info(message)
