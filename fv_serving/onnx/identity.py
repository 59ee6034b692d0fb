"""The fingerprint of a classifier that exists only as an ONNX graph (a user's export, not our checkpoint).

A vector learned against such a graph records it the way vectors of our checkpoints
record theirs, so that `fv export fused` and `fv triton build` accept the vector for
that graph (and the same model in another form) without --force:

* weights id: the digest our exporter recorded in the graph's metadata when there is
  one (the graph is then our export of a checkpoint, and a vector of that checkpoint
  must match it too); otherwise sha256 over the graph's initializers (name, type,
  dims, bytes, in name order), which identifies the weights of this very file;
* probe outputs: the graph's own outputs in onnxruntime on the probe images, fed
  through its normalisation when it takes normalised input. They are recorded as the
  graph gives them (logits, or probabilities for a graph ending in softmax): the
  fingerprint's comparison rule reads both (`fv_serving.fingerprint`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

from fv_serving.errors import OnnxGraphError
from fv_serving.fingerprint import ClassifierFingerprint, probe_batch
from fv_serving.onnx.graph import META_PREFIX, find_image_input, graph_inputs, graph_outputs, metadata
from fv_serving.onnx.runtime import NormalizedInput, make_session, pixel_logits_fn


def initializers_digest(model: onnx.ModelProto) -> str:
    """sha256 over every initializer (name, data type, dims, values) in name order."""
    h = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        values = np.ascontiguousarray(numpy_helper.to_array(tensor))
        h.update(f"{tensor.name}|{tensor.data_type}|{list(tensor.dims)}|".encode())
        h.update(values.tobytes())
    return h.hexdigest()


def graph_fingerprint(
    model: onnx.ModelProto,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    provider: str = "cpu",
) -> ClassifierFingerprint:
    """The fingerprint of `model` as a classifier of raw-pixel images (module docstring)."""
    image = find_image_input(model, input_name)
    others = [i.name for i in graph_inputs(model) if i.name != image.name]
    outputs = graph_outputs(model)
    if others or len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise OnnxGraphError(
            f"a classifier graph takes one image and gives one [N,K] output; this one takes "
            f"{[i.name for i in graph_inputs(model)]} and gives {[o.describe() for o in outputs]}"
        )
    run = pixel_logits_fn(make_session(model, provider), image, normalized_input)
    probe = np.asarray(run(probe_batch(image.chw)), np.float32)
    recorded = metadata(model).get(f"{META_PREFIX}classifier_sha256")
    return ClassifierFingerprint(
        weights_sha256=recorded or initializers_digest(model),
        input_shape=image.chw,
        num_classes=int(probe.shape[1]),
        probe_logits=probe,
    )
