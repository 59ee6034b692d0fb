"""One classifier in the other forms users export it in: float16, ending in softmax, taking normalised input.

What the fingerprint must recognise as the same model (`fv_serving.fingerprint.form_distance`);
used by the fingerprint benchmark and its tests. Each form is a real export of the
same weights, not a numerical imitation.
"""

from __future__ import annotations

import copy

import onnx
import torch
from onnx import helper
from torch import nn

from fv_serving.fingerprint import probe_batch
from fv_serving.models import Classifier
from fv_serving.onnx.graph import DEFAULT_OPSET, graph_outputs


def export_module(module: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """`module` (any dtype) as an in-memory graph `image` -> `logits` with a dynamic batch (dynamo exporter)."""
    program = torch.onnx.export(
        copy.deepcopy(module).eval(),
        (example,),
        None,
        dynamo=True,
        verbose=False,
        input_names=["image"],
        output_names=["logits"],
        opset_version=opset,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        external_data=False,
    )
    assert program is not None
    return program.model_proto


def float16_form(classifier: Classifier) -> onnx.ModelProto:
    """The classifier exported in float16 end to end (float16 input, weights and logits)."""
    example = torch.from_numpy(probe_batch(classifier.spec.input_shape, count=2)).half()
    return export_module(copy.deepcopy(classifier).half(), example)


def normalized_input_form(classifier: Classifier) -> onnx.ModelProto:
    """The classifier without its normalisation layer: the graph takes (x - mean) / std."""
    example = torch.from_numpy(probe_batch(classifier.spec.input_shape, count=2))
    return export_module(classifier.body, example)


def softmax_form(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with a Softmax over the classes appended; the output keeps its name."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name = graph_outputs(model)[0].name
    raw = f"{name}_before_softmax"
    for node in out.graph.node:
        node.output[:] = [raw if n == name else n for n in node.output]
        node.input[:] = [raw if n == name else n for n in node.input]
    out.graph.node.append(helper.make_node("Softmax", [raw], [name], axis=1, name="appended_softmax"))
    return out
