"""SIGINT and SIGTERM for long-running operator commands: both stop cleanly, and never mid-rollback.

`fv serve` and `fv switch` treat SIGTERM like Ctrl-C (an orchestrator or `kill`
must not skip the cleanup a Ctrl-C gets). SIGINT is set explicitly because a process
started in the background by a shell script inherits it ignored, and Python then
never raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while inside; handlers restored after."""
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM while inside (a rollback, a confirmation); they are delivered on exit."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
