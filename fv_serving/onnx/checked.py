"""Graphs built with their checks and provenance: what every writer of a fused graph or forget step calls.

The surgery itself (`fv_serving.onnx.fuse`) is pure. Around it, in one place:
  1. admission (`fv_serving.admission`): bounded values, not a vector that changes nothing;
  2. the classifier check: the UNFUSED graph is run in onnxruntime on the vector's probe
     images and must give the vector's recorded logits (a vector learned for another
     classifier is refused with ModelMismatchError); `force=True` skips it and the skip
     is stamped into the graph's metadata;
  3. the ONNX checker (full) on the result and a parity run against `apply_delta`.
`fv export fused|forget`, `fv triton build` and `fv switch` all come through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from fv_serving.admission import AdmissionPolicy, admit
from fv_serving.errors import ModelMismatchError
from fv_serving.fingerprint import probe_batch
from fv_serving.onnx.fuse import check_fusable, forget_step_graph, fuse_graph
from fv_serving.onnx.graph import META_PREFIX, check_model, graph_inputs, metadata, with_metadata
from fv_serving.onnx.runtime import NormalizedInput, check_vector_matches, verify_forget_step, verify_fused
from fv_serving.provenance import forced_record
from fv_serving.vectors import ForgetVector

CLASSIFIER_CHECK = "classifier check (probe logits of the unfused classifier graph vs the vector's fingerprint)"


@dataclass(frozen=True)
class CheckedGraph:
    """A graph that passed its checks, what was checked, and the caveats to print."""

    graph: onnx.ModelProto
    checks: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def _classifier_check(
    classifier: onnx.ModelProto,
    vector: ForgetVector,
    *,
    force: bool,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    provider: str = "cpu",
) -> tuple[str, dict[str, object]]:
    """(what was checked, metadata to stamp): the fingerprint check, or the record of its skip."""
    recorded = metadata(classifier).get(f"{META_PREFIX}classifier_sha256")
    if force:
        record = forced_record(vector, CLASSIFIER_CHECK, recorded)
        return "classifier check SKIPPED (--force; recorded in metadata fv_serving.forced)", {
            f"{META_PREFIX}classifier_check": "skipped (forced)",
            f"{META_PREFIX}forced": record,
        }
    if recorded is not None and recorded != vector.classifier.weights_sha256:
        raise ModelMismatchError(
            f"forget vector {vector.vector_id} was made for classifier {vector.classifier.short_id}, but the "
            f"graph records classifier {recorded[:12]} in its metadata"
        )
    check_vector_matches(
        classifier, vector, input_name=input_name, normalized_input=normalized_input, provider=provider
    )
    return "classifier check: the classifier graph reproduces the vector's probe logits (same classifier)", {
        f"{META_PREFIX}classifier_check": "passed (probe logits)"
    }


def fuse_vector(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    force: bool = False,
    provider: str = "cpu",
    policy: AdmissionPolicy | None = None,
    id_output: bool = False,
) -> CheckedGraph:
    """The fused graph (`fuse.fuse_graph`), admitted, classifier-checked, checked and verified in onnxruntime."""
    warnings = admit(vector, policy)
    check_model(model, "the classifier graph")
    image = check_fusable(model, vector, input_name=input_name, normalized_input=normalized_input)
    checked, stamp = _classifier_check(
        model, vector, force=force, input_name=image.name, normalized_input=normalized_input, provider=provider
    )
    fused = with_metadata(
        fuse_graph(model, vector, input_name=image.name, normalized_input=normalized_input, id_output=id_output),
        stamp,
    )
    check_model(fused, "the fused graph")
    checks = [
        "onnx.checker full check",
        "inputs and outputs identical to the original graph (drop-in replacement)"
        if not id_output
        else "inputs identical to the original graph; outputs + vector_id",
        checked,
    ]
    if len(graph_inputs(model)) == 1:
        err = verify_fused(
            model,
            fused,
            vector,
            probe_batch(image.chw),
            input_name=image.name,
            normalized_input=normalized_input,
            provider=provider,
        )
        checks.append(
            f"fused(x) == original(clamp(sanitize(x) + delta)) in onnxruntime on probe images: max |diff| {err:.2e}"
        )
    else:
        checks.append("parity not run: the graph has inputs besides the image")
    return CheckedGraph(fused, tuple(checks), tuple(warnings))


def forget_step(
    vector: ForgetVector | None,
    shape: tuple[int, int, int],
    *,
    classifier: onnx.ModelProto | None = None,
    force: bool = False,
    provider: str = "cpu",
    policy: AdmissionPolicy | None = None,
) -> CheckedGraph:
    """The forget step (`fuse.forget_step_graph`), admitted, classifier-checked when a classifier is given."""
    checks: list[str] = []
    warnings: list[str] = []
    stamp: dict[str, object] = {}
    if vector is not None:
        warnings = admit(vector, policy)
        checks.append(f"values finite and within the bound; shape {list(vector.delta.shape)}")
        if classifier is not None:
            checked, stamp = _classifier_check(classifier, vector, force=force, provider=provider)
            checks.append(checked)
    graph = with_metadata(forget_step_graph(vector, shape), stamp)
    check_model(graph, "the forget step graph")
    err = verify_forget_step(graph, vector, probe_batch(shape), provider=provider)
    checks.append(f"forget step == apply_delta(x, delta, clamp) on probe images (max |diff| {err:.1e})")
    return CheckedGraph(graph, tuple(checks), tuple(warnings))
