"""Graph surgery for the gated mode: delta added only to the images the classifier itself puts in a forgotten class.

The semantics are those of `fv_serving.gating.GatedPerturbedClassifier`, on sanitised input:

    z0 = f(sanitize(x))                                   every image, one pass
    g  = argmax(z0) in forgotten classes                  the gate, per image
    z  = z0 where not g, f(clamp(sanitize(x) + delta)) where g

Built as one graph, pure (ModelProto in -> new ModelProto out, no runtime, no clock;
the checks live in `fv_serving.onnx.checked.fuse_gated_vector`):

    image -> sanitize -> xs -> [classifier nodes] -> z0 -> ArgMax -> Gather(gate table) -> NonZero -> rows
    Gather(xs, rows) -> + delta [-> clamp] -> [classifier nodes, renamed] -> ScatterND(z0, rows, .) -> output

Why this shape:
  * the second pass runs on the M gated rows only (Gather, then ScatterND back), so
    its cost follows the share of forgotten-class inputs, not the batch size;
  * the second pass is the classifier's own nodes a second time, with node and
    intermediate tensor names prefixed and every initializer (and Constant node
    output) shared: no weight is duplicated;
  * M = 0 (no image gated, the common case) is an empty batch through the second
    pass: legal ONNX, and run by onnxruntime for the graphs this project exports. A
    foreign graph may break on it (a Reshape to [0, -1], a hidden static batch), so
    `guard=True` puts the second pass inside If(M > 0) instead, and the checked
    wrapper uses that form when the empty batch fails. Not the default, because
    onnxruntime (1.32, CPU) does not apply its NCHWc layout optimisation inside
    subgraphs: measured on the small CNN, one gated image cost 3.3x the plain
    fused graph inside the If and 1.95x (two passes) outside; batch 64 with 1 of 10
    classes 1.21x and 1.12x.

What is refused, with the reason: a classifier that is not a single [N,K] output
(the gate needs the logits or probabilities of the first pass), a static batch dim
(the gathered rows are a batch of another size), nodes that carry subgraphs (their
inner references would need renaming too), and a vector whose forget set is not
class-wise (there is no class to gate on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fv_serving.config import Clamp
from fv_serving.errors import InvalidInputError, OnnxGraphError
from fv_serving.onnx.fuse import (
    _free_prefix,
    _id_output_info,
    _id_output_nodes,
    _input_space,
    _perturbation_graph,
    _vector_json,
    check_fusable,
)
from fv_serving.onnx.graph import (
    ID_OUTPUT,
    META_PREFIX,
    ImageInput,
    default_opset,
    graph_inputs,
    graph_outputs,
    with_metadata,
)
from fv_serving.onnx.runtime import NormalizedInput
from fv_serving.perturbation import PIXEL_RANGE
from fv_serving.vectors import ForgetVector

#: NonZero (9) and ScatterND (11) are the newest operators the gated graph needs.
MIN_GATED_OPSET = 11
#: Suffix of the id a gated graph answers with: the same delta served gated answers differently.
GATED_ID_SUFFIX = "-gated"
KIND = "fused_gated"
#: Name prefix (after the free prefix) of the second pass's nodes and tensors; no name this module adds starts with it.
SECOND_PASS = "pass2_"


def gated_vector_id(vector: ForgetVector) -> str:
    """The id gated answers carry: the vector's content id, marked as served gated."""
    return vector.vector_id + GATED_ID_SUFFIX


def gate_classes(vector: ForgetVector) -> tuple[int, ...]:
    """The forgotten classes a gated vector gates on: its class-wise forget set (refused otherwise)."""
    forget = vector.forget or {}
    classes = forget.get("classes")
    if forget.get("kind") != "class" or not classes:
        raise InvalidInputError(
            f"forget vector {vector.vector_id} forgets {forget.get('kind') or 'an unrecorded set'}; the gated mode "
            "needs a class-wise vector (it gates on the classes the classifier predicts)"
        )
    ids = tuple(int(c) for c in classes)
    n = vector.classifier.num_classes
    bad = [c for c in ids if not 0 <= c < n]
    if bad or len(set(ids)) != len(ids):
        raise InvalidInputError(
            f"forget vector {vector.vector_id}: gate classes {list(ids)} must be distinct, in 0..{n - 1}"
        )
    return ids


def gate_record(classes: Sequence[int]) -> dict[str, Any]:
    """What the metadata (graph, sidecar) says about the gate."""
    return {
        "forgotten_classes": [int(c) for c in classes],
        "rule": "delta added only to images whose unperturbed prediction (argmax) is a forgotten class",
        "input_agnostic": False,
    }


def _logits_output(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    outputs = graph_outputs(model)
    if len(outputs) != 1 or len(outputs[0].shape) != 2:
        listing = ", ".join(o.describe() for o in outputs)
        raise OnnxGraphError(
            f"the gated mode needs one [N,K] output (logits or probabilities), the graph has {listing}"
        )
    produced = {name for node in model.graph.node for name in node.output}
    if outputs[0].name not in produced:
        raise OnnxGraphError(f"output {outputs[0].name!r} is not computed by any node of the graph")
    return model.graph.output[0]


def check_gatable(
    model: onnx.ModelProto,
    vector: ForgetVector,
    classes: Sequence[int],
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
) -> ImageInput:
    """The structural refusals of the gated mode, on top of those of fusing (`fuse.check_fusable`); the image input."""
    image = check_fusable(model, vector, input_name=input_name, normalized_input=normalized_input)
    if len(graph_inputs(model)) != 1:
        raise OnnxGraphError("the gated mode needs a graph whose only input is the image (it runs the graph twice)")
    if image.batch is not None:
        raise OnnxGraphError(
            f"input {image.name!r} has a static batch of {image.batch}; the gated mode needs it dynamic"
        )
    if default_opset(model) < MIN_GATED_OPSET:
        raise OnnxGraphError(f"the graph uses opset {default_opset(model)}; the gated mode needs >= {MIN_GATED_OPSET}")
    with_subgraphs = [n.op_type for n in model.graph.node if any(a.type in (a.GRAPH, a.GRAPHS) for a in n.attribute)]
    if with_subgraphs:
        raise OnnxGraphError(f"the gated mode cannot run a graph twice whose nodes hold subgraphs ({with_subgraphs})")
    output = _logits_output(model)
    dims = output.type.tensor_type.shape.dim
    k = dims[1].dim_value if dims[1].HasField("dim_value") else vector.classifier.num_classes
    if k != vector.classifier.num_classes:
        raise OnnxGraphError(
            f"output {output.name!r} has {k} classes, the vector's classifier {vector.classifier.num_classes}"
        )
    if not classes or any(not 0 <= int(c) < k for c in classes):
        raise InvalidInputError(f"gate classes {list(classes)} must be a non-empty subset of 0..{k - 1}")
    return image


def _second_pass(
    nodes: Sequence[onnx.NodeProto], image: str, gated_image: str, prefix: str
) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    """The classifier's nodes once more on `gated_image`: node and intermediate names prefixed, weights shared.

    Constant nodes are not repeated (their outputs are read from the first pass), so
    nothing that holds values is copied. Returns the nodes and the renaming of tensors.
    """
    renamed = {name: f"{prefix}{name}" for node in nodes if node.op_type != "Constant" for name in node.output if name}
    renamed[image] = gated_image
    copies = []
    for node in nodes:
        if node.op_type == "Constant":
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name}" if node.name else ""
        copy.input[:] = [renamed.get(name, name) for name in node.input]
        copy.output[:] = [renamed.get(name, name) for name in node.output]
        copies.append(copy)
    return copies, renamed


def gated_graph(
    model: onnx.ModelProto,
    vector: ForgetVector,
    classes: Sequence[int] | None = None,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    pixel_range: Clamp = PIXEL_RANGE,
    id_output: bool = False,
    guard: bool = False,
) -> onnx.ModelProto:
    """A copy of `model` that adds the vector only to the images it predicts as `classes` (module docstring).

    `classes` default to the vector's class-wise forget set (`gate_classes`). Inputs
    and outputs stay those of `model` (drop-in); `id_output=True` appends `vector_id`,
    which names the vector as served gated (`gated_vector_id`). `guard=True` runs the
    second pass only when a row is gated (If), for graphs that cannot take an empty batch.
    """
    classes = tuple(int(c) for c in (gate_classes(vector) if classes is None else classes))
    image = check_gatable(model, vector, classes, input_name=input_name, normalized_input=normalized_input)
    opset = default_opset(model)
    prefix = _free_prefix(model.graph)
    output = _logits_output(model)
    image_info = next(v for v in model.graph.input if v.name == image.name)
    p = prefix  # every name this graph adds starts with it

    def constant(name: str, value: np.ndarray) -> str:
        tensors.append(numpy_helper.from_array(value, p + name))
        return p + name

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        target.append(helper.make_node(op, inputs, [p + out], name=f"{p}{out}_{op.lower()}", **attrs))
        return p + out

    tensors: list[onnx.TensorProto] = []
    target: list[onnx.NodeProto] = []
    sanitize = _perturbation_graph(
        None, image_info, image.elem_type, p + "image_sanitized", p, normalized_input, pixel_range, opset
    )
    nodes, tensors = list(sanitize.node), list(sanitize.initializer)
    xs = p + "image_sanitized"
    plain = p + "plain_" + output.name
    for original in model.graph.node:
        first = onnx.NodeProto()
        first.CopyFrom(original)
        first.input[:] = [xs if n == image.name else n for n in original.input]
        first.output[:] = [plain if n == output.name else n for n in original.output]
        nodes.append(first)
    for later in nodes:  # the output may also feed other nodes
        later.input[:] = [plain if n == output.name else n for n in later.input]

    target = nodes
    table = np.zeros(vector.classifier.num_classes, dtype=bool)
    table[list(classes)] = True
    scores = plain
    if output.type.tensor_type.elem_type not in (TensorProto.FLOAT, TensorProto.DOUBLE):
        scores = node("Cast", [plain], "gate_scores", to=TensorProto.FLOAT)
    predicted = node("ArgMax", [scores], "gate_predicted", axis=1, keepdims=0)
    gate = node("Gather", [constant("gate_table", table), predicted], "gate", axis=0)
    rows = node(
        "Reshape",
        [node("NonZero", [gate], "gate_nonzero"), constant("gate_flat", np.array([-1], np.int64))],
        "gate_rows",
    )
    rows_column = node("Reshape", [rows, constant("gate_column", np.array([-1, 1], np.int64))], "gate_rows_column")
    if guard:
        count = node("Size", [rows], "gate_count")
        any_gated = node("Greater", [count, constant("gate_zero", np.array(0, np.int64))], "gate_any")
        target = []
    gathered = node("Gather", [xs, rows], "gated_image_in", axis=0)
    gathered_info = onnx.ValueInfoProto()
    gathered_info.CopyFrom(image_info)
    gathered_info.name = gathered
    perturb = _perturbation_graph(
        vector, gathered_info, image.elem_type, p + "gated_image", p, normalized_input, None, opset
    )
    target.extend(perturb.node)
    tensors.extend(perturb.initializer)
    second, renamed = _second_pass(model.graph.node, image.name, p + "gated_image", p + SECOND_PASS)
    target.extend(second)
    if not guard:
        target.append(
            helper.make_node(
                "ScatterND", [plain, rows_column, renamed[output.name]], [output.name], name=f"{p}gated_scatter"
            )
        )
    else:
        scattered = node("ScatterND", [plain, rows_column, renamed[output.name]], "gated_scattered")
        then_branch = helper.make_graph(list(target), f"{p}gated_rows", [], [_like(output, scattered)])
        target = []
        kept = node("Identity", [plain], "plain_kept")
        else_branch = helper.make_graph(list(target), f"{p}no_gated_rows", [], [_like(output, kept)])
        branches = {"then_branch": then_branch, "else_branch": else_branch}
        nodes.append(helper.make_node("If", [any_gated], [output.name], name=f"{p}gate_if", **branches))

    outputs = [output]
    if id_output:
        if ID_OUTPUT in {o.name for o in graph_outputs(model)}:
            raise OnnxGraphError(f"the graph already has an output named {ID_OUTPUT!r}")
        id_nodes, id_tensors = _id_output_nodes(image.name, gated_vector_id(vector), p + "id_")
        nodes.extend(id_nodes)
        tensors.extend(id_tensors)
        outputs.append(_id_output_info())
    graph = helper.make_graph(
        nodes,
        model.graph.name,
        list(model.graph.input),
        outputs,
        [*model.graph.initializer, *tensors],
        doc_string=model.graph.doc_string,
        value_info=[v for v in model.graph.value_info if v.name != output.name],
        sparse_initializer=list(model.graph.sparse_initializer),
    )
    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    gated.graph.CopyFrom(graph)
    gated = with_metadata(
        gated,
        {
            f"{META_PREFIX}kind": KIND,
            f"{META_PREFIX}vector_id": gated_vector_id(vector),
            f"{META_PREFIX}vector": _vector_json(vector),
            f"{META_PREFIX}gate": json.dumps({**gate_record(classes), "guarded": guard}, sort_keys=True),
            f"{META_PREFIX}image_input": image.name,
            f"{META_PREFIX}input_space": _input_space(normalized_input, pixel_range),
            f"{META_PREFIX}id_output": ID_OUTPUT if id_output else "none",
        },
    )
    expected = (*graph_outputs(model), *graph_outputs(gated)[-1:]) if id_output else graph_outputs(model)
    if (graph_inputs(gated), graph_outputs(gated)) != (graph_inputs(model), expected):
        raise OnnxGraphError("internal error: gating changed the graph's inputs or outputs")
    return gated


def _like(output: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    """A branch output typed like the classifier's output."""
    info = onnx.ValueInfoProto()
    info.CopyFrom(output)
    info.name = name
    return info
