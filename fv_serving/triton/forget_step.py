"""Turning a vector choice into a validated forget step: one path for `fv triton build` and `fv switch`.

Everything is checked BEFORE anything is written or any server is touched: admission
(bounded values, not a no-op; an unmet stopping rule becomes a warning), the vector's
shape against the image shape the deployment serves, and the classifier fingerprint
(the deployed classifier graph is run in onnxruntime on the vector's probe images and
must reproduce the logits recorded in the vector). `force=True` skips only the
fingerprint check, and says so in the sidecar stored next to the published version.

A gated step (`gated=True`, class-wise vectors) is the deployed classifier's gated
graph (`fv_serving.onnx.gated`: delta only where the classifier predicts a forgotten
class, the second pass on those rows only), checked against the gated mode's
definition, published into `forget_step_gated` (`fv_serving.triton.topology` says why
it is a model of its own). It answers with the vector's id marked "-gated".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from fv_serving.admission import AdmissionPolicy
from fv_serving.config import METRIC_NAMES
from fv_serving.errors import InvalidInputError, ModelMismatchError
from fv_serving.onnx.checked import forget_step, fuse_gated_vector
from fv_serving.onnx.gated import gate_classes, gate_record, gated_vector_id
from fv_serving.onnx.graph import META_PREFIX, OFF_ID, metadata
from fv_serving.provenance import now_iso, who
from fv_serving.triton.repository import FORGET_STEP_MODEL, GATED_STEP_MODEL
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import ForgetVector

#: Metrics copied from a vector file into the version's sidecar (the bulky details stay in the file).
SIDECAR_METRICS = (*METRIC_NAMES, "per_forgotten_class_UA")


@dataclass(frozen=True)
class PreparedStep:
    """A validated forget step graph, ready to publish, and the sidecar stored beside it."""

    graph: onnx.ModelProto
    vector: ForgetVector | None
    metadata: dict[str, Any]
    checks: tuple[str, ...]
    warnings: tuple[str, ...]
    gated: bool = False

    @property
    def vector_id(self) -> str:
        if self.vector is None:
            return OFF_ID
        return gated_vector_id(self.vector) if self.gated else self.vector.vector_id

    @property
    def model(self) -> str:
        """The versioned model the step is published into."""
        return GATED_STEP_MODEL if self.gated else FORGET_STEP_MODEL


def prepare_forget_step(
    choice: VectorChoice,
    classifier: onnx.ModelProto,
    image_shape: tuple[int, int, int],
    *,
    force: bool = False,
    class_names: Sequence[str] = (),
    policy: AdmissionPolicy | None = None,
    gated: bool = False,
) -> PreparedStep:
    """Resolve, validate and build the forget step (gated: the gated step); nothing is written, no server touched."""
    vector = choice.resolve(class_names)
    if vector is not None and tuple(vector.delta.shape) != tuple(image_shape):
        raise ModelMismatchError(
            f"forget vector {vector.vector_id} has shape {list(vector.delta.shape)}, but the deployment "
            f"serves [N,{','.join(map(str, image_shape))}] images"
        )
    if gated and vector is None:
        raise InvalidInputError("the gated mode needs a class-wise vector; with --off there is nothing to gate")
    if gated:
        assert vector is not None
        checked = fuse_gated_vector(classifier, vector, force=force, policy=policy, id_output=True)
    else:
        checked = forget_step(vector, image_shape, classifier=classifier, force=force, policy=policy)
    raw_forced = metadata(checked.graph).get(f"{META_PREFIX}forced")
    forced = json.loads(raw_forced) if raw_forced else None
    sidecar = sidecar_metadata(vector, choice, forced, checked.warnings)
    if gated:
        assert vector is not None
        sidecar.update(
            vector_id=gated_vector_id(vector), delta_vector_id=vector.vector_id, gate=gate_record(gate_classes(vector))
        )
    return PreparedStep(checked.graph, vector, sidecar, checked.checks, checked.warnings, gated)


def sidecar_metadata(
    vector: ForgetVector | None, choice: VectorChoice, forced: dict[str, Any] | None, warnings: Sequence[str]
) -> dict[str, Any]:
    """The JSON beside a forget_step version: what it adds, where it came from, who published it."""
    base: dict[str, Any] = {
        "source": choice.describe(),
        "published_at": now_iso(),
        "published_by": who(),
        "warnings": list(warnings),
    }
    if vector is None:
        return {"vector_id": OFF_ID, "forget": None, "metrics": {}, "forced": None, **base}
    return {
        "vector_id": vector.vector_id,
        "forget": vector.forget,
        "metrics": {k: vector.metrics[k] for k in SIDECAR_METRICS if k in vector.metrics},
        "rule_met": (vector.metrics.get("stopping") or {}).get("rule_met"),
        "clamp": list(vector.clamp) if vector.clamp else None,
        "l2_norm": round(vector.l2_norm, 6),
        "classifier_sha256": vector.classifier.weights_sha256,
        "forced": forced,
        **base,
    }
