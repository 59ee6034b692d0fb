"""Finishing what an interrupted fleet switch left, before the next one (or a start) goes on.

fleet.json is the truth. From it: every gateway routes to the live colour; forget_step
pins exactly the two colours' versions and the idle colour's ensemble pins its own,
and every reachable replica reloads them if they were not so (a switch died between
its prepare and its flip); version folders newer than both colours' versions were
never made live: set aside; "begin" entries without an outcome get "recovered".
"""

from __future__ import annotations

from collections.abc import Sequence

from tritonclient.grpc.model_config_pb2 import ModelConfig

from fv_serving.fleet import layout
from fv_serving.fleet.layout import FleetState, colour_model
from fv_serving.fleet.replica import Replica, RouteFlip, run_on_all
from fv_serving.fleet.store import Store
from fv_serving.provenance import now_iso
from fv_serving.triton.client import TritonClient
from fv_serving.triton.journal import unfinished_in
from fv_serving.triton.repository import FORGET_STEP_MODEL, SET_ASIDE_PREFIX


def write_colour_configs(store: Store, state: FleetState) -> None:
    """The configs of a fleet state: forget_step pins both colours' versions, each colour's ensemble its own."""
    layout.pin_forget_step(store, sorted(set(state.versions.values())))
    ensemble = layout.read_model_config(store, colour_model(state.live))
    for colour, version in state.versions.items():
        layout.write_model_config(store, colour_model(colour), layout.colour_config(ensemble, colour, version))


def reload_colour(client: TritonClient, colour: str) -> None:
    """A replica reloads forget_step (its pinned versions) and a colour's ensemble from the store's configs."""
    client.load_model(FORGET_STEP_MODEL)
    client.load_model(colour_model(colour))


def set_aside(store: Store, version: int) -> str:
    """Move a version's objects out of Triton's reach (S3 has no rename: copy, then delete)."""
    stamp = now_iso().replace(":", "").replace("-", "")[:15]
    name = f"{SET_ASIDE_PREFIX}{version}-{stamp}"
    keys = store.keys(f"{FORGET_STEP_MODEL}/{version}/")
    for key in keys:
        store.write(key.replace(f"/{version}/", f"/{name}/", 1), store.read(key))
    store.delete(keys)
    return name


def _pinned_step_version(ensemble: ModelConfig) -> int:
    return next(
        int(step.model_version) for step in ensemble.ensemble_scheduling.step if step.model_name == FORGET_STEP_MODEL
    )


def recover_fleet(
    store: Store, replicas: Sequence[Replica], routes: Sequence[RouteFlip], timeout_s: float
) -> list[str]:
    """See the module docstring; the caller holds the fleet lock. Returns what was done, one line each."""
    state = layout.read_state(store)
    notes: list[str] = []
    failed = run_on_all(routes, lambda flip: flip(colour_model(state.live)))
    notes += [f"a gateway could not be routed to {colour_model(state.live)}: {failure}" for failure in failed]
    pinned = layout.pinned_forget_step(store)
    wanted = tuple(sorted(set(state.versions.values())))
    idle_pin = _pinned_step_version(layout.read_model_config(store, colour_model(state.idle)))
    if pinned != wanted or idle_pin != state.versions[state.idle]:
        write_colour_configs(store, state)
        notes.append(f"forget_step pinned {list(pinned)}, the idle colour v{idle_pin}: back to {state.to_json()}")
        failures = run_on_all(replicas, lambda client: reload_colour(client, state.idle))
        notes += [f"could not reload from the configs: {failure}" for failure in failures]
    newest = max(state.versions.values())
    for folder in layout.step_folders(store):
        if folder.isdigit() and int(folder) > newest:
            notes.append(f"set aside unconfirmed version {folder} as {set_aside(store, int(folder))}")
    for begin in unfinished_in(store.read_journal()):
        store.append_journal("recovered", switch=begin.get("switch"), confirmed=state.to_json(), notes=notes)
        notes.append(f"interrupted fleet switch {begin.get('switch')} closed: live {state.live} v{state.live_version}")
    return notes
