"""The switch lock of a repository: one change at a time, and a waiter that says what it waits for.

Triton may load a model twice when two load requests for it arrive at once, and two
switches would race for the version numbers and the confirmation; so every switch
and every recovery of a repository holds an exclusive flock on `<repo>/.fv-switch.lock`.
The kernel releases it when its holder dies, so a kill -9 never leaves it stuck. The
holder writes who it is into the file, so a waiter can name it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fv_serving.errors import SwitchError
from fv_serving.provenance import now_iso, who

LOCK_FILENAME = ".fv-switch.lock"
POLL_S = 0.1


@contextmanager
def switch_lock(repository: str | Path, timeout_s: float, purpose: str) -> Iterator[None]:
    """Hold the repository's lock; wait at most `timeout_s` for it, printing the holder once."""
    path = Path(repository) / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if time.monotonic() > deadline:
                    raise SwitchError(
                        f"another change of {repository} holds its switch lock ({holder}); gave up after "
                        f"{timeout_s:.0f} s. Nothing was changed."
                    ) from None
                if not announced:
                    print(f"waiting up to {timeout_s:.0f} s for the switch lock of {repository}: held by {holder}")
                    announced = True
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"by": who(), "since": now_iso(), "purpose": purpose}).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{info.get('purpose', '?')} by {info.get('by', '?')} since {info.get('since', '?')}"
    except (OSError, json.JSONDecodeError):
        return "an unknown process"
