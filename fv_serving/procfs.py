"""What /proc says about processes, and the tail of a log: shared by the Triton and gateway process code."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name: [state, ppid, pgrp, ...], or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    """Alive and not a zombie (a detached process's parent may never reap it)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
        return ""


def _live_with(field_index: int, value: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields is not None and int(fields[field_index]) == value and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return sorted(found)


def children(pid: int) -> list[int]:
    """Live children of a process."""
    return _live_with(1, pid)


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (zombies only wait to be reaped: not counted)."""
    return _live_with(2, pgid)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def log_tail(path: Path, lines: int, skip_prefixes: tuple[str, ...] = ()) -> str:
    """The last lines of a log (read from its last 256 KiB), without lines starting with `skip_prefixes`."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, file_size(path) - 256 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    kept = (
        [line for line in text.splitlines() if not line.startswith(skip_prefixes)]
        if skip_prefixes
        else text.splitlines()
    )
    return "\n".join(kept[-lines:])


def reap_if_child(pid: int) -> None:
    """Collect the exit status of a detached process this very process started (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
