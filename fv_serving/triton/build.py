"""Building a servable deployment: classifier graph + forget step (+ fused graph) -> Triton model repository.

`build_deployment` is `fv triton build`. It takes an ONNX classifier (a PyTorch
checkpoint is exported to ONNX by the CLI before it gets here, so serving never
imports PyTorch) and one vector choice, validates and verifies everything, then
writes the repository of `fv_serving.triton.repository` plus `deployment.json`
(class names, classifier digest, runtime) for `fv status` and `fv infer`, and the
first line of the switch journal.

`gated=True` starts the deployment in the gated topology (`fv_serving.triton.topology`):
`unlearned` is the gated step of the (class-wise) vector; forget_step/1 holds the
plain step of the same vector, checked alike, for a later switch to the plain mode.
A fused model is then the gated fused graph.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from fv_serving.admission import AdmissionPolicy
from fv_serving.atomic import write_json_atomic
from fv_serving.errors import InvalidInputError
from fv_serving.onnx.checked import fuse_gated_vector, fuse_vector
from fv_serving.onnx.graph import META_PREFIX, find_image_input, metadata
from fv_serving.provenance import now_iso
from fv_serving.triton import journal
from fv_serving.triton.deployment import DEPLOYMENT_FILENAME, DEPLOYMENT_FORMAT, step_digest
from fv_serving.triton.forget_step import prepare_forget_step
from fv_serving.triton.model_config import Device, Runtime
from fv_serving.triton.repository import ENSEMBLE_MODEL, FUSED_MODEL, build_repository
from fv_serving.triton.topology import GATED, PLAIN
from fv_serving.vector_choice import VectorChoice


@dataclass(frozen=True)
class DeploymentReport:
    """What `build_deployment` wrote and verified (printed by the CLI)."""

    repository: Path
    models: tuple[str, ...]
    vector_id: str
    classifier_sha256: str | None
    checks: tuple[str, ...] = field(default_factory=tuple)
    warnings: tuple[str, ...] = field(default_factory=tuple)


def build_deployment(
    out: str | Path,
    choice: VectorChoice,
    classifier: onnx.ModelProto,
    *,
    classifier_source: str = "",
    class_names: Sequence[str] = (),
    fused: bool = False,
    runtime: Runtime = "python",
    device: Device = "cpu",
    max_batch_size: int = 64,
    instance_count: int = 1,
    intra_op_threads: int = 1,
    force: bool = False,
    policy: AdmissionPolicy | None = None,
    overwrite: bool = False,
    checks: Sequence[str] = (),
    gated: bool = False,
) -> DeploymentReport:
    """Build and verify the forget step (and fused graph), then write the repository atomically.

    `class_names` default to those our exporter recorded in the graph's metadata, then
    to those the vector file records; `checks` are earlier verifications to report.
    """
    names = list(class_names) or _class_names_of(classifier)
    image = find_image_input(classifier)
    plain = prepare_forget_step(choice, classifier, image.chw, force=force, class_names=names, policy=policy)
    gated_step = (
        prepare_forget_step(choice, classifier, image.chw, force=force, class_names=names, policy=policy, gated=True)
        if gated
        else None
    )
    step = gated_step or plain
    done = [*checks, *plain.checks, *(f"gated step: {c}" for c in (gated_step.checks if gated_step else ()))]
    if not names and step.vector is not None:
        names = list(step.vector.notes.get("class_names") or [])

    fused_graph: onnx.ModelProto | None = None
    if fused:
        if step.vector is None:
            raise InvalidInputError("a fused model needs a vector (with --off there is nothing to fuse)")
        fuse = fuse_gated_vector if gated else fuse_vector
        built = fuse(classifier, step.vector, force=force, policy=policy, id_output=True)
        fused_graph = built.graph
        done += [f"fused: {c}" for c in built.checks]

    repo = build_repository(
        out,
        classifier,
        plain.graph,
        fused_graph,
        runtime=runtime,
        device=device,
        max_batch_size=max_batch_size,
        instance_count=instance_count,
        intra_op_threads=intra_op_threads,
        forget_step_metadata=plain.metadata,
        gated_step_onnx=gated_step.graph if gated_step else None,
        gated_step_metadata=gated_step.metadata if gated_step else None,
        overwrite=overwrite,
    )
    sha = metadata(classifier).get(f"{META_PREFIX}classifier_sha256")
    info = {
        "format": DEPLOYMENT_FORMAT,
        "created": now_iso(),
        "classifier": {
            "source": classifier_source,
            "sha256": sha,
            "input": {"name": image.name, "shape": list(image.chw)},
            "class_names": names,
        },
        "runtime": runtime,
        "device": device,
        "max_batch_size": max_batch_size,
        "fused": {"vector_id": step.vector_id, "forced": force} if fused else None,
        "initial_vector": step.metadata,
        "topology": GATED if gated else PLAIN,
    }
    write_json_atomic(repo / DEPLOYMENT_FILENAME, info)
    journal.append(
        repo,
        "built",
        to={
            "version": 1,
            "vector_id": step.vector_id,
            "sha256": step_digest(repo, 1, model=step.model),
            **({"model": step.model} if gated else {}),
        },
        warnings=list(step.warnings),
    )
    models = (ENSEMBLE_MODEL, *((FUSED_MODEL,) if fused else ()))
    return DeploymentReport(repo, models, step.vector_id, sha, tuple(done), step.warnings)


def _class_names_of(model: onnx.ModelProto) -> list[str]:
    """Class names recorded by our exporter in the graph's metadata (none for foreign graphs)."""
    raw = metadata(model).get(f"{META_PREFIX}spec")
    if not raw:
        return []
    try:
        return [str(n) for n in json.loads(raw).get("class_names", [])]
    except (json.JSONDecodeError, AttributeError):
        return []
