"""Who did what, when: the stamps written next to published artifacts (graph metadata, version sidecars, journal).

One definition, so a forced classifier check reads the same in a fused graph's
metadata, in a forget-step version's sidecar and in the switch journal.
"""

from __future__ import annotations

import getpass
import os
import socket
from datetime import datetime, timezone
from typing import Any

from fv_serving.vectors import ForgetVector


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def who() -> str:
    """user@host (pid): enough to find the operator and the process behind a change."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def forced_record(vector: ForgetVector, skipped: str, graph_classifier_sha256: str | None = None) -> dict[str, Any]:
    """What a `--force` skipped, for which vector, by whom and when."""
    return {
        "skipped": skipped,
        "vector_classifier_sha256": vector.classifier.weights_sha256,
        "graph_classifier_sha256": graph_classifier_sha256,
        "at": now_iso(),
        "by": who(),
    }
