"""SIGINT and SIGTERM for long-running operator commands: both stop cleanly, and never mid-call or mid-rollback.

`fv serve` and `fv switch` treat SIGTERM like Ctrl-C (an orchestrator or `kill`
must not skip the cleanup a Ctrl-C gets). SIGINT is set explicitly because a process
started in the background by a shell script inherits it ignored, and Python then
never raises KeyboardInterrupt.

Two ways to react:
  * `interrupt_on_stop_signals`: raise KeyboardInterrupt at once (the supervisor's loop,
    which only sleeps between checks);
  * `stop_requests`: only record the signal; the work checks `raise_if_stopped()` at
    safe points. A switch uses it: an exception raised inside tritonclient's event loop
    (gevent) would be printed by gevent and could leave a call half done, while a check
    between steps lets the rollback start from a known state, within a step's time.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from fv_serving.errors import StopRequested, SwitchError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # signals recorded under `stop_requests`


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _record(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)


@contextmanager
def _handlers(handler: signal.Handlers | object) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}  # type: ignore[arg-type]
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while inside."""
    with _handlers(_raise_interrupt):
        yield


@contextmanager
def stop_requests() -> Iterator[None]:
    """SIGINT and SIGTERM are recorded while inside; `raise_if_stopped` turns them into StopRequested."""
    _received.clear()
    with _handlers(_record):
        try:
            yield
        finally:
            _received.clear()


def raise_if_stopped() -> None:
    """At a safe point: StopRequested if a stop signal arrived (under `stop_requests`)."""
    if _received:
        raise StopRequested(f"interrupted ({signal.Signals(_received[0]).name})")


def wait_until(done: Callable[[], bool], deadline: float, failure: str, poll_s: float = 0.02) -> None:
    """Poll `done` until it holds, stopping at a stop signal (StopRequested) or at `deadline` (SwitchError(failure))."""
    while not done():
        raise_if_stopped()
        if time.monotonic() > deadline:
            raise SwitchError(failure)
        time.sleep(poll_s)


@contextmanager
def signals_held() -> Iterator[None]:
    """Block SIGINT and SIGTERM while inside (a rollback, a confirmation); they are delivered on exit."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
