"""Finishing what interrupted switches left behind, before anything else touches a repository.

Run by every switch (under the switch lock) and by `fv serve` before Triton starts:
  1. a running server that serves a forget_step version other than the confirmed one
     (a switch was killed between its load and its confirmation) is asked to load
     forget_step from config.pbtxt again, i.e. back to the confirmed version;
  2. temporary folders of killed version writes are removed;
  3. version folders newer than the confirmed one were never confirmed: they are set
     aside (renamed out of Triton's reach, kept for inspection, pruned later);
  4. every "begin" in the journal without an outcome gets one: "recovered", naming the
     version that is confirmed now.
"""

from __future__ import annotations

import time
from pathlib import Path

from fv_serving.errors import FVError
from fv_serving.triton import journal
from fv_serving.triton.client import TritonClient
from fv_serving.triton.repository import (
    FORGET_STEP_MODEL,
    confirmed_version,
    list_forget_step_versions,
    read_forget_step_metadata,
    remove_temp_folders,
    set_aside_version,
)

#: Index states in which Triton is still working on a version.
BUSY_STATES = ("LOADING", "UNLOADING")


def forget_step_rows(client: TritonClient) -> dict[int, str]:
    """forget_step versions the server knows and their states."""
    return {
        int(e.version): e.state
        for e in client.repository_index()
        if e.name == FORGET_STEP_MODEL and e.version.isdigit()
    }


def wait_until_settled(client: TritonClient, version: int | None, timeout_s: float) -> bool:
    """True once Triton works on no forget_step version (or on `version`, when given) any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = forget_step_rows(client)
        busy = [v for v, state in rows.items() if state in BUSY_STATES and (version is None or v == version)]
        if not busy:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def recover(repository: str | Path, client: TritonClient | None, timeout_s: float) -> list[str]:
    """Steps 1-4 of the module doc; the caller holds the switch lock. Returns what was done, one line each."""
    repo = Path(repository)
    confirmed = confirmed_version(repo)
    notes: list[str] = []
    can_move = True  # no server (a start), or a server that has let go of the newer versions
    if client is not None:
        rows = forget_step_rows(client)
        stray = sorted(v for v, state in rows.items() if v != confirmed and state in ("READY", *BUSY_STATES))
        if stray or rows.get(confirmed) != "READY":
            try:
                client.load_model(FORGET_STEP_MODEL)
                settled = wait_until_settled(client, None, timeout_s)
                notes.append(
                    f"the server had forget_step {stray or 'without the confirmed version'} loaded; reloaded the "
                    f"confirmed version {confirmed}" + ("" if settled else " (still settling)")
                )
            except FVError as exc:
                notes.append(f"could not put the server back on the confirmed version {confirmed}: {exc}")
                can_move = False  # do not move folders the server may be working on
    notes += [f"removed the temporary folder {p.name} of a killed write" for p in remove_temp_folders(repo)]
    if can_move:
        for version in list_forget_step_versions(repo):
            if version > confirmed:
                notes.append(f"set aside unconfirmed version {version} as {set_aside_version(repo, version).name}")
    vector_id = read_forget_step_metadata(repo, confirmed).get("vector_id", "?")
    for begin in journal.unfinished(repo):
        confirmed_now = {"version": confirmed, "vector_id": vector_id}
        journal.append(repo, "recovered", switch=begin.get("switch"), confirmed=confirmed_now, notes=notes)
        notes.append(
            f"interrupted switch {begin.get('switch')} closed: the confirmed version is {confirmed} ({vector_id})"
        )
    return notes
