"""Switch the forget vector of a RUNNING deployment, with the classifier left loaded and untouched.

The order of a switch, and why:

1. Validate everything locally (`deploy.prepare_forget_step`): finite values, shape
   against the forget step's input, classifier fingerprint against the repository's
   own classifier graph. A refused vector never reaches the repository or the server.
2. Check the server is the one serving this repository: the probe images sent
   through the ensemble must give what the currently published forget step + the
   classifier give in local onnxruntime. A wrong --url/--repository pair is refused
   before anything changes.
3. Publish the next forget_step version folder (atomic rename) and ask Triton to
   `load_model("forget_step")`. Its version policy keeps only the latest version, so
   the new one replaces the old; Triton keeps serving the old version until the new
   one is ready and re-creates the ensemble around it. The forget step and the
   ensemble are NEVER unloaded (that takes the ensemble down) and the ensemble is
   never reloaded by us.
4. Confirm from the server: the new version is READY and the ensemble answers the
   probe images with the NEW vector's logits; that moment ends the measured switch
   time. Then confirm the classifier was not reloaded, from the server's own records:
   its repository-index entry (version, state) is unchanged, its inference count
   did not restart from zero (Triton resets statistics on a reload), and, when the
   server log is at hand, it logged no new load.
5. On any failure in 3-4 (load error, not serving in time), the new version folder is
   removed, Triton is asked to load the forget step again (which leaves or puts the
   previous version in place), and the ensemble is checked to answer with the OLD
   vector; SwitchError says what happened and what serves now.

Switches of one repository are serialised with a lock file: Triton may load a model
twice when two load requests for it arrive at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from fv_serving.errors import FVError, OnnxGraphError, ServerError, SwitchError
from fv_serving.fingerprint import probe_batch
from fv_serving.onnx.runtime import make_session
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import TritonClient
from fv_serving.triton.deploy import (
    PreparedStep,
    VectorChoice,
    class_names_of,
    deployed_classifier,
    prepare_forget_step,
)
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    ONNX_FILENAME,
    list_forget_step_versions,
    prune_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
)

DEFAULT_TIMEOUT_S = 60.0
#: Version folders kept after a switch: the served one and the previous ones for a quick look back.
DEFAULT_KEEP_VERSIONS = 3
#: The server's ORT and local ORT run the same graphs; batching may reorder float sums slightly.
PROBE_ATOL = 1e-4
LOCK_FILENAME = ".fv-switch.lock"
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
    forced: bool
    validate_s: float  # request -> validated (before the server is touched)
    load_s: float  # duration of Triton's load_model("forget_step")
    serving_s: float  # request -> first ensemble answer computed with the new vector
    classifier: ClassifierEvidence
    pruned: tuple[int, ...]


def switch_vector(
    repository: str | Path,
    url: str,
    choice: VectorChoice,
    *,
    force: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    log_path: str | Path | None = None,
) -> SwitchResult:
    """Validate `choice` against the repository, then make it the served forget vector (see module doc).

    `url` is the server's HTTP or gRPC URL; `log_path` (the server log, known for
    servers started by `fv serve`) adds the log to the classifier evidence.
    """
    requested = time.monotonic()
    repo = Path(repository).absolute()
    classifier = deployed_classifier(repo)
    step = prepare_forget_step(
        choice, classifier, forget_step_input_shape(repo), force=force, class_names=class_names_of(repo)
    )
    return activate_forget_step(
        repo,
        url,
        step,
        classifier=classifier,
        requested=requested,
        timeout_s=timeout_s,
        keep_versions=keep_versions,
        log_path=log_path,
    )


def activate_forget_step(
    repository: str | Path,
    url: str,
    step: PreparedStep,
    *,
    classifier: onnx.ModelProto | None = None,
    requested: float | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    log_path: str | Path | None = None,
) -> SwitchResult:
    """Publish an already validated forget step, load it, confirm it serves; roll back on failure.

    Steps 2-5 of the module doc. `requested` is the monotonic time of the switch
    request (default: now), the start of the reported switch time.
    """
    requested = time.monotonic() if requested is None else requested
    if keep_versions < 2:
        raise SwitchError(f"keep_versions must be >= 2 (the served version and a previous one), got {keep_versions}")
    repo = Path(repository).absolute()
    classifier = classifier if classifier is not None else deployed_classifier(repo)
    probe = probe_batch(forget_step_input_shape(repo))
    expected = ensemble_reference(classifier, step.graph, probe)
    log = Path(log_path) if log_path is not None else None

    with switch_lock(repo), TritonClient(url, timeout_s=timeout_s) as client:
        previous = served_version(client)
        previous_expected = ensemble_reference(classifier, _published_step(repo, previous), probe)
        if not _answers_with(client, probe, previous_expected):
            raise SwitchError(
                f"the server at {url} does not answer with {repo}'s forget_step version {previous} (its ensemble "
                "output on the probe images differs): wrong --url / --repository pair? Nothing was changed."
            )
        previous_vector_id = str(read_forget_step_metadata(repo, previous).get("vector_id", "?"))
        before = _classifier_snapshot(client, log, min_count=len(probe))  # the probe above has counted
        validated = time.monotonic()

        version = publish_forget_step_version(repo, step.graph, step.metadata)
        load_started = time.monotonic()
        try:
            client.load_model(FORGET_STEP_MODEL)
            load_s = time.monotonic() - load_started
            sent = _wait_until_serving(client, version, probe, expected, load_started + timeout_s)
        except (FVError, OSError, KeyboardInterrupt) as exc:  # Ctrl-C mid-switch rolls back too
            raise _roll_back(repo, client, version, previous, probe, previous_expected, exc) from exc
        serving_s = time.monotonic() - requested
        after = _classifier_snapshot(client, log, min_count=before[1] + sent)
        pruned = tuple(prune_forget_step_versions(repo, keep_versions))

    evidence = ClassifierEvidence(
        index_before=before[0],
        index_after=after[0],
        inference_count_before=before[1],
        inference_count_after=after[1],
        images_sent_between=sent,
        loads_logged_before=before[2],
        loads_logged_after=after[2],
    )
    return SwitchResult(
        version=version,
        previous_version=previous,
        vector_id=step.vector_id,
        previous_vector_id=previous_vector_id,
        checks=step.checks,
        forced=bool(step.metadata.get("forced")),
        validate_s=validated - requested,
        load_s=load_s,
        serving_s=serving_s,
        classifier=evidence,
        pruned=pruned,
    )


# -- reading the repository and the server ------------------------------------------------------------


def forget_step_input_shape(repository: str | Path) -> tuple[int, ...]:
    """The image dims (batch excluded) the deployed forget step takes, from its config."""
    config = mcfg.read_config(Path(repository) / FORGET_STEP_MODEL)
    inputs = mcfg.tensor_specs(config.input)
    if len(inputs) != 1:
        raise SwitchError(f"{repository}: forget_step must have one input, has {[t.name for t in inputs]}")
    return inputs[0].dims


def served_version(client: TritonClient) -> int:
    """The forget_step version the server has READY (the newest if two are READY mid-switch)."""
    # Not is_server_ready(): with strict readiness the server reports "not ready" while an old
    # forget_step version is still unloading after a switch, although the ensemble serves.
    if not client.is_model_ready(ENSEMBLE_MODEL):
        raise ServerError(f"the server at {client.url} does not have the ensemble {ENSEMBLE_MODEL!r} ready")
    ready = [
        int(e.version)
        for e in client.repository_index()
        if e.name == FORGET_STEP_MODEL and e.state == "READY" and e.version.isdigit()
    ]
    if not ready:
        raise ServerError(f"the server at {client.url} has no READY {FORGET_STEP_MODEL!r} version")
    return max(ready)


def ensemble_reference(classifier: onnx.ModelProto, step: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """classifier(step(images)) in local onnxruntime: what the ensemble must answer."""
    step_session = make_session(step, threads=1, spinning=False)
    perturbed = step_session.run(None, {step_session.get_inputs()[0].name: images})[0]
    clf_session = make_session(classifier, threads=1, spinning=False)
    return np.asarray(clf_session.run(None, {clf_session.get_inputs()[0].name: perturbed})[0])


@contextlib.contextmanager
def switch_lock(repository: Path) -> Iterator[None]:
    """An exclusive lock on the repository's switch lock file (released when the process dies)."""
    with open(repository / LOCK_FILENAME, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(handle, fcntl.LOCK_EX)  # another switch of this repository runs: wait for it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _published_step(repository: Path, version: int) -> onnx.ModelProto:
    path = repository / FORGET_STEP_MODEL / str(version) / ONNX_FILENAME
    if not path.is_file():
        raise SwitchError(
            f"the server serves forget_step version {version}, but {path} is missing: the server does not serve "
            f"this repository, or its folder was removed. Nothing was changed."
        )
    try:
        return onnx.load(str(path))
    except Exception as exc:
        raise OnnxGraphError(f"cannot read the served forget step {path}: {exc}") from exc


def _answers_with(client: TritonClient, probe: np.ndarray, expected: np.ndarray) -> bool:
    actual = client.infer(ENSEMBLE_MODEL, probe)
    return actual.shape == expected.shape and bool(np.allclose(actual, expected, rtol=0.0, atol=PROBE_ATOL))


def _wait_until_serving(
    client: TritonClient, version: int, probe: np.ndarray, expected: np.ndarray, deadline: float
) -> int:
    """Poll until `version` is READY and the ensemble answers with it; return the images sent meanwhile."""
    sent = 0
    while True:
        if client.is_model_ready(FORGET_STEP_MODEL, str(version)):
            sent += len(probe)
            if _answers_with(client, probe, expected):
                return sent
        if time.monotonic() > deadline:
            raise SwitchError(
                f"forget_step version {version} was not READY and answering through {ENSEMBLE_MODEL!r} in time"
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


def _roll_back(
    repository: Path,
    client: TritonClient,
    version: int,
    previous: int,
    probe: np.ndarray,
    previous_expected: np.ndarray,
    cause: BaseException,
) -> SwitchError:
    """Remove the failed version, let Triton settle on the previous one, and say what serves now."""
    shutil.rmtree(repository / FORGET_STEP_MODEL / str(version), ignore_errors=True)
    notes = [f"version {version} removed from the repository ({list_forget_step_versions(repository)} remain)"]
    try:
        client.load_model(FORGET_STEP_MODEL)  # back to the newest remaining version (a no-op if still served)
    except FVError as exc:
        notes.append(f"reloading the forget step failed too: {exc}")
    try:
        ok = _answers_with(client, probe, previous_expected)
        notes.append(
            f"the previous vector (version {previous}) keeps serving (checked through {ENSEMBLE_MODEL!r})"
            if ok
            else f"WARNING: the ensemble does NOT answer with the previous vector (version {previous}); run fv status"
        )
    except FVError as exc:
        notes.append(f"WARNING: could not check what the ensemble serves now: {exc}")
    return SwitchError(f"switch failed: {_one_line(cause)}; " + "; ".join(notes))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
