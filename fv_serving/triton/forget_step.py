"""Turning a vector choice into a validated forget step: one path for `fv triton build` and `fv switch`.

Everything is checked BEFORE anything is written or any server is touched: admission
(bounded values, not a no-op; an unmet stopping rule becomes a warning), the vector's
shape against the image shape the deployment serves, and the classifier fingerprint
(the deployed classifier graph is run in onnxruntime on the vector's probe images and
must reproduce the logits recorded in the vector). `force=True` skips only the
fingerprint check, and says so in the sidecar stored next to the published version.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx

from fv_serving.admission import AdmissionPolicy
from fv_serving.config import METRIC_NAMES
from fv_serving.errors import ModelMismatchError
from fv_serving.onnx.checked import forget_step
from fv_serving.onnx.graph import META_PREFIX, OFF_ID, metadata
from fv_serving.provenance import now_iso, who
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

    @property
    def vector_id(self) -> str:
        return self.vector.vector_id if self.vector is not None else OFF_ID


def prepare_forget_step(
    choice: VectorChoice,
    classifier: onnx.ModelProto,
    image_shape: tuple[int, int, int],
    *,
    force: bool = False,
    class_names: Sequence[str] = (),
    policy: AdmissionPolicy | None = None,
) -> PreparedStep:
    """Resolve, validate and build the forget step; nothing is written and no server is touched."""
    vector = choice.resolve(class_names)
    if vector is not None and tuple(vector.delta.shape) != tuple(image_shape):
        raise ModelMismatchError(
            f"forget vector {vector.vector_id} has shape {list(vector.delta.shape)}, but the deployment "
            f"serves [N,{','.join(map(str, image_shape))}] images"
        )
    checked = forget_step(vector, image_shape, classifier=classifier, force=force, policy=policy)
    raw_forced = metadata(checked.graph).get(f"{META_PREFIX}forced")
    forced = json.loads(raw_forced) if raw_forced else None
    sidecar = sidecar_metadata(vector, choice, forced, checked.warnings)
    return PreparedStep(checked.graph, vector, sidecar, checked.checks, checked.warnings)


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
