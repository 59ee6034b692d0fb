"""The switch journal: an append-only record of every change to what a repository serves.

One JSON object per line in `<repo>/journal.jsonl`: who, when, from which vector to
which (version, vector id, sha256 of the graph), the outcome and, for a rollback, its
reason. A switch writes "begin" before it touches the repository and its outcome
("confirmed", "rolled_back") after; each line is fsynced before the switch goes on or
reports success, so after a crash the journal says how far the switch got and
recovery (`fv_serving.triton.recovery`) can finish the story ("recovered").
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from fv_serving.atomic import fsync_path
from fv_serving.provenance import now_iso, who

JOURNAL_FILENAME = "journal.jsonl"
#: Events that close a "begin" of the same switch id.
OUTCOMES = ("confirmed", "rolled_back", "recovered")


def new_switch_id() -> str:
    return uuid.uuid4().hex[:12]


def journal_path(repository: str | Path) -> Path:
    return Path(repository) / JOURNAL_FILENAME


def entry(event: str, **fields: Any) -> dict[str, Any]:
    """One journal entry, stamped with time and author."""
    return {"event": event, "at": now_iso(), "by": who(), **fields}


def append(repository: str | Path, event: str, **fields: Any) -> dict[str, Any]:
    """Append one event durably to `<repository>/journal.jsonl`; returns what was written."""
    record = entry(event, **fields)
    path = journal_path(repository)
    created = not path.exists()
    line = (json.dumps(record, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_path(path.parent)
    return record


def read(repository: str | Path) -> list[dict[str, Any]]:
    """Every event, oldest first; a last line cut short by a crash is skipped (it was never fsynced whole)."""
    path = journal_path(repository)
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            entries.append(parsed)
    return entries


def unfinished(repository: str | Path) -> list[dict[str, Any]]:
    """The "begin" events that no outcome closed: switches that were interrupted."""
    return unfinished_in(read(repository))


def unfinished_in(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The "begin" events of `entries` (a journal, oldest first) that no outcome closed."""
    closed = {e.get("switch") for e in entries if e.get("event") in OUTCOMES}
    return [e for e in entries if e.get("event") == "begin" and e.get("switch") not in closed]
