"""Processes and shared memory of a tritonserver: ending its whole process group, cleaning its shm.

Guarded failure modes (serving.md):
- a server that ignores SIGTERM: SIGTERM, a grace period, then SIGKILL of the whole
  process group (the server runs in its own session, so its python-backend stubs go
  with it and nothing is orphaned), also when the leader is already dead;
- shared-memory regions left in /dev/shm by a killed server: each server gets a
  unique python-backend shm prefix; stop removes its own regions, and every start
  removes regions of ours that no live process maps any more.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from fv_serving.errors import ServerError
from fv_serving.procfs import cmdline, group_members, is_alive, log_tail, reap_if_child

SHM_STEM = "fv_triton_"  # every shm prefix we hand out starts with this
SHM_DIR = Path("/dev/shm")


def terminate_group(pid: int, grace_s: float, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the server, wait up to `grace_s`, then SIGKILL its whole process group.

    The group is killed even after a clean exit, to take python-backend stubs that
    outlived the server with it. `child` is the Popen when this process started it
    (so it is reaped rather than left as a zombie).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_exit(pid, grace_s, child):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        wait_exit(pid, 10.0, child)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def wait_exit(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None) -> bool:
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    reap_if_child(pid)
    return True


def end_orphaned_group(pgid: int, marker: str) -> list[int]:
    """SIGKILL what is left of a dead server's process group (its python-backend stubs, say).

    Only when a member's command line holds `marker` (the server's unique shm prefix):
    the group id of a dead leader could in theory belong to someone else by now.
    """
    members = group_members(pgid)
    if not any(marker in cmdline(pid) for pid in members):
        return []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return members


# -- shared memory -----------------------------------------------------------------------------------


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm files whose name starts with `prefix`."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def remove_shm_regions(prefix: str) -> list[Path]:
    """Delete the shm files of one server (by its unique prefix); return what was deleted."""
    if not prefix.startswith(SHM_STEM) or len(prefix) <= len(SHM_STEM):
        raise ServerError(f"refusing to remove shm regions for a prefix that is not ours: {prefix!r}")
    removed = []
    for path in shm_regions(prefix):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def cleanup_stale_shm() -> list[Path]:
    """Delete our shm files (any fv server) that no live process has mapped or open any more.

    They are left by servers that were killed; the python backend never reuses them.
    """
    ours = [p for p in shm_regions(SHM_STEM) if _owned_by_us(p)]
    if not ours:
        return []
    in_use = set(_shm_in_use())
    removed = []
    for path in ours:
        if str(path) not in in_use:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _owned_by_us(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _shm_in_use() -> Iterator[str]:
    """/dev/shm paths mapped or held open by any process we can inspect."""
    prefix = f"{SHM_DIR}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "maps").read_text().splitlines():
                at = line.find(prefix)
                if at >= 0:
                    yield line[at:].removesuffix(" (deleted)")
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(prefix):
                        yield target


def triton_log_tail(path: Path, lines: int) -> str:
    """The last lines of a Triton log, without its wide ASCII tables (they crowd out the errors)."""
    return log_tail(path, lines, skip_prefixes=("|", "+-"))
