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

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from fv_serving.admission import AdmissionPolicy, admit
from fv_serving.errors import ModelMismatchError
from fv_serving.fingerprint import probe_batch
from fv_serving.onnx.fuse import check_fusable, forget_step_graph, fuse_graph
from fv_serving.onnx.gate_check import parity_images, verify_gated
from fv_serving.onnx.gated import check_gatable, gate_classes, gated_graph
from fv_serving.onnx.graph import META_PREFIX, check_model, graph_inputs, metadata, with_metadata
from fv_serving.onnx.runtime import (
    NormalizedInput,
    check_vector_matches,
    make_session,
    pixel_logits_fn,
    verify_forget_step,
    verify_fused,
)
from fv_serving.provenance import forced_record
from fv_serving.vectors import ForgetVector

CLASSIFIER_CHECK = "classifier check (probe logits of the unfused classifier graph vs the vector's fingerprint)"
#: Parity tolerance (relative to the logit scale) for a float16 graph: it adds delta in float16 while the
#: reference adds it in float32 and rounds the sum, an ulp of the input apart (2^-10 ~ 1e-3 at 1.0) that
#: the network carries to the logits (measured: <= 7e-4 on the small CNN). Missing or wrong deltas move
#: the logits by whole units.
HALF_PARITY_ATOL = 4e-3


def _parity_atol(elem_type: int) -> float | None:
    """The parity tolerance for a graph whose image input has this type (None: the float32 defaults)."""
    return HALF_PARITY_ATOL if elem_type == onnx.TensorProto.FLOAT16 else None


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


def _admitted(
    model: onnx.ModelProto,
    vector: ForgetVector,
    image_name: str,
    force: bool,
    normalized_input: NormalizedInput | None,
    provider: str,
    policy: AdmissionPolicy | None,
) -> tuple[list[str], str, dict[str, object]]:
    """(warnings, what was checked, metadata to stamp): admission, then the classifier check of a graph to fuse into."""
    warnings = admit(vector, policy)
    checked, stamp = _classifier_check(
        model, vector, force=force, input_name=image_name, normalized_input=normalized_input, provider=provider
    )
    return warnings, checked, stamp


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
    check_model(model, "the classifier graph")
    image = check_fusable(model, vector, input_name=input_name, normalized_input=normalized_input)
    warnings, checked, stamp = _admitted(model, vector, image.name, force, normalized_input, provider, policy)
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
            atol=_parity_atol(image.elem_type),
            provider=provider,
        )
        checks.append(
            f"fused(x) == original(clamp(sanitize(x) + delta)) in onnxruntime on probe images: max |diff| {err:.2e}"
        )
    else:
        checks.append("parity not run: the graph has inputs besides the image")
    return CheckedGraph(fused, tuple(checks), tuple(warnings))


def fuse_gated_vector(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    classes: Sequence[int] | None = None,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    force: bool = False,
    provider: str = "cpu",
    policy: AdmissionPolicy | None = None,
    id_output: bool = False,
) -> CheckedGraph:
    """The gated fused graph (`gated.gated_graph`), admitted, classifier-checked, checked and verified.

    Parity against the gated mode's definition (`gate_check.gated_reference` with the
    unfused graph) runs on the probe and grey images three times: with the vector's
    gate, which may fire on few of them; with the gate opened for every class, so the
    second pass, the gather and the scatter are verified on every image whatever the
    gate decides; and on one image with the gate closed to its class, an empty second
    pass. A graph that fails the empty pass gets the guarded form (`gated_graph(guard=True)`).
    """
    classes = tuple(gate_classes(vector) if classes is None else classes)
    check_model(model, "the classifier graph")
    image = check_gatable(model, vector, classes, input_name=input_name, normalized_input=normalized_input)
    warnings, checked, stamp = _admitted(model, vector, image.name, force, normalized_input, provider, policy)

    def build(gate: Sequence[int], with_id: bool, guard: bool) -> onnx.ModelProto:
        return gated_graph(
            model,
            vector,
            gate,
            input_name=image.name,
            normalized_input=normalized_input,
            id_output=with_id,
            guard=guard,
        )

    def verify(graph: onnx.ModelProto, gate: Sequence[int], images: np.ndarray) -> tuple[float, int]:
        return verify_gated(
            model,
            graph,
            vector,
            gate,
            images,
            input_name=image.name,
            normalized_input=normalized_input,
            atol=_parity_atol(image.elem_type),
            provider=provider,
        )

    pixels = parity_images(image.chw)
    every = range(vector.classifier.num_classes)
    first = int(np.argmax(pixel_logits_fn(make_session(model, provider), image, normalized_input)(pixels[:1])))
    closed = [c for c in every if c != first]  # the first image is not gated: the second pass gets no row
    try:
        verify(build(closed, False, False), closed, pixels[:1])
        guard = False
    except Exception:  # onnxruntime raises its own exception types: any failure of the empty pass means "guard it"
        guard = True
    gated = with_metadata(build(classes, id_output, guard), stamp)
    check_model(gated, "the gated fused graph")
    err, fired = verify(gated, classes, pixels)
    err_all, _ = verify(build(every, False, guard), every, pixels)
    checks = [
        "onnx.checker full check",
        "inputs identical to the original graph; outputs "
        + ("+ vector_id" if id_output else "identical (drop-in replacement)"),
        checked,
        f"gated(x) == the gated mode (fv_serving.gating) in onnxruntime on {len(pixels)} probe/grey images, "
        f"{fired} gated: max |diff| {err:.2e}; with every class gated: max |diff| {err_all:.2e}",
        f"gate: delta only where the prediction is one of classes {list(classes)} (not input-agnostic)",
        "second pass inside If(any row gated): the graph cannot run an empty batch"
        if guard
        else "second pass on the gathered rows; an empty one (no row gated) checked on one image",
    ]
    return CheckedGraph(gated, tuple(checks), tuple(warnings))


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
