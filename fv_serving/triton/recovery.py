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
#: States of a version that is, or is about to be, serving: one other than the pinned is an interrupted switch's.
LIVE_STATES = ("READY", "LOADING")


def version_states(client: TritonClient, model: str) -> dict[int, str]:
    """The versions of `model` the server knows, and their states."""
    return {int(e.version): e.state for e in client.repository_index() if e.name == model and e.version.isdigit()}


def settle(client: TritonClient, model: str, version: int | None, timeout_s: float) -> bool:
    """True once Triton works on no version of `model` (or not on `version`, when given) any more."""
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [
            v for v, state in version_states(client, model).items() if state in BUSY_STATES and version in (None, v)
        ]
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
        rows = version_states(client, FORGET_STEP_MODEL)
        # An older version UNLOADING is Triton letting go after the last switch (a python-backend
        # stub takes ~1 s to exit): nothing to undo, and waiting for it would slow every switch.
        stray = sorted(v for v, state in rows.items() if v != confirmed and state in LIVE_STATES)
        leaving = sorted(v for v, state in rows.items() if v > confirmed and state == "UNLOADING")
        if leaving and not stray:  # a rolled-back version on its way out: let go of it before moving its folder
            can_move = all(settle(client, FORGET_STEP_MODEL, v, timeout_s) for v in leaving)
        if stray or rows.get(confirmed) != "READY":
            try:
                client.load_model(FORGET_STEP_MODEL)
                settled = settle(client, FORGET_STEP_MODEL, None, timeout_s)
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
