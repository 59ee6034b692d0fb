"""One switch for a whole fleet: prepare on every replica, flip one route, settle (see fv_serving/fleet/__init__.py).

Steps, and what a failure at each leaves:
  1. validate the vector locally against the repository's classifier (as any switch:
     admission, shape, fingerprint); refused: nothing changed;
  2. recovery of what an interrupted fleet switch left (`fleet.recovery`), then every
     replica must answer the probe images with the live colour's vector: else refused;
  3. journal "begin"; publish version N (its objects first, then the configs naming
     it: forget_step pins {live, N}, the idle colour's ensemble pins N);
  4. prepare, on every replica in parallel: load forget_step, reload the idle
     colour's ensemble, check it answers with N's logits and id. Any failure (a
     replica down, a wrong answer, the store unreachable, SIGINT/SIGTERM): the configs
     are restored, every replica reloads forget_step and the idle colour from them,
     N is set aside, the journal says "rolled_back": nothing flipped;
  5. flip: fleet.json names the idle colour live (the commit point, journaled
     "confirmed"), then every gateway's route is set; the time from the request to
     here is reported.
Between switches both colours stay loaded on every replica (forget_step pins both
colours' versions): a replica or a gateway restarted at any moment finds both, and
going back to the previous vector is one more flip.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from fv_serving.admission import AdmissionPolicy
from fv_serving.errors import FVError, SwitchError
from fv_serving.failpoints import failpoint
from fv_serving.fingerprint import probe_batch
from fv_serving.fleet import layout
from fv_serving.fleet.layout import FleetState, colour_model
from fv_serving.fleet.locking import fleet_lock
from fv_serving.fleet.recovery import recover_fleet, reload_colour, set_aside, write_colour_configs
from fv_serving.fleet.replica import Replica, RouteFlip, run_on_all
from fv_serving.fleet.store import Store
from fv_serving.triton import journal
from fv_serving.triton.client import TritonClient
from fv_serving.triton.forget_step import PreparedStep, prepare_forget_step
from fv_serving.triton.repository import (
    FORGET_STEP_MODEL,
    checked_step_bytes,
    next_version_number,
    runtime_of,
    version_files,
)
from fv_serving.triton.signals import raise_if_stopped, wait_until
from fv_serving.triton.switch import answers_with, ensemble_reference
from fv_serving.vector_choice import VectorChoice


@dataclass(frozen=True)
class FleetSwitchResult:
    version: int
    previous_version: int
    vector_id: str
    previous_vector_id: str
    live: str  # the colour now live
    replicas: int
    checks: tuple[str, ...]
    warnings: tuple[str, ...]
    recovered: tuple[str, ...]
    validate_s: float  # request -> validated
    prepare_s: float  # validated -> every replica serving N through the idle colour
    all_serving_s: float  # request -> every gateway flipped: from here on every answer is N's


def fleet_switch(
    store: Store,
    replicas: Sequence[Replica],
    routes: Sequence[RouteFlip],
    choice: VectorChoice,
    *,
    force: bool = False,
    policy: AdmissionPolicy | None = None,
    timeout_s: float = 60.0,
) -> FleetSwitchResult:
    """Steps 1-6 of the module doc. `replicas` carry the deployment's key; `routes` flip each gateway."""
    requested = time.monotonic()
    if not replicas:
        raise SwitchError("a fleet switch needs at least one replica")
    classifier = layout.read_classifier(store)
    shape = layout.image_shape(store)
    step = prepare_forget_step(
        choice, classifier, shape, force=force, class_names=layout.class_names(store), policy=policy
    )
    probe = probe_batch(shape)
    with fleet_lock(store, timeout_s, f"fleet switch to {step.vector_id}"):
        recovered = recover_fleet(store, replicas, routes, timeout_s)
        state = layout.read_state(store)
        live_version = state.live_version
        previous_id = str(layout.read_sidecar(store, live_version).get("vector_id", "?"))
        live_expected = ensemble_reference(classifier, layout.read_step(store, live_version), probe)
        _on_every(replicas, lambda c: _require(c, colour_model(state.live), probe, live_expected, previous_id))
        validated = time.monotonic()
        switch_id = journal.new_switch_id()
        origin = {"version": live_version, "vector_id": previous_id, "colour": state.live}
        store.append_journal("begin", switch=switch_id, replicas=len(replicas), to={"vector_id": step.vector_id},
                             **{"from": origin})  # fmt: skip
        version: int | None = None
        try:
            version = _publish(store, step, state)
            failpoint("fleet:before-prepare")
            expected = ensemble_reference(classifier, step.graph, probe)
            deadline = time.monotonic() + timeout_s
            _on_every(replicas, lambda c: _prepare(c, state.idle, probe, expected, step.vector_id, deadline))
            raise_if_stopped()
        except (FVError, OSError, KeyboardInterrupt) as exc:
            raise _abort(store, replicas, switch_id, state, version, exc) from exc
        prepared = time.monotonic()
        flipped = state.flipped(version)
        layout.write_state(store, flipped)  # the commit point: from here on the new vector is the fleet's
        target = {"version": version, "vector_id": step.vector_id, "colour": flipped.live}
        store.append_journal("confirmed", switch=switch_id, to=target, **{"from": origin})
        failed_flips = run_on_all(routes, lambda flip: flip(colour_model(flipped.live)))
        all_serving = time.monotonic()
        warnings = list(step.warnings)
        warnings += [f"gateway route not flipped (the next switch or start flips it): {e}" for e in failed_flips]
    return FleetSwitchResult(
        version=version,
        previous_version=live_version,
        vector_id=step.vector_id,
        previous_vector_id=previous_id,
        live=flipped.live,
        replicas=len(replicas),
        checks=step.checks,
        warnings=tuple(warnings),
        recovered=tuple(recovered),
        validate_s=validated - requested,
        prepare_s=prepared - validated,
        all_serving_s=all_serving - requested,
    )


# -- steps ------------------------------------------------------------------------------------------------


def _publish(store: Store, step: PreparedStep, state: FleetState) -> int:
    """Version N's objects, then the configs that name it (so no Triton load sees it half-written)."""
    config = layout.read_model_config(store, FORGET_STEP_MODEL)
    data = checked_step_bytes(config, step.graph)
    version = next_version_number(layout.step_folders(store))
    for name, content in version_files(data, runtime_of(config), step.metadata).items():
        store.write(f"{FORGET_STEP_MODEL}/{version}/{name}", content)
    write_colour_configs(store, FleetState(state.live, {**state.versions, state.idle: version}))
    return version


def _require(client: TritonClient, model: str, probe: np.ndarray, expected: np.ndarray, vector_id: str) -> None:
    if not answers_with(client, probe, expected, vector_id, model):
        raise SwitchError(f"{client.url} does not answer with the live vector {vector_id} through {model!r}")


def _prepare(
    client: TritonClient, idle: str, probe: np.ndarray, expected: np.ndarray, vector_id: str, deadline: float
) -> None:
    reload_colour(client, idle)  # forget_step now pins {live, N}: the live version stays as it is
    model = colour_model(idle)
    wait_until(
        lambda: client.is_model_ready(model) and answers_with(client, probe, expected, vector_id, model),
        deadline,
        f"{client.url} did not serve {vector_id} through {model!r} in time",
    )


def _abort(
    store: Store,
    replicas: Sequence[Replica],
    switch_id: str,
    state: FleetState,
    version: int | None,
    cause: BaseException,
) -> SwitchError:
    """Undo the prepare everywhere; nothing flipped."""
    notes: list[str] = []
    try:
        write_colour_configs(store, state)
    except FVError as exc:
        notes.append(f"could not restore the configs (the next fleet switch recovers them): {exc}")
    failures = run_on_all(replicas, lambda c: reload_colour(c, state.idle))
    notes += [f"could not reset a replica (it still serves the live vector): {e}" for e in failures]
    if version is not None and not failures:
        try:
            notes.append(f"version {version} set aside as {set_aside(store, version)}")
        except FVError as exc:
            notes.append(f"version {version} left in place (set aside by the next fleet switch): {exc}")
    reason = "interrupted (SIGINT)" if isinstance(cause, KeyboardInterrupt) else _one_line(cause)
    try:
        store.append_journal("rolled_back", switch=switch_id, version=version, reason=reason, notes=notes)
    except FVError as exc:
        notes.append(f"the journal could not be written: {exc}")
    return SwitchError(f"fleet switch failed, nothing flipped: {reason}; " + "; ".join(notes))


# -- running one step on every member -------------------------------------------------------------------------


def _on_every(replicas: Sequence[Replica], work: Callable[[TritonClient], None]) -> None:
    failures = run_on_all(replicas, work)
    if failures:
        raise SwitchError("; ".join(failures))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
