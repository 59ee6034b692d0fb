"""Named points where a fault-injection test can stop a process, so a kill lands at a known moment.

Off unless $FV_FAILPOINT names the point: then the process writes $FV_FAILPOINT_FILE
(so the test knows it got there) and, in mode "hang" ($FV_FAILPOINT_MODE, the
default), waits there until it is signalled or killed, or until the test deletes
that file (to let it go on after, say, killing the server under it); in mode "mark"
it goes on at once, so the test can strike while the next step (a Triton load) is
under way. Reading one environment variable is all a failpoint costs when it is off.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from fv_serving.triton.signals import raise_if_stopped

POINT_ENV = "FV_FAILPOINT"
MODE_ENV = "FV_FAILPOINT_MODE"
FILE_ENV = "FV_FAILPOINT_FILE"


def failpoint(name: str) -> None:
    if os.environ.get(POINT_ENV) != name:
        return
    marker = Path(os.environ[FILE_ENV])  # a test that names a point names the file too
    marker.write_text(f"{name} {os.getpid()}\n")
    if os.environ.get(MODE_ENV, "hang") == "hang":
        while marker.exists():  # a stop signal ends the wait like any safe point; SIGKILL ends the process
            raise_if_stopped()
            time.sleep(0.05)
