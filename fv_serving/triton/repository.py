"""The Triton model repository: classifier, forget step, their ensemble, optionally a fused graph.

Layout (`runtime="python"` adds the ORT runner's model.py to each ONNX version folder):

    <repo>/classifier/config.pbtxt, 1/model.onnx
    <repo>/forget_step/config.pbtxt, <n>/model.onnx, <n>/forget_step.json
    <repo>/unlearned/config.pbtxt, 1/            (ensemble forget_step -> classifier, + vector_id)
    <repo>/forget_step_gated/config.pbtxt, <n>/  (gated mode: versions like forget_step's; the ensemble is then
                                                  this one step, see fv_serving.triton.topology)
    <repo>/fused/config.pbtxt, 1/model.onnx      (optional: delta baked into the classifier)
    <repo>/deployment.json, journal.jsonl        (what was built; every switch, append-only)

Tensor names, data types and dims come from the ONNX graphs themselves; the first
dim of every tensor is the dynamic batch. Version folders are never rewritten.

Which forget_step version serves is written in ONE place: the version_policy of
forget_step/config.pbtxt (`specific { versions: [n] }`), the CONFIRMED version. A
switch publishes folder n+1, has Triton load it through a config override, checks
it serves, and only then rewrites config.pbtxt (atomically, fsynced). So a newer
folder is never served by a (re)started Triton until it was confirmed; folders of
switches that never got there are renamed `set-aside-<n>-<time>` (Triton ignores
non-numeric version folders) by the next switch or start.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import onnx
from tritonclient.grpc.model_config_pb2 import ModelConfig

from fv_serving.atomic import atomic_directory, default_mode, fsync_path, write_bytes_atomic
from fv_serving.errors import DataNotFoundError, InvalidInputError, OnnxGraphError
from fv_serving.onnx.graph import ID_OUTPUT
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.model_config import Device, EnsembleStep, Runtime, TensorSpec

CLASSIFIER_MODEL = "classifier"
FORGET_STEP_MODEL = "forget_step"
ENSEMBLE_MODEL = "unlearned"
FUSED_MODEL = "fused"
#: The gated forget step: the classifier's gated graph (delta only on forgotten-class predictions), versioned.
GATED_STEP_MODEL = "forget_step_gated"
MODEL_NAMES = (CLASSIFIER_MODEL, FORGET_STEP_MODEL, ENSEMBLE_MODEL, FUSED_MODEL, GATED_STEP_MODEL)

ONNX_FILENAME = mcfg.ONNX_FILENAME
RUNNER_FILENAME = "model.py"
METADATA_FILENAME = "forget_step.json"
#: Ensemble-wide name of the perturbed image passed from the forget step to the classifier.
PERTURBED_TENSOR = "fv_perturbed_input"
#: Prefix of forget_step folders of unconfirmed switches (never served: not a version number).
SET_ASIDE_PREFIX = "set-aside-"

OnnxSource = str | os.PathLike[str] | bytes | onnx.ModelProto

_ONNX_TO_TRITON: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class GraphSignature:
    """Inputs and outputs of an ONNX graph as Triton sees them (batch dim excluded)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class _Graph:
    """A checked ONNX graph ready to be written: its bytes and its signature."""

    data: bytes
    signature: GraphSignature


# -- public API --------------------------------------------------------------------------------------


def read_signature(model: OnnxSource) -> GraphSignature:
    """Inputs/outputs of an ONNX graph; refuses graphs whose first dim is not a dynamic batch."""
    return _load_graph(model, "graph").signature


def build_repository(
    out_dir: str | os.PathLike[str],
    classifier_onnx: OnnxSource,
    forget_step_onnx: OnnxSource,
    fused_onnx: OnnxSource | None = None,
    *,
    runtime: Runtime = "python",
    device: Device = "cpu",
    max_batch_size: int = 64,
    instance_count: int = 1,
    intra_op_threads: int = 1,
    forget_step_metadata: Mapping[str, Any] | None = None,
    gated_step_onnx: OnnxSource | None = None,
    gated_step_metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete model repository to `out_dir` atomically and return its path.

    The whole tree is built in a temporary folder beside `out_dir` and renamed into
    place, so a failure never leaves a half-built repository. An existing non-empty
    `out_dir` is refused unless `overwrite=True`. With `gated_step_onnx` (the
    classifier's gated graph with a vector_id output) the repository starts in the
    gated mode: `unlearned` is that one step; forget_step is written all the same,
    so that a later switch to a plain vector finds it.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"out_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InvalidInputError(f"out_dir {out} is not empty; pass overwrite=True to replace it")

    classifier = _load_graph(classifier_onnx, "classifier")
    forget_step = _load_graph(forget_step_onnx, "forget step")
    fused = _load_graph(fused_onnx, "fused graph") if fused_onnx is not None else None
    _check_single_io(classifier.signature, "classifier")
    _check_step_io(forget_step.signature)
    _check_chain(forget_step.signature, classifier.signature)
    if fused is not None:
        _check_same_io(fused.signature, classifier.signature)
    gated = _load_graph(gated_step_onnx, "gated step") if gated_step_onnx is not None else None
    if gated is not None:
        _check_same_io(gated.signature, classifier.signature)

    def step_config(name: str, signature: GraphSignature, pinned: tuple[int, ...] | None = None) -> ModelConfig:
        return mcfg.onnx_step_config(
            name,
            signature.inputs,
            signature.outputs,
            runtime=runtime,
            device=device,
            max_batch_size=max_batch_size,
            instance_count=instance_count,
            intra_op_threads=intra_op_threads,
            served_versions=pinned,
        )

    configs = {
        CLASSIFIER_MODEL: step_config(CLASSIFIER_MODEL, classifier.signature),
        # pinned to the confirmed version: see the module docstring
        FORGET_STEP_MODEL: step_config(FORGET_STEP_MODEL, forget_step.signature, pinned=(1,)),
        ENSEMBLE_MODEL: plain_ensemble(forget_step.signature, classifier.signature, max_batch_size),
    }
    if gated is not None:
        configs[GATED_STEP_MODEL] = step_config(GATED_STEP_MODEL, gated.signature, pinned=(1,))
        configs[ENSEMBLE_MODEL] = gated_ensemble(gated.signature, forget_step.signature.inputs[0], max_batch_size)
    mcfg.check_ensemble_steps(configs[ENSEMBLE_MODEL], configs)
    if fused is not None:
        configs[FUSED_MODEL] = step_config(FUSED_MODEL, fused.signature)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    staging.chmod(default_mode(0o777))  # mkdtemp's 0700 would hide the repository from a Triton running as another user
    try:
        for name, config in configs.items():
            mcfg.write_config(staging / name, config)
        _write_version(staging / CLASSIFIER_MODEL / "1", version_files(classifier.data, runtime))
        _write_version(
            staging / FORGET_STEP_MODEL / "1", version_files(forget_step.data, runtime, forget_step_metadata or {})
        )
        (staging / ENSEMBLE_MODEL / "1").mkdir()  # Triton requires the (empty) version folder
        if fused is not None:
            _write_version(staging / FUSED_MODEL / "1", version_files(fused.data, runtime))
        if gated is not None:
            files = version_files(gated.data, runtime, gated_step_metadata or {})
            _write_version(staging / GATED_STEP_MODEL / "1", files)
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def publish_forget_step_version(
    repo_dir: str | os.PathLike[str],
    onnx_model: OnnxSource,
    metadata: Mapping[str, Any] | None = None,
    *,
    model: str = FORGET_STEP_MODEL,
) -> int:
    """Write the next forget_step (or `model`: GATED_STEP_MODEL) version folder atomically and return its number.

    The graph must have exactly the inputs/outputs of the model's config, so the
    ensemble and the classifier keep working unchanged. Loading it into a running
    server is the caller's step (`load_model("forget_step")`).
    """
    model_dir = Path(repo_dir) / model
    config = mcfg.read_config(model_dir)
    data = checked_step_bytes(config, onnx_model)
    for _ in range(5):  # another publisher may take the same number first
        version = next_version_number(p.name for p in model_dir.iterdir() if p.is_dir())
        try:
            _write_version(model_dir / str(version), version_files(data, runtime_of(config), metadata or {}))
        except FileExistsError:
            continue
        return version
    raise InvalidInputError(f"could not claim a new version folder in {model_dir}: too many concurrent publishers")


def list_forget_step_versions(repo_dir: str | os.PathLike[str], *, model: str = FORGET_STEP_MODEL) -> list[int]:
    """Published forget_step (or `model`) versions, ascending (temporary folders of in-flight writes excluded)."""
    model_dir = Path(repo_dir) / model
    if not model_dir.is_dir():
        raise InvalidInputError(f"{model_dir} is missing: {repo_dir} is not a forget-vector repository")
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def checked_step_bytes(config: ModelConfig, onnx_model: OnnxSource) -> bytes:
    """A new forget step graph's bytes, refused unless it has exactly the inputs/outputs of forget_step's config."""
    graph = _load_graph(onnx_model, "forget step")
    expected = GraphSignature(mcfg.tensor_specs(config.input), mcfg.tensor_specs(config.output))
    if graph.signature != expected:
        raise OnnxGraphError(
            f"new forget step graph does not match forget_step's {mcfg.CONFIG_FILENAME}: "
            f"expected {_describe(expected)}, got {_describe(graph.signature)}"
        )
    return graph.data


def runtime_of(config: ModelConfig) -> Runtime:
    return "python" if config.backend == "python" else "onnxruntime"


def next_version_number(folder_names: Iterable[str]) -> int:
    """One more than every number used by a published or set-aside folder: numbers are never reused."""
    used = [0]
    for name in folder_names:
        number = name.removeprefix(SET_ASIDE_PREFIX).split("-", 1)[0]
        if number.isdigit():
            used.append(int(number))
    return max(used) + 1


def version_files(onnx_bytes: bytes, runtime: Runtime, metadata: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The files of one version folder: model.onnx (+ the ORT runner's model.py, + the sidecar JSON)."""
    files = {ONNX_FILENAME: onnx_bytes}
    if runtime == "python":
        files[RUNNER_FILENAME] = runner_source()
    if metadata is not None:
        try:
            files[METADATA_FILENAME] = (json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n").encode()
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"forget step metadata must be JSON-serialisable: {exc}") from exc
    return files


def confirmed_version(repo_dir: str | os.PathLike[str], *, model: str = FORGET_STEP_MODEL) -> int:
    """The forget_step (or `model`) version the repository's config pins: what any (re)started Triton serves."""
    model_dir = Path(repo_dir) / model
    pinned = mcfg.pinned_versions(mcfg.read_config(model_dir))
    if len(pinned) != 1:
        raise InvalidInputError(
            f"{model_dir / mcfg.CONFIG_FILENAME} must pin exactly one version (version_policy specific), got "
            f"{list(pinned) or 'no specific policy'}: not a repository written by this fv-serving"
        )
    return pinned[0]


def forget_step_config(
    repo_dir: str | os.PathLike[str], version: int, *, model: str = FORGET_STEP_MODEL
) -> ModelConfig:
    """forget_step's (or `model`'s) config with `version` pinned: what a switch loads through a config override."""
    return mcfg.pin_versions(mcfg.read_config(Path(repo_dir) / model), [version])


def confirm_version(repo_dir: str | os.PathLike[str], version: int, *, model: str = FORGET_STEP_MODEL) -> None:
    """Pin `version` in forget_step/config.pbtxt (or `model`'s; atomic, fsynced): what a start serves from now on."""
    if version not in list_forget_step_versions(repo_dir, model=model):
        raise InvalidInputError(f"{repo_dir}: {model} has no version folder {version} to confirm")
    mcfg.write_config(Path(repo_dir) / model, forget_step_config(repo_dir, version, model=model))


def set_aside_version(repo_dir: str | os.PathLike[str], version: int, *, model: str = FORGET_STEP_MODEL) -> Path:
    """Rename an unconfirmed version folder out of Triton's reach (kept for inspection; pruned later)."""
    model_dir = Path(repo_dir) / model
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = model_dir / f"{SET_ASIDE_PREFIX}{version}-{stamp}"
    os.rename(model_dir / str(version), target)
    fsync_path(model_dir)
    return target


def remove_temp_folders(repo_dir: str | os.PathLike[str], *, model: str = FORGET_STEP_MODEL) -> list[Path]:
    """Delete the `.<n>.*.tmp` folders of version writes that were killed mid-way (the caller holds the lock)."""
    model_dir = Path(repo_dir) / model
    doomed = [p for p in model_dir.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def prune_forget_step_versions(
    repo_dir: str | os.PathLike[str], keep: int = 2, *, model: str = FORGET_STEP_MODEL
) -> list[str]:
    """Keep the confirmed version and the newest others up to `keep` in all; keep `keep` set-aside folders.

    Older folders are history: a previous vector at hand for a quick look back is
    enough. Returns the names of the deleted folders.
    """
    if keep < 1:
        raise InvalidInputError(f"keep must be >= 1 (the served version stays), got {keep}")
    model_dir = Path(repo_dir) / model
    confirmed = confirmed_version(repo_dir, model=model)
    others = [v for v in list_forget_step_versions(repo_dir, model=model) if v != confirmed]
    doomed = [str(v) for v in others[: max(0, len(others) - (keep - 1))]]
    aside = sorted(
        (p.name for p in model_dir.iterdir() if p.name.startswith(SET_ASIDE_PREFIX)),
        key=lambda name: int(name.removeprefix(SET_ASIDE_PREFIX).split("-", 1)[0]),
    )
    doomed += aside[: max(0, len(aside) - keep)]
    for name in doomed:
        shutil.rmtree(model_dir / name)
    return doomed


def read_forget_step_metadata(
    repo_dir: str | os.PathLike[str], version: int | None = None, *, model: str = FORGET_STEP_MODEL
) -> dict[str, Any]:
    """The metadata stored with a forget_step (or `model`) version (the latest one by default)."""
    versions = list_forget_step_versions(repo_dir, model=model)
    if not versions:
        raise InvalidInputError(f"{repo_dir}: {model} has no version folder")
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise InvalidInputError(f"{repo_dir}: {model} has no version {chosen} (has {versions})")
    path = Path(repo_dir) / model / str(chosen) / METADATA_FILENAME
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    return result


def runner_source() -> bytes:
    """The ORT runner model.py shipped in the `triton_models` package.

    Falls back to the source checkout beside fv_serving/, for an editable install made
    before `triton_models` was a package.
    """
    try:
        return resources.files("triton_models").joinpath("ort_runner", RUNNER_FILENAME).read_bytes()
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parents[2] / "triton_models" / "ort_runner" / RUNNER_FILENAME
        if not checkout.is_file():
            raise
        return checkout.read_bytes()


# -- ONNX inspection ---------------------------------------------------------------------------------


def _load_graph(source: OnnxSource, what: str) -> _Graph:
    """Load (external data included), check and serialise a graph; read its signature."""
    model = _load_model(source, what)
    try:
        onnx.checker.check_model(model)
        data = model.SerializeToString()
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise OnnxGraphError(f"{what}: invalid ONNX graph: {exc}") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = tuple(_spec(v, what) for v in graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, what) for v in graph.output)
    return _Graph(data, GraphSignature(inputs, outputs))


def _load_model(source: OnnxSource, what: str) -> onnx.ModelProto:
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, bytes):
        try:
            return onnx.load_from_string(source)
        except Exception as exc:
            raise OnnxGraphError(f"{what}: cannot parse ONNX bytes: {exc}") from exc
    path = Path(source)
    if not path.is_file():
        raise DataNotFoundError(f"{what}: ONNX file {path} not found")
    try:
        return onnx.load(path)  # external data, if any, is loaded and later inlined
    except Exception as exc:
        raise OnnxGraphError(f"{what}: cannot read ONNX model {path}: {exc}") from exc


def _spec(value: onnx.ValueInfoProto, what: str) -> TensorSpec:
    tensor_type = value.type.tensor_type
    datatype = _ONNX_TO_TRITON.get(tensor_type.elem_type)
    if datatype is None:
        raise OnnxGraphError(
            f"{what}: tensor {value.name!r} has ONNX type "
            f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}, which this project does not serve"
        )
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor_type.shape.dim]
    if not dims or dims[0] != -1:
        raise OnnxGraphError(
            f"{what}: tensor {value.name!r} has shape {dims}; the first dim must be a dynamic batch "
            "(export with a dynamic batch dimension)"
        )
    if len(dims) == 1:
        raise OnnxGraphError(f"{what}: tensor {value.name!r} has only the batch dim; Triton needs at least one more")
    return TensorSpec(value.name, datatype, tuple(dims[1:]))


def _check_single_io(signature: GraphSignature, what: str) -> None:
    if len(signature.inputs) != 1 or len(signature.outputs) != 1:
        raise OnnxGraphError(f"{what}: expected exactly one input and one output, got {_describe(signature)}")


def _check_step_io(signature: GraphSignature) -> None:
    """A forget step takes the image and returns the perturbed image and the vector id per item."""
    outputs = signature.outputs
    ok = len(signature.inputs) == 1 and len(outputs) == 2 and outputs[1] == TensorSpec(ID_OUTPUT, "BYTES", (1,))
    if not ok:
        raise OnnxGraphError(
            f"forget step: expected one image input and outputs (perturbed image, {ID_OUTPUT} BYTES[1]), "
            f"got {_describe(signature)}"
        )


def _check_chain(forget_step: GraphSignature, classifier: GraphSignature) -> None:
    """The forget step's output must be exactly what the classifier takes in."""
    out, into = forget_step.outputs[0], classifier.inputs[0]
    if (out.datatype, out.dims) != (into.datatype, into.dims):
        raise OnnxGraphError(
            f"forget step output {out.name!r} is {out.datatype}{list(out.dims)} but classifier input "
            f"{into.name!r} is {into.datatype}{list(into.dims)} (batch dim excluded); they must match"
        )
    image = forget_step.inputs[0]
    if (image.datatype, image.dims) != (into.datatype, into.dims):
        raise OnnxGraphError(
            f"forget step input {image.name!r} is {image.datatype}{list(image.dims)}, expected the "
            f"classifier's input type {into.datatype}{list(into.dims)}"
        )


def _check_same_io(fused: GraphSignature, classifier: GraphSignature) -> None:
    """The served fused graph: the classifier's inputs and outputs, plus the vector id per item."""
    expected = GraphSignature(classifier.inputs, (*classifier.outputs, TensorSpec(ID_OUTPUT, "BYTES", (1,))))
    if fused != expected:
        raise OnnxGraphError(
            f"fused graph must take the classifier's inputs and give its outputs plus {ID_OUTPUT}: expected "
            f"{_describe(expected)}, got {_describe(fused)}"
        )


def _describe(signature: GraphSignature) -> str:
    def side(specs: tuple[TensorSpec, ...]) -> str:
        return ", ".join(f"{s.name}:{s.datatype}{list(s.dims)}" for s in specs) or "nothing"

    return f"inputs ({side(signature.inputs)}) -> outputs ({side(signature.outputs)})"


# -- configs and files -------------------------------------------------------------------------------


def plain_ensemble(forget_step: GraphSignature, classifier: GraphSignature, max_batch_size: int) -> ModelConfig:
    """Ensemble `unlearned`: the forget step's input; the classifier's output and the vector id per item."""
    image, (perturbed, vector_id) = forget_step.inputs[0], forget_step.outputs
    into, logits = classifier.inputs[0], classifier.outputs[0]
    if {PERTURBED_TENSOR, ID_OUTPUT} & {image.name, logits.name}:
        raise OnnxGraphError(f"tensor names {PERTURBED_TENSOR!r} and {ID_OUTPUT!r} are reserved by the ensemble")
    steps = [
        EnsembleStep(
            FORGET_STEP_MODEL,
            {image.name: image.name},
            {perturbed.name: PERTURBED_TENSOR, vector_id.name: vector_id.name},
        ),
        EnsembleStep(CLASSIFIER_MODEL, {into.name: PERTURBED_TENSOR}, {logits.name: logits.name}),
    ]
    return mcfg.ensemble_config(ENSEMBLE_MODEL, [image], [logits, vector_id], steps, max_batch_size=max_batch_size)


def gated_ensemble(gated_step: GraphSignature, image: TensorSpec, max_batch_size: int) -> ModelConfig:
    """Ensemble `unlearned` in the gated mode: the gated step alone, with the plain ensemble's public tensors.

    `image` is the plain ensemble's input (the forget step's), so callers see the same
    input and outputs (logits, vector_id) in both modes, whatever the classifier names
    its own input.
    """
    into, (logits, vector_id) = gated_step.inputs[0], gated_step.outputs
    step = EnsembleStep(
        GATED_STEP_MODEL, {into.name: image.name}, {logits.name: logits.name, vector_id.name: vector_id.name}
    )
    return mcfg.ensemble_config(ENSEMBLE_MODEL, [image], [logits, vector_id], [step], max_batch_size=max_batch_size)


def _write_version(version_dir: Path, files: Mapping[str, bytes]) -> None:
    """Write one version folder atomically (`version_files`)."""
    with atomic_directory(version_dir) as tmp:
        for name, data in files.items():
            write_bytes_atomic(tmp / name, data)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished tree onto `out`, moving an old tree aside first and deleting it after."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(old / out.name, out)  # put the previous repository back
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
