"""Stopping a long run cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption notice).

Inside :func:`stop_requests`, the first SIGINT or SIGTERM only sets a flag: the
training loop finishes its current step, writes a checkpoint and raises
:class:`Interrupted`, which the CLI turns into a one-line message and exit code
128 + signal number. A second SIGINT interrupts at once (``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(Exception):
    """A run stopped on a signal after writing its checkpoint; ``--resume`` continues it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """Set by the handlers of :func:`stop_requests`; ``signum`` is the signal received (None: none)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopFlag]:
    """Catch SIGINT/SIGTERM into a :class:`StopFlag` for the duration of the block.

    Outside the main thread (where handlers cannot be installed) the flag never
    gets set and signals keep their usual effect.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handle(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
