"""A servable deployment: classifier + forget step (+ fused graph) -> Triton model repository.

`build_deployment` is `fv triton build`: it takes a PyTorch checkpoint (exported
here, with the exporter's parity check against PyTorch) or an ONNX classifier, and
one forget-vector choice (a vector file, a composition from a bank, or off), and
writes the repository of `fv_serving.triton.repository` plus `deployment.json`
(class names, classifier digest, runtime) for `fv status` and `fv infer`.

`prepare_forget_step` is the single place where a vector choice becomes a forget
step graph, for the build and for live switches alike. It validates BEFORE anything
is written: finite values, the vector's shape against the image shape the deployment
serves, and the classifier fingerprint (the deployed classifier graph is run in
onnxruntime on the vector's probe images and must reproduce the logits recorded in
the vector). `force=True` skips only the fingerprint check, and says so in the
metadata stored next to the published version, so a forced vector stays visible.
"""

from __future__ import annotations

import getpass
import json
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from fv_serving.arithmetic import ZERO_SHOT_RULES, bank_class_names, class_ids, vector_from_bank, zero_shot_vector
from fv_serving.atomic import write_json_atomic
from fv_serving.errors import DataNotFoundError, FileFormatError, InvalidInputError, ModelMismatchError
from fv_serving.fingerprint import probe_batch
from fv_serving.onnx.fuse import OFF_ID, forget_step_graph, fuse_vector
from fv_serving.onnx.graph import META_PREFIX, find_image_input, load_model, metadata
from fv_serving.onnx.runtime import check_vector_matches, verify_forget_step, verify_fused
from fv_serving.triton.model_config import Device, Runtime
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FUSED_MODEL,
    ONNX_FILENAME,
    build_repository,
)
from fv_serving.vectors import ForgetVector, load_bank, load_vector

DEPLOYMENT_FILENAME = "deployment.json"
DEPLOYMENT_FORMAT = "fv-serving/deployment"
#: Metrics copied from a vector file into the version's metadata (the bulky details stay in the file).
METRIC_KEYS = ("UA", "RA", "TA", "MIA", "per_forgotten_class_UA")


# -- which vector -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorChoice:
    """What the forget step should add: a vector file, a bank composition, or nothing (off).

    Bank compositions are zero-shot (`classes` with `mode` sum|mean) or explicit
    `coefficients`, one per bank vector; they are baked into one delta at export.
    """

    vector: Path | None = None
    bank: Path | None = None
    classes: tuple[str, ...] = ()
    mode: str = "sum"
    coefficients: tuple[float, ...] | None = None
    off: bool = False

    def __post_init__(self) -> None:
        given = [name for name, on in (("vector", self.vector), ("bank", self.bank), ("off", self.off)) if on]
        if len(given) != 1:
            raise InvalidInputError(
                f"choose exactly one of a vector file, a bank or off; got {', '.join(given) or 'none'}"
            )
        if self.bank is None and (self.classes or self.coefficients is not None):
            raise InvalidInputError("classes and coefficients only apply to a bank")
        if self.bank is not None and bool(self.classes) == (self.coefficients is not None):
            raise InvalidInputError("with a bank give either classes (zero-shot sum/mean) or coefficients")
        if self.mode not in ZERO_SHOT_RULES:
            raise InvalidInputError(f"mode must be one of {', '.join(ZERO_SHOT_RULES)}, got {self.mode!r}")

    def describe(self) -> dict[str, Any]:
        """How the vector was chosen, for the version's metadata (paths made absolute)."""
        if self.off:
            return {"kind": "off"}
        if self.vector is not None:
            return {"kind": "vector", "file": str(Path(self.vector).absolute())}
        out: dict[str, Any] = {"kind": "bank", "file": str(Path(str(self.bank)).absolute())}
        if self.coefficients is not None:
            out["coefficients"] = list(self.coefficients)
        else:
            out.update(classes=list(self.classes), mode=self.mode)
        return out


def resolve_vector(choice: VectorChoice, class_names: Sequence[str] = ()) -> ForgetVector | None:
    """Load the chosen vector (None for off); a bank composition becomes one vector here."""
    if choice.off:
        return None
    if choice.vector is not None:
        return load_vector(choice.vector)
    assert choice.bank is not None
    bank = load_bank(choice.bank)
    if choice.coefficients is not None:
        return vector_from_bank(bank, choice.coefficients, "coefficients")
    chosen = class_ids(choice.classes, bank_class_names(bank) or class_names)
    return zero_shot_vector(bank, chosen, choice.mode)


# -- the forget step ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedStep:
    """A validated forget step graph, ready to publish, and the metadata stored beside it."""

    graph: onnx.ModelProto
    vector: ForgetVector | None
    metadata: dict[str, Any]
    checks: tuple[str, ...]

    @property
    def vector_id(self) -> str:
        return self.vector.vector_id if self.vector is not None else OFF_ID


def prepare_forget_step(
    choice: VectorChoice,
    classifier: onnx.ModelProto,
    image_shape: tuple[int, ...],
    *,
    force: bool = False,
    class_names: Sequence[str] = (),
) -> PreparedStep:
    """Resolve, validate and build the forget step; nothing is written and no server is touched.

    Refuses (FileFormatError / InvalidInputError / ModelMismatchError) a vector with
    non-finite values, a shape other than `image_shape` (C, H, W), or a fingerprint
    that `classifier` does not reproduce (unless `force`).
    """
    vector = resolve_vector(choice, class_names)
    shape = tuple(int(d) for d in image_shape)
    checks: list[str] = []
    forced: dict[str, Any] | None = None
    if vector is not None:
        bad = int(vector.delta.size - np.count_nonzero(np.isfinite(vector.delta)))
        if bad:
            raise FileFormatError(f"forget vector {vector.vector_id} holds {bad} non-finite value(s); refusing it")
        checks.append("all values finite")
        if tuple(vector.delta.shape) != shape:
            raise ModelMismatchError(
                f"forget vector {vector.vector_id} has shape {list(vector.delta.shape)}, but the deployment "
                f"serves [N,{','.join(map(str, shape))}] images"
            )
        checks.append(f"shape {list(shape)} == the forget step's input")
        if force:
            forced = {
                "skipped": "classifier check (deployed classifier's probe logits vs the vector's fingerprint)",
                "vector_classifier_sha256": vector.classifier.weights_sha256,
                "at": _now(),
                "by": _who(),
            }
            checks.append("classifier check SKIPPED (--force; recorded in the version's metadata)")
        else:
            check_vector_matches(classifier, vector)
            checks.append("deployed classifier reproduces the vector's probe logits in onnxruntime (same model)")
    if len(shape) != 3:
        raise InvalidInputError(f"image shape must be (C, H, W), got {list(shape)}")
    graph = forget_step_graph(vector, (shape[0], shape[1], shape[2]) if vector is None else None)
    err = verify_forget_step(graph, vector, probe_batch(shape))
    checks.append(f"forget step == apply_delta(x, delta, clamp) on probe images (max |diff| {err:.1e})")
    return PreparedStep(graph, vector, step_metadata(vector, choice, forced), tuple(checks))


def step_metadata(
    vector: ForgetVector | None, choice: VectorChoice, forced: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The sidecar JSON of a forget_step version: what it adds, where it came from, who published it."""
    base: dict[str, Any] = {"source": choice.describe(), "published_at": _now(), "published_by": _who()}
    if vector is None:
        return {"vector_id": OFF_ID, "forget": None, "metrics": {}, "forced": None, **base}
    return {
        "vector_id": vector.vector_id,
        "forget": vector.forget,
        "metrics": {k: vector.metrics[k] for k in METRIC_KEYS if k in vector.metrics},
        "clamp": list(vector.clamp) if vector.clamp else None,
        "l2_norm": round(vector.l2_norm, 6),
        "classifier_sha256": vector.classifier.weights_sha256,
        "forced": dict(forced) if forced else None,
        **base,
    }


# -- the deployment -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeploymentReport:
    """What `build_deployment` wrote and verified (printed by the CLI)."""

    repository: Path
    models: tuple[str, ...]
    vector_id: str
    classifier_sha256: str | None
    checks: tuple[str, ...] = field(default_factory=tuple)


def build_deployment(
    out: str | Path,
    choice: VectorChoice,
    *,
    classifier: str | Path | None = None,
    classifier_onnx: str | Path | None = None,
    fused: bool = False,
    runtime: Runtime = "python",
    device: Device = "cpu",
    max_batch_size: int = 64,
    instance_count: int = 1,
    intra_op_threads: int = 1,
    force: bool = False,
    overwrite: bool = False,
) -> DeploymentReport:
    """Export/read the classifier, build and verify the forget step (and fused graph), write the repository.

    Exactly one of `classifier` (a checkpoint written by `fv train`) and
    `classifier_onnx` is needed. Everything is verified before the repository is
    written (atomically, by build_repository).
    """
    if (classifier is None) == (classifier_onnx is None):
        raise InvalidInputError("give exactly one of a classifier checkpoint and a classifier ONNX graph")
    checks: list[str] = []
    if classifier is not None:
        model, class_names, source = _export_checkpoint(Path(classifier), checks)
    else:
        source = Path(str(classifier_onnx)).absolute()
        model = load_model(source, "classifier graph")
        class_names = _class_names_of(model)
    image = find_image_input(model)
    step = prepare_forget_step(choice, model, image.chw, force=force, class_names=class_names)
    checks += step.checks
    if not class_names and step.vector is not None:
        class_names = list(step.vector.notes.get("class_names") or [])

    fused_graph: onnx.ModelProto | None = None
    if fused:
        if step.vector is None:
            fused_graph = model  # forgetting off: the fused model is the classifier itself
            checks.append("fused model = the classifier itself (forgetting off)")
        else:
            fused_graph = fuse_vector(model, step.vector, force=force)
            err = verify_fused(model, fused_graph, step.vector, probe_batch(image.chw))
            checks.append(f"fused(x) == classifier(clamp(x + delta)) on probe images (max |diff| {err:.1e})")

    repo = build_repository(
        out,
        model,
        step.graph,
        fused_graph,
        runtime=runtime,
        device=device,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        intra_op_threads=intra_op_threads,
        forget_step_metadata=step.metadata,
        overwrite=overwrite,
    )
    sha = metadata(model).get(f"{META_PREFIX}classifier_sha256")
    info = {
        "format": DEPLOYMENT_FORMAT,
        "created": _now(),
        "classifier": {
            "source": str(source),
            "sha256": sha,
            "input": {"name": image.name, "shape": list(image.chw)},
            "class_names": list(class_names),
        },
        "runtime": runtime,
        "device": device,
        "max_batch_size": max_batch_size,
        "fused": {"vector_id": step.vector_id, "forced": force} if fused else None,
        "initial_vector": step.metadata,
    }
    write_json_atomic(repo / DEPLOYMENT_FILENAME, info)
    models = (ENSEMBLE_MODEL, *((FUSED_MODEL,) if fused else ()))
    return DeploymentReport(repo, models, step.vector_id, sha, tuple(checks))


def read_deployment(repository: str | Path) -> dict[str, Any]:
    """`deployment.json` of a repository; empty when it was built without one (e.g. by the library)."""
    path = Path(repository) / DEPLOYMENT_FILENAME
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path} is not valid JSON: {exc}") from exc
    return data


def class_names_of(repository: str | Path) -> list[str]:
    """The deployed classifier's class names (empty when unknown: classes are then shown as numbers)."""
    return list(read_deployment(repository).get("classifier", {}).get("class_names") or [])


def deployed_classifier(repository: str | Path) -> onnx.ModelProto:
    """The classifier graph the repository serves (what a new vector must match)."""
    path = Path(repository) / CLASSIFIER_MODEL / "1" / ONNX_FILENAME
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: {repository} is not a forget-vector repository")
    return load_model(path, "deployed classifier graph")


# -- helpers ------------------------------------------------------------------------------------------


def _export_checkpoint(path: Path, checks: list[str]) -> tuple[onnx.ModelProto, list[str], Path]:
    """Export a checkpoint with the exporter's own verification (ONNX vs PyTorch on probe images)."""
    from fv_serving.models import load_classifier
    from fv_serving.onnx.export import export_classifier

    loaded = load_classifier(path)
    with tempfile.TemporaryDirectory(prefix="fv-export-") as tmp:
        summary = export_classifier(loaded.model, Path(tmp) / "classifier.onnx")
        model = load_model(Path(tmp) / "classifier.onnx", "exported classifier")
    checks += [f"classifier export: {v}" for v in summary.verified]
    return model, list(loaded.model.spec.class_names), path.absolute()


def _class_names_of(model: onnx.ModelProto) -> list[str]:
    """Class names recorded by our exporter in the graph's metadata (none for foreign graphs)."""
    raw = metadata(model).get(f"{META_PREFIX}spec")
    if not raw:
        return []
    try:
        return [str(n) for n in json.loads(raw).get("class_names", [])]
    except (json.JSONDecodeError, AttributeError):
        return []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"
