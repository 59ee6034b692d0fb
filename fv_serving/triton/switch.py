"""Switch the forget vector of a RUNNING deployment, with the classifier left loaded and untouched.

The order of a switch, and what a kill -9 at each point leaves behind:

1. Validate locally (`forget_step.prepare_forget_step`): admission, shape, classifier
   fingerprint. A refused vector never reaches the repository or the server.
2. Take the repository's switch lock (waiting at most `timeout_s`, saying who holds
   it) and recover what an earlier, interrupted switch left (`recovery.recover`).
3. Check the server serves this repository's confirmed version V: probe images sent
   through the ensemble must give what V + the classifier give in local onnxruntime.
4. Journal "begin" (fsynced).
5. Publish folder N (atomic rename). Killed here: config.pbtxt still pins V, so a
   (re)started Triton serves V; recovery sets N aside.
6. Load N through a config override that pins N (`load_model(config=...)`): Triton
   keeps serving V until N is READY and re-creates the ensemble around it. Server
   killed here: a restart reads config.pbtxt and serves V. This process killed here:
   the running server may go on with N, unconfirmed, until the next switch or start
   recovers (`fv status` flags it).
7. Confirm from the server: N READY, the ensemble answers the probe images with N's
   logits and N's vector id. That moment ends the measured switch time.
8. Pin N in config.pbtxt (atomic, fsynced): N is confirmed. Journal "confirmed".
   Then prune old folders and confirm, from the server's records, that the classifier
   was not reloaded (index entry unchanged, inference count not reset, no new load
   in the server log when it is at hand).

Any failure in 5-7 (an error of ours, a transport error, SIGINT or SIGTERM, which
`fv switch` records and the switch acts on at its next safe point) rolls back:
Triton is asked to load forget_step from config.pbtxt (back to V), N is set aside
only once Triton no longer loads it (removing a folder Triton is still loading left
it stuck LOADING), the ensemble is checked to answer with V, and the journal records
"rolled_back" with the reason. Signals are held off during the rollback.

Gated vectors (`gated=True`) are published into forget_step_gated, whose pinned
version serves when `unlearned` has the gated topology (`fv_serving.triton.topology`
says why). A switch between a plain and a gated vector changes the topology as well.
Loading an ensemble makes Triton (2.51, measured) load its steps from their configs
ON DISK, whatever version a config override loaded before; so at step 6 the new
version is pinned in its model's config first (no ensemble on disk refers to that
model yet: a restart is unaffected), that model is loaded and waited for, then
`unlearned` is loaded with the new topology through a config override (failpoint
"switch:topology"). At step 8 unlearned/config.pbtxt is written: the commit point,
before which a restart serves the old topology and vector. A rollback restores the
old pin and loads `unlearned` from disk again. Recovery puts a server back on the
disk's topology first.
The classifier evidence counts only the images that went through the classifier
model (none in the gated topology, whose step holds the classifier's graph).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from fv_serving.admission import AdmissionPolicy
from fv_serving.errors import FVError, SwitchError
from fv_serving.failpoints import failpoint
from fv_serving.fingerprint import logits_match, probe_batch
from fv_serving.triton import journal
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import TritonClient
from fv_serving.triton.deployment import (
    class_names_of,
    deployed_classifier,
    forget_step_input_shape,
    published_step,
    step_digest,
)
from fv_serving.triton.forget_step import PreparedStep, prepare_forget_step
from fv_serving.triton.locking import switch_lock
from fv_serving.triton.recovery import recover
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    confirm_version,
    confirmed_version,
    forget_step_config,
    prune_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
    set_aside_version,
)
from fv_serving.triton.signals import raise_if_stopped, signals_held, wait_until
from fv_serving.triton.topology import (
    GATED,
    PLAIN,
    disk_ensemble,
    ensemble_for,
    ensure_gated_model,
    recover_topology,
    served_step,
    serving_mode,
    settle,
    step_model,
    step_reference,
    write_ensemble,
)
from fv_serving.vector_choice import VectorChoice

DEFAULT_TIMEOUT_S = 60.0
#: Version folders kept after a switch: the served one and the previous ones for a quick look back.
DEFAULT_KEEP_VERSIONS = 3
#: How long a classifier inference count below the expected minimum is re-read (statistics lag answers).
STATS_SETTLE_S = 2.0


@dataclass(frozen=True)
class ClassifierEvidence:
    """What the server says about the classifier before and after a switch."""

    index_before: tuple[tuple[str, str], ...]  # (version, state) rows of the repository index
    index_after: tuple[tuple[str, str], ...]
    inference_count_before: int
    inference_count_after: int
    images_sent_between: int  # images the switch itself sent through the ensemble between the two snapshots
    loads_logged_before: int | None  # "successfully loaded 'classifier'" lines in the server log
    loads_logged_after: int | None
    served_before: bool = True  # False when the gated topology served: the classifier model was idle

    @property
    def disturbed(self) -> bool:
        """A reload of the classifier while it served: what a switch must never do.

        Loading `unlearned` again in the plain topology makes Triton 2.51 reload the
        classifier (measured; it loads an ensemble's steps when it loads the ensemble),
        but after the gated topology the classifier served nothing, so no request met it.
        """
        return self.reloaded and self.served_before

    @property
    def reloaded(self) -> bool:
        """True if any record shows a reload (a reloaded model starts its statistics from zero)."""
        logged = self.loads_logged_before is not None and self.loads_logged_after != self.loads_logged_before
        restarted = self.inference_count_after < self.inference_count_before + self.images_sent_between
        return self.index_before != self.index_after or restarted or logged

    def describe(self) -> str:
        index = ", ".join(f"v{v} {s}" for v, s in self.index_after) or "absent"
        text = (
            f"index {index} (unchanged: {self.index_before == self.index_after}); inference count "
            f"{self.inference_count_before} -> {self.inference_count_after} (not reset)"
        )
        if self.loads_logged_after is not None:
            text += f"; loads in the server log: {self.loads_logged_before} -> {self.loads_logged_after}"
        return text


@dataclass(frozen=True)
class SwitchResult:
    """A completed switch: what serves now, how long it took, what was checked."""

    version: int
    previous_version: int
    vector_id: str
    previous_vector_id: str
    checks: tuple[str, ...]
    warnings: tuple[str, ...]
    forced: bool
    validate_s: float  # request -> validated (before the server is touched)
    load_s: float  # duration of Triton's load_model("forget_step")
    serving_s: float  # request -> first ensemble answer computed with the new vector
    classifier: ClassifierEvidence | None  # None when the server could not be asked after the switch
    pruned: tuple[str, ...]
    recovered: tuple[str, ...]  # what recovery found and did before this switch
    topology: str = PLAIN  # the topology of `unlearned` after the switch (plain or gated)
    topology_changed: bool = False


def switch_vector(
    repository: str | Path,
    client: TritonClient,
    choice: VectorChoice,
    *,
    force: bool = False,
    policy: AdmissionPolicy | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    log_path: str | Path | None = None,
    gated: bool = False,
) -> SwitchResult:
    """Validate `choice` (a VectorChoice) against the repository, then make it the served vector (module doc).

    `client` must carry the deployment's model-control key; `log_path` (the server
    log, known for servers started by `fv serve`) adds the log to the classifier evidence.
    `gated=True` serves the (class-wise) vector in the gated mode.
    """
    requested = time.monotonic()
    repo = Path(repository).absolute()
    classifier = deployed_classifier(repo)
    step = prepare_forget_step(
        choice,
        classifier,
        forget_step_input_shape(repo),
        force=force,
        class_names=class_names_of(repo),
        policy=policy,
        gated=gated,
    )
    return activate_forget_step(
        repo,
        client,
        step,
        classifier=classifier,
        requested=requested,
        timeout_s=timeout_s,
        keep_versions=keep_versions,
        log_path=log_path,
    )


def activate_forget_step(
    repository: str | Path,
    client: TritonClient,
    step: PreparedStep,
    *,
    classifier: onnx.ModelProto | None = None,
    requested: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    log_path: str | Path | None = None,
) -> SwitchResult:
    """Steps 2-8 of the module doc for an already validated forget step; rolls back on failure."""
    requested = time.monotonic() if requested is None else requested
    if keep_versions < 2:
        raise SwitchError(f"keep_versions must be >= 2 (the served version and a previous one), got {keep_versions}")
    repo = Path(repository).absolute()
    classifier = classifier if classifier is not None else deployed_classifier(repo)
    probe = probe_batch(forget_step_input_shape(repo))
    expected = step_reference(classifier, step.model, step.graph, probe)
    log = Path(log_path) if log_path is not None else None
    model, topology = step.model, GATED if step.gated else PLAIN

    with switch_lock(repo, timeout_s, f"switch to {step.vector_id}"):
        _require_serving(client, repo, served_step(client), classifier, probe)  # this repository's server?
        recovered = recover_topology(repo, client, timeout_s) + recover(repo, client, timeout_s)
        origin_topology = serving_mode(repo)
        previous_model = step_model(origin_topology)
        previous = confirmed_version(repo, model=previous_model)
        previous_expected, previous_id = _require_serving(client, repo, (previous_model, previous), classifier, probe)
        changes_topology = topology != origin_topology
        # only images through the plain topology reach the classifier model (and count in its statistics)
        before = _classifier_snapshot(client, log, min_count=len(probe) if origin_topology == PLAIN else 0)
        validated = time.monotonic()
        switch_id = journal.new_switch_id()
        origin = {
            "version": previous,
            "vector_id": previous_id,
            "sha256": step_digest(repo, previous, model=previous_model),
            **({"model": previous_model} if changes_topology or model != FORGET_STEP_MODEL else {}),
        }
        journal.append(repo, "begin", switch=switch_id, **{"from": origin}, to={"vector_id": step.vector_id})

        version: int | None = None
        pin_before = _pin(repo, model)
        try:
            if step.gated:  # (a plain step keeps the call as it always was)
                ensure_gated_model(repo, step.graph)
                version = publish_forget_step_version(repo, step.graph, step.metadata, model=model)
            else:
                version = publish_forget_step_version(repo, step.graph, step.metadata)
            failpoint("switch:after-publish")
            raise_if_stopped()
            load_started = time.monotonic()
            deadline = load_started + timeout_s
            failpoint("switch:loading")
            if changes_topology:  # pinned on disk first: loading `unlearned` reloads its steps from disk (module doc)
                _write_pin(repo, model, version)
                client.load_model(model)
                _wait_until_ready(client, model, version, deadline)
                failpoint("switch:topology")
                client.load_model(ENSEMBLE_MODEL, config=ensemble_for(repo, topology))
            else:
                client.load_model(model, config=forget_step_config(repo, version, model=model))
            load_s = time.monotonic() - load_started
            sent = _wait_until_serving(client, model, version, probe, expected, step.vector_id, deadline)
            failpoint("switch:before-confirm")
            raise_if_stopped()
        except (FVError, OSError, KeyboardInterrupt) as exc:  # Ctrl-C and SIGTERM mid-switch roll back too
            with signals_held():
                failed = _Attempt(model, version, changes_topology, pin_before)
                raise _roll_back(repo, client, switch_id, failed, previous, probe, previous_expected, exc) from exc
        serving_s = time.monotonic() - requested
        with signals_held():  # confirming is two writes: let nothing come between them
            if changes_topology:
                write_ensemble(repo, topology)  # the commit point of a topology change (the pin is written)
            else:
                confirm_version(repo, version, model=model)
            failpoint("switch:after-confirm")
            target = {
                "version": version,
                "vector_id": step.vector_id,
                "sha256": step_digest(repo, version, model=model),
            }
            if origin.get("model") is not None:
                target["model"] = model
            journal.append(repo, "confirmed", switch=switch_id, **{"from": origin}, to=target)
        pruned = tuple(prune_forget_step_versions(repo, keep_versions, model=model))
        warnings = list(step.warnings)
        sent = sent if topology == PLAIN else 0  # probes sent through the gated topology skip the classifier model
        try:  # the switch is done; what follows is evidence, and a server gone by now must not undo it
            after = _classifier_snapshot(client, log, min_count=before[1] + sent)
            evidence: ClassifierEvidence | None = ClassifierEvidence(
                index_before=before[0],
                index_after=after[0],
                inference_count_before=before[1],
                inference_count_after=after[1],
                images_sent_between=sent,
                loads_logged_before=before[2],
                loads_logged_after=after[2],
                served_before=origin_topology == PLAIN,
            )
        except FVError as exc:
            evidence = None
            warnings.append(f"switched and confirmed, but the classifier's records could not be read after: {exc}")

    return SwitchResult(
        version=version,
        previous_version=previous,
        vector_id=step.vector_id,
        previous_vector_id=previous_id,
        checks=step.checks,
        warnings=tuple(warnings),
        forced=bool(step.metadata.get("forced")),
        validate_s=validated - requested,
        load_s=load_s,
        serving_s=serving_s,
        classifier=evidence,
        pruned=pruned,
        recovered=tuple(recovered),
        topology=topology,
        topology_changed=changes_topology,
    )


def ensemble_reference(classifier: onnx.ModelProto, step: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """classifier(step(images)) in local onnxruntime: what the plain ensemble must answer."""
    return step_reference(classifier, FORGET_STEP_MODEL, step, images)


def answers_with(
    client: TritonClient,
    probe: np.ndarray,
    expected: np.ndarray,
    vector_id: str | None,
    model: str = ENSEMBLE_MODEL,
) -> bool:
    """Whether `model` answers `probe` with `expected` logits (and, when given, names `vector_id`)."""
    logits, ids = client.infer_with_ids(model, probe)
    return logits_match(logits, expected) and (vector_id is None or all(i == vector_id for i in ids))


# -- steps ------------------------------------------------------------------------------------------------


def _require_serving(
    client: TritonClient, repo: Path, step: tuple[str, int], classifier: onnx.ModelProto, probe: np.ndarray
) -> tuple[np.ndarray, str]:
    """Refuse unless the server answers like `repo`'s `step` (model, version); return its expected logits and id.

    Checked before recovery too: recovery acts on the server, so it must be this repository's.
    """
    model, version = step
    try:
        served = served_step(client)
        expected = step_reference(classifier, model, published_step(repo, version, model=model), probe)
    except FVError as exc:
        raise SwitchError(f"{exc}; nothing was changed") from exc
    vector_id = str(read_forget_step_metadata(repo, version, model=model).get("vector_id", "?"))
    if served != step or not answers_with(client, probe, expected, vector_id):
        raise SwitchError(
            f"the server at {client.url} does not answer with {repo}'s {model} version {version} "
            f"(it has {served[0]} version {served[1]} READY): wrong --url / --repository pair? Nothing was changed."
        )
    return expected, vector_id


def _wait_until_ready(client: TritonClient, model: str, version: int, deadline: float) -> None:
    wait_until(
        lambda: client.is_model_ready(model, str(version)), deadline, f"{model} version {version} was not READY in time"
    )


def _wait_until_serving(
    client: TritonClient,
    model: str,
    version: int,
    probe: np.ndarray,
    expected: np.ndarray,
    vector_id: str,
    deadline: float,
) -> int:
    """Poll until `model` `version` is READY and the ensemble answers with it; return the images sent meanwhile."""
    sent = 0
    while True:
        raise_if_stopped()
        if client.is_model_ready(model, str(version)):
            sent += len(probe)
            if answers_with(client, probe, expected, vector_id):
                return sent
        if time.monotonic() > deadline:
            raise SwitchError(
                f"{model} version {version} was not READY and answering through {ENSEMBLE_MODEL!r} in time"
            )
        time.sleep(0.02)


def _classifier_snapshot(
    client: TritonClient, log: Path | None, min_count: int = 0
) -> tuple[tuple[tuple[str, str], ...], int, int | None]:
    """(index rows, inference count, loads logged) of the classifier.

    Triton updates a composing model's statistics just after the ensemble has answered,
    so a count below `min_count` (what it must at least be if nothing was reset) is
    read again for a moment before it is taken as a reset.
    """
    index = tuple(sorted((e.version, e.state) for e in client.repository_index() if e.name == CLASSIFIER_MODEL))
    deadline = time.monotonic() + STATS_SETTLE_S
    while True:
        count = sum(s.inference_count for s in client.model_statistics(CLASSIFIER_MODEL))
        if count >= min_count or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    loads = None
    if log is not None and log.is_file():
        loads = log.read_text(errors="replace").count(f"successfully loaded '{CLASSIFIER_MODEL}'")
    return index, count, loads


@dataclass(frozen=True)
class _Attempt:
    """What a failed switch had done: the model it published into, the version (None: not yet), the topology."""

    model: str
    version: int | None
    changed_topology: bool
    pin_before: int | None  # the model's pin before the switch (None: a gated step model it created)


def _pin(repo: Path, model: str) -> int | None:
    """The version `model`'s config pins, or None when the model has no config yet."""
    return confirmed_version(repo, model=model) if (repo / model / mcfg.CONFIG_FILENAME).is_file() else None


def _write_pin(repo: Path, model: str, version: int) -> None:
    mcfg.write_config(repo / model, forget_step_config(repo, version, model=model))


def _roll_back(
    repo: Path,
    client: TritonClient,
    switch_id: str,
    attempt: _Attempt,
    previous: int,
    probe: np.ndarray,
    previous_expected: np.ndarray,
    cause: BaseException,
) -> SwitchError:
    """Back to the confirmed version (and topology); set the new folder aside once Triton lets go of it."""
    notes = []
    settled = False
    version = attempt.version
    try:
        if attempt.changed_topology:
            if attempt.pin_before is not None:
                _write_pin(repo, attempt.model, attempt.pin_before)
            client.load_model(ENSEMBLE_MODEL, config=disk_ensemble(repo))  # the previous topology, its steps from disk
        if attempt.model == FORGET_STEP_MODEL or not attempt.changed_topology:
            # back to the pin on disk (a no-op if still served); a gated step outside the topology just idles
            client.load_model(attempt.model)
        settled = settle(client, attempt.model, version, DEFAULT_TIMEOUT_S) if version is not None else True
    except FVError as exc:
        notes.append(f"reloading the forget step failed too: {exc}")
    if version is not None:
        if settled:
            aside = set_aside_version(repo, version, model=attempt.model)
            notes.append(f"{attempt.model} version {version} set aside as {aside.name}")
        else:
            notes.append(
                f"version {version} left in place (Triton may still be loading it; the next switch or start "
                "sets it aside)"
            )
    try:
        ok = answers_with(client, probe, previous_expected, None)
        notes.append(
            f"the previous vector (version {previous}) keeps serving (checked through {ENSEMBLE_MODEL!r})"
            if ok
            else f"WARNING: the ensemble does NOT answer with the previous vector (version {previous}); run fv status"
        )
    except FVError as exc:
        notes.append(f"WARNING: could not check what the ensemble serves now: {exc}")
    reason = _one_line(cause)
    journal.append(repo, "rolled_back", switch=switch_id, version=version, reason=reason, notes=notes)
    return SwitchError(f"switch failed: {reason}; " + "; ".join(notes))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
