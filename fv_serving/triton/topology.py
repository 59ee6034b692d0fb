"""The two topologies of the `unlearned` ensemble, and what a switch between them needs.

    plain:  image -> forget_step (sanitise + delta) -> classifier -> logits, vector_id
    gated:  image -> forget_step_gated (the classifier's gated graph) -> logits, vector_id

Why the gated mode is one step of its own, holding the classifier's graph:
  * the gate needs the classifier's answer on the unperturbed image before anything is
    perturbed, and the second pass must run on the gated rows only. As ensemble steps
    that is classifier -> gather -> classifier -> scatter, with a tensor of M rows
    between steps. Measured on the bundled Triton 2.51: an ensemble that hands a
    [0, ...] tensor to a batching step is refused ("input byte size mismatch for input
    'image' for model 'classifier'. Expected 3136, got 0"), and M = 0 is the common
    case (an image of a retained class); a gather/scatter step would also take inputs
    of two batch sizes, which a batching model does not. Triton ensembles have no
    conditional step;
  * inside one ONNX graph (`fv_serving.onnx.gated`) Gather/ScatterND run the second
    pass on exactly the gated rows, an empty batch when none is (or an If skips it,
    for a classifier graph that cannot take an empty batch), and the step batches like
    any other model, on the ORT runner and on Triton's onnxruntime backend alike, with
    no Python in the data path (a BLS model could call the classifier model, but only
    from the python backend, and with two extra requests per batch);
  * the price: the step holds a second copy of the classifier's weights (in the
    repository, in memory, loaded on each gated switch), next to the classifier
    model, idle while the gated topology serves;
  * the step's outputs are logits, not an image, so it cannot be a version of
    forget_step (whose output feeds the classifier); it is a model of its own,
    versioned, pinned and confirmed the same way.

So a switch plain <-> gated changes the ensemble. Measured on the bundled Triton 2.51
(and what the switch does about it, `fv_serving.triton.switch`):
  * loading `unlearned` with the other topology through a config override takes
    1-250 ms and fails no request (4 clients, 6 swaps; 5 switches with 4 topology
    changes under 3 clients in tests/test_triton_gated.py: every answer exact);
  * loading an ensemble makes Triton load its steps from their configs ON DISK: a
    step version loaded through an override before is replaced by the pinned one. So
    the new step's version is pinned on disk first (no ensemble on disk refers to that
    model yet, so a restart is unaffected), loaded, waited for, and only then
    `unlearned` is loaded with the new topology; unlearned/config.pbtxt, written after
    the server answers with the new vector, is the commit point: a restart serves the
    topology on disk and the pinned version of its step, and the other step's pin is
    unused (it may name a version that was never confirmed);
  * after an override, loading `unlearned` without one keeps the override's topology:
    going back to the disk (rollback, recovery) loads the disk's config explicitly;
  * when the plain topology returns, Triton reloads the classifier model (it served
    nothing meanwhile, so no request meets the reload) and unloads the gated step,
    whose second copy of the weights is thus held only while the gated topology serves;
  * at a (re)start in the gated topology, Triton loads neither the classifier nor
    forget_step (no ensemble refers to them); the next switch loads them first.

Both topologies give callers the same tensors (the plain ensemble's input name,
the classifier's output name, vector_id), so clients and the gateway see no change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc.model_config_pb2 import ModelConfig

from fv_serving.errors import FVError, ServerError
from fv_serving.onnx.runtime import make_session
from fv_serving.triton import journal
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import TritonClient
from fv_serving.triton.recovery import LIVE_STATES, settle, version_states
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    GATED_STEP_MODEL,
    GraphSignature,
    confirmed_version,
    gated_ensemble,
    list_forget_step_versions,
    next_version_number,
    plain_ensemble,
    read_forget_step_metadata,
    read_signature,
    remove_temp_folders,
    set_aside_version,
)

Mode = Literal["plain", "gated"]
PLAIN: Mode = "plain"
GATED: Mode = "gated"


def step_model(mode: Mode) -> str:
    """The versioned model whose pinned version serves in `mode`."""
    return GATED_STEP_MODEL if mode == GATED else FORGET_STEP_MODEL


def mode_of(config: ModelConfig) -> Mode:
    """The topology of an `unlearned` config: gated when its only step is the gated step."""
    steps = [s.model_name for s in config.ensemble_scheduling.step]
    return GATED if steps == [GATED_STEP_MODEL] else PLAIN


def serving_mode(repository: str | Path) -> Mode:
    """The topology a (re)started Triton serves: unlearned/config.pbtxt."""
    return mode_of(disk_ensemble(repository))


def _signature(repository: Path, model: str) -> GraphSignature:
    config = mcfg.read_config(repository / model)
    return GraphSignature(mcfg.tensor_specs(config.input), mcfg.tensor_specs(config.output))


def ensemble_for(repository: str | Path, mode: Mode) -> ModelConfig:
    """The `unlearned` config of `mode`, from the step configs on disk and the current batch limit."""
    repo = Path(repository)
    limit = mcfg.read_config(repo / ENSEMBLE_MODEL).max_batch_size
    plain_step = _signature(repo, FORGET_STEP_MODEL)
    if mode == PLAIN:
        return plain_ensemble(plain_step, _signature(repo, CLASSIFIER_MODEL), limit)
    return gated_ensemble(_signature(repo, GATED_STEP_MODEL), plain_step.inputs[0], limit)


def disk_ensemble(repository: str | Path) -> ModelConfig:
    """unlearned/config.pbtxt as a config to load: after a load through an override, a load without one keeps the
    override's topology in Triton 2.51 (measured), so going back to the disk means loading its config explicitly."""
    return mcfg.read_config(Path(repository) / ENSEMBLE_MODEL)


def write_ensemble(repository: str | Path, mode: Mode) -> None:
    """Write unlearned/config.pbtxt for `mode` (atomic, fsynced): the commit point of a topology change."""
    mcfg.write_config(Path(repository) / ENSEMBLE_MODEL, ensemble_for(repository, mode))


def ensure_gated_model(repository: str | Path, graph: onnx.ModelProto) -> None:
    """Create forget_step_gated/config.pbtxt, if absent, with the graph's tensors and forget_step's settings.

    Repositories built plain get the model at their first gated switch. Its pin (the
    first version number) is unused until a gated switch confirms a version: no
    ensemble on disk refers to the model before that.
    """
    model_dir = Path(repository) / GATED_STEP_MODEL
    if (model_dir / mcfg.CONFIG_FILENAME).is_file():
        return
    signature = read_signature(graph)
    config = mcfg.read_config(Path(repository) / FORGET_STEP_MODEL)
    config.name = GATED_STEP_MODEL
    del config.input[:]
    del config.output[:]
    config.input.extend(
        mc.ModelInput(name=t.name, data_type=mcfg.config_type(t.datatype), dims=list(t.dims)) for t in signature.inputs
    )
    config.output.extend(
        mc.ModelOutput(name=t.name, data_type=mcfg.config_type(t.datatype), dims=list(t.dims))
        for t in signature.outputs
    )
    names = [p.name for p in model_dir.iterdir()] if model_dir.is_dir() else []
    mcfg.write_config(model_dir, mcfg.pin_versions(config, [next_version_number(names)]))


def step_reference(classifier: onnx.ModelProto, model: str, step: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """What `unlearned` must answer on `images` when `step` serves as `model`, computed in local onnxruntime."""
    session = make_session(step, threads=1, spinning=False)
    out = np.asarray(session.run(None, {session.get_inputs()[0].name: images})[0])
    if model == GATED_STEP_MODEL:
        return out
    clf = make_session(classifier, threads=1, spinning=False)
    return np.asarray(clf.run(None, {clf.get_inputs()[0].name: out})[0])


def served_step(client: TritonClient) -> tuple[str, int]:
    """(step model, READY version) that the server's `unlearned` runs (the newest, if two are READY mid-switch)."""
    if not client.is_model_ready(ENSEMBLE_MODEL):
        raise ServerError(f"the server at {client.url} does not have the ensemble {ENSEMBLE_MODEL!r} ready")
    model = step_model(mode_of(client.model_config(ENSEMBLE_MODEL)))
    ready = [v for v, state in version_states(client, model).items() if state == "READY"]
    if not ready:
        raise ServerError(f"the server at {client.url} has no READY {model!r} version")
    return model, max(ready)


def recover_topology(repository: str | Path, client: TritonClient, timeout_s: float) -> list[str]:
    """Before a switch (under its lock): the server back on the disk's topology, the gated step's leftovers cleared.

    1. a server whose `unlearned` has another topology than unlearned/config.pbtxt (a
       switch was killed between loading the new topology and its commit) gets the
       disk's config loaded again;
    2. the classifier and forget_step, which the gated topology does not load at a
       start, are loaded when not READY, so that either topology is one load away;
    3. in the gated mode, a gated step version other than the pinned one is replaced
       by the pinned one; gated folders newer than the pin are set aside;
    4. every interrupted switch gets its "recovered" outcome, naming the topology and
       version that serve now (the plain recovery, `fv_serving.triton.recovery`, then
       finds none left to close).
    """
    repo = Path(repository)
    mode = serving_mode(repo)
    notes = []
    try:
        if mode_of(client.model_config(ENSEMBLE_MODEL)) != mode:
            client.load_model(ENSEMBLE_MODEL, config=disk_ensemble(repo))
            notes.append(f"the server ran {ENSEMBLE_MODEL!r} in the other topology; reloaded the {mode} one from disk")
        for standing in (CLASSIFIER_MODEL, FORGET_STEP_MODEL):
            if not client.is_model_ready(standing):
                client.load_model(standing)
                notes.append(f"loaded {standing!r}, which the {mode} topology does not load at a start")
    except FVError as exc:
        notes.append(f"could not put the server on the {mode} topology of {repo}: {exc}")
        return notes
    if (repo / GATED_STEP_MODEL / mcfg.CONFIG_FILENAME).is_file():
        notes += _recover_gated_step(repo, client, mode, timeout_s)
    model = step_model(mode)
    version = confirmed_version(repo, model=model)
    vector_id = read_forget_step_metadata(repo, version, model=model).get("vector_id", "?")
    for begin in journal.unfinished(repo):
        now = {"topology": mode, "model": model, "version": version, "vector_id": vector_id}
        journal.append(repo, "recovered", switch=begin.get("switch"), confirmed=now, notes=notes)
        notes.append(
            f"interrupted switch {begin.get('switch')} closed: {mode} topology, {model} v{version} ({vector_id})"
        )
    return notes


def _recover_gated_step(repo: Path, client: TritonClient, mode: Mode, timeout_s: float) -> list[str]:
    pinned = confirmed_version(repo, model=GATED_STEP_MODEL)
    notes = [
        f"removed the temporary folder {p.name} of a killed write"
        for p in remove_temp_folders(repo, model=GATED_STEP_MODEL)
    ]
    states = version_states(client, GATED_STEP_MODEL)
    stray = sorted(v for v, state in states.items() if v != pinned and state in LIVE_STATES)
    if mode == GATED and stray:
        client.load_model(GATED_STEP_MODEL)
        notes.append(f"the server had {GATED_STEP_MODEL} {stray} loaded; reloaded the confirmed version {pinned}")
    newer = [v for v in list_forget_step_versions(repo, model=GATED_STEP_MODEL) if v > pinned]
    # only folders that will move must be let go of (an older version unloading after a switch is not waited for)
    if not all(settle(client, GATED_STEP_MODEL, v, timeout_s) for v in newer):
        return [*notes, f"{GATED_STEP_MODEL} is still loading; its unconfirmed folders stay until the next switch"]
    for version in newer:
        target = set_aside_version(repo, version, model=GATED_STEP_MODEL)
        notes.append(f"set aside unconfirmed {GATED_STEP_MODEL} version {version} as {target.name}")
    return notes
