"""Graph surgery: a forget vector fused into a classifier graph, or a forget step on its own.

Pure functions in the manner of `onnx.compose`: ModelProto in -> new ModelProto out,
the input never modified, no runtime run and no clock read (the checks and the
provenance stamp live beside them, in `fv_serving.onnx.checked`). The perturbation
is built as a tiny graph of its own with `onnx.helper` and joined to the classifier
with `onnx.compose.merge_models`, so its nodes come first and feed the classifier's
image input; every name it brings is chosen not to collide with the classifier's
(merge_models refuses overlapping node/edge/initializer/value_info names, and
`add_prefix` would also rename the shared image input).

Semantics: those of `fv_serving.perturbation.apply_delta`, elementwise:
    sanitize:  NaN -> low, then min(max(x, low), high)   (low, high = the pixel range)
    perturb:   + delta
    clamp:     min(max(., clamp_low), clamp_high)         (only when the vector has a clamp)
For a graph that takes normalised input z = (x - mean)/std, delta/std is added and
every bound is mapped per channel: (b - mean)/std. Exact identity:
(x + d - m)/s == (x - m)/s + d/s.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fv_serving.config import Clamp
from fv_serving.errors import InvalidInputError, ModelMismatchError, OnnxGraphError
from fv_serving.onnx.graph import (
    DEFAULT_OPSET,
    ID_OUTPUT,
    META_PREFIX,
    OFF_ID,
    STEP_INPUT,
    STEP_OUTPUT,
    ImageInput,
    default_opset,
    find_image_input,
    graph_inputs,
    graph_outputs,
    metadata,
    with_metadata,
)
from fv_serving.onnx.runtime import NormalizedInput, check_normalized_input
from fv_serving.perturbation import PIXEL_RANGE
from fv_serving.vectors import ForgetVector

#: Oldest default opset with IsNaN/Where (sanitising) and multidirectional Add/Max/Min.
MIN_FUSE_OPSET = 9


# -- names --------------------------------------------------------------------------------------------


def _names_in(graph: onnx.GraphProto) -> Iterator[str]:
    """Every name a graph (and its subgraphs) uses: nodes, edges, initializers, value infos."""
    for v in (*graph.input, *graph.output, *graph.value_info):
        yield v.name
    for t in graph.initializer:
        yield t.name
    for s in graph.sparse_initializer:
        yield s.values.name
        yield s.indices.name
    for node in graph.node:
        yield node.name
        yield from node.input
        yield from node.output
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _names_in(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _names_in(g)


def _free_prefix(graph: onnx.GraphProto) -> str:
    """ "fv_" unless the graph already uses names starting with it; then "fv1_", "fv2_", ..."""
    used = set(_names_in(graph))
    for i in range(1000):
        prefix = "fv_" if i == 0 else f"fv{i}_"
        if not any(name.startswith(prefix) for name in used):
            return prefix
    raise OnnxGraphError("could not find a free name prefix for the forget-vector nodes")


# -- the perturbation subgraph ------------------------------------------------------------------------


class _Builder:
    """Nodes and initializers of the perturbation subgraph, all named with one prefix."""

    def __init__(
        self, prefix: str, np_type: np.dtype[Any], mean: np.ndarray, std: np.ndarray, per_channel: bool, opset: int
    ) -> None:
        self.prefix, self.np_type, self.mean, self.std, self.per_channel = prefix, np_type, mean, std, per_channel
        # Clip takes its bounds as inputs from opset 11, and scalar bounds only.
        self.use_clip = opset >= 11 and not per_channel
        self.nodes: list[onnx.NodeProto] = []
        self.tensors: list[onnx.TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.tensors.append(numpy_helper.from_array(np.asarray(value).astype(self.np_type), self.prefix + name))
        return self.prefix + name

    def bound(self, name: str, pixel_value: float) -> str:
        """A pixel-space bound in the graph's input space: a scalar, or [1,C,1,1] for normalised input."""
        if not self.per_channel:
            return self.constant(name, np.array(pixel_value))
        return self.constant(name, ((pixel_value - self.mean) / self.std).reshape(1, -1, 1, 1))

    def node(self, op: str, inputs: list[str], output: str) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=f"{self.prefix}{output}_{op.lower()}"))
        return output

    def clip(self, x: str, low: str, high: str, output: str) -> str:
        """min(max(x, low), high): Clip where it can, else Max then Min (the same result)."""
        if self.use_clip:
            return self.node("Clip", [x, low, high], output)
        return self.node("Min", [self.node("Max", [x, low], self.prefix + output + "_low"), high], output)


def _perturbation_graph(
    vector: ForgetVector | None,
    image: onnx.ValueInfoProto,
    elem_type: int,
    output: str,
    prefix: str,
    normalized_input: NormalizedInput | None,
    pixel_range: Clamp,
    opset: int,
) -> onnx.GraphProto:
    """image -> [sanitize] -> [Add delta] -> [clamp] -> output (see the module docstring)."""
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    channels = image.type.tensor_type.shape.dim[1].dim_value
    mean, std = check_normalized_input(normalized_input, channels)
    b = _Builder(prefix, np_type, mean, std, per_channel=normalized_input is not None, opset=opset)
    current = image.name
    if pixel_range is not None:
        low, high = b.bound("input_low", pixel_range[0]), b.bound("input_high", pixel_range[1])
        is_nan = b.node("IsNaN", [current], prefix + "input_is_nan")
        current = b.node("Where", [is_nan, low, current], prefix + "input_no_nan")
        current = b.clip(current, low, high, prefix + "input_sanitized")
    if vector is not None:
        delta = vector.delta if normalized_input is None else vector.delta / std.reshape(-1, 1, 1)
        current = b.node("Add", [current, b.constant("delta", delta[None])], prefix + "perturbed")
        if vector.clamp is not None:
            clamp_low, clamp_high = b.bound("clamp_low", vector.clamp[0]), b.bound("clamp_high", vector.clamp[1])
            current = b.clip(current, clamp_low, clamp_high, prefix + "clamped")
    b.node("Identity", [current], output)
    out_info = onnx.ValueInfoProto()
    out_info.CopyFrom(image)
    out_info.name = output
    return helper.make_graph(b.nodes, f"{prefix}forget_vector", [image], [out_info], b.tensors)


def _id_output_nodes(image: str, vector_id: str, prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`vector_id` string [N, 1] with N the batch of `image`: Shape -> [N, 1] -> Expand a [1, 1] constant."""
    nodes = [
        helper.make_node("Shape", [image], [f"{prefix}batch_dim"], name=f"{prefix}batch_dim", start=0, end=1),
        helper.make_node(
            "Concat", [f"{prefix}batch_dim", f"{prefix}one"], [f"{prefix}id_shape"], name=f"{prefix}id_shape", axis=0
        ),
        helper.make_node("Expand", [f"{prefix}id", f"{prefix}id_shape"], [ID_OUTPUT], name=f"{prefix}id_expand"),
    ]
    tensors = [
        helper.make_tensor(f"{prefix}id", TensorProto.STRING, [1, 1], [vector_id.encode()]),  # type: ignore[list-item]
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}one"),
    ]
    return nodes, tensors


def _id_output_info() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(ID_OUTPUT, TensorProto.STRING, ["batch", 1])


def _vector_json(vector: ForgetVector) -> str:
    return json.dumps(vector.describe(), sort_keys=True, default=str)


def _input_space(normalized_input: NormalizedInput | None, pixel_range: Clamp) -> dict[str, object]:
    space: dict[str, object] = {"space": "raw pixels", "pixel_range": list(pixel_range) if pixel_range else None}
    if pixel_range is not None:
        space["out_of_range"] = "NaN -> low end, then clipped to the pixel range, before delta is added"
    if normalized_input is not None:
        mean, std = normalized_input
        space.update(space="normalised (x - mean) / std", mean=[float(m) for m in mean], std=[float(s) for s in std])
    return space


# -- fused graph ----------------------------------------------------------------------------------------


def check_fusable(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
) -> ImageInput:
    """The structural refusals of fusing (shape, already fused, opset, statistics); returns the image input."""
    image = find_image_input(model, input_name)
    if vector.delta.shape != image.chw:
        raise ModelMismatchError(
            f"forget vector {vector.vector_id} has shape {list(vector.delta.shape)}, but input "
            f"{image.name!r} takes [N,{','.join(map(str, image.chw))}] images"
        )
    meta = metadata(model)
    if f"{META_PREFIX}vector_id" in meta:
        raise OnnxGraphError(
            f"the graph already carries forget vector {meta[f'{META_PREFIX}vector_id']}; "
            "fuse into the unfused classifier graph instead (vectors would add up)"
        )
    opset = default_opset(model)
    if opset < MIN_FUSE_OPSET:
        raise OnnxGraphError(f"the graph uses opset {opset}; fusing needs opset >= {MIN_FUSE_OPSET}")
    check_normalized_input(normalized_input, image.chw[0])
    return image


def fuse_graph(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    pixel_range: Clamp = PIXEL_RANGE,
    id_output: bool = False,
) -> onnx.ModelProto:
    """A copy of `model` whose first nodes sanitise its image input and add the vector.

    Inputs and outputs (names, shapes, types, order) stay those of `model`, so it is a
    drop-in replacement; `id_output=True` appends a `vector_id` string output (which
    changes the outputs: opt-in). For a graph that takes normalised input, pass the
    pixel statistics it expects as `normalized_input=(mean, std)`. Structural refusals
    only (shape, opset, already fused); whether the vector belongs to this classifier
    is checked by `fv_serving.onnx.checked.fuse_vector`.
    """
    image = check_fusable(model, vector, input_name=input_name, normalized_input=normalized_input)
    if id_output and ID_OUTPUT in {o.name for o in graph_outputs(model)}:
        raise OnnxGraphError(f"the graph already has an output named {ID_OUTPUT!r}")
    fused = _merge(model, vector, image, normalized_input, pixel_range)
    if id_output:
        nodes, tensors = _id_output_nodes(image.name, vector.vector_id, _free_prefix(fused.graph))
        fused.graph.node.extend(nodes)
        fused.graph.initializer.extend(tensors)
        fused.graph.output.append(_id_output_info())
    fused = with_metadata(
        fused,
        {
            f"{META_PREFIX}kind": "fused",
            f"{META_PREFIX}vector_id": vector.vector_id,
            f"{META_PREFIX}vector": _vector_json(vector),
            f"{META_PREFIX}image_input": image.name,
            f"{META_PREFIX}input_space": _input_space(normalized_input, pixel_range),
            f"{META_PREFIX}id_output": ID_OUTPUT if id_output else "none",
        },
    )
    expected_outputs = (*graph_outputs(model), *graph_outputs(fused)[-1:]) if id_output else graph_outputs(model)
    if (graph_inputs(fused), graph_outputs(fused)) != (graph_inputs(model), expected_outputs):
        raise OnnxGraphError("internal error: fusing changed the graph's inputs or outputs")
    return fused


def _merge(
    model: onnx.ModelProto,
    vector: ForgetVector,
    image: ImageInput,
    normalized_input: NormalizedInput | None,
    pixel_range: Clamp,
) -> onnx.ModelProto:
    opset = default_opset(model)
    prefix = _free_prefix(model.graph)
    output = f"{prefix}image_fv"
    image_info = next(v for v in model.graph.input if v.name == image.name)
    step = helper.make_model(
        _perturbation_graph(vector, image_info, image.elem_type, output, prefix, normalized_input, pixel_range, opset),
        opset_imports=[helper.make_opsetid("", opset)],
        ir_version=model.ir_version,
    )
    try:
        merged = onnx.compose.merge_models(
            step,
            model,
            io_map=[(output, image.name)],
            name=model.graph.name,
            doc_string=model.graph.doc_string,
            producer_name=model.producer_name,
            producer_version=model.producer_version,
            domain=model.domain,
            model_version=model.model_version,
        )
    except ValueError as exc:
        raise OnnxGraphError(f"cannot join the forget vector to the graph: {exc}") from exc
    merged.doc_string = model.doc_string
    # merge_models lists each graph's opset imports; keep one entry per domain, and the original input order.
    imports = {(e.domain or ""): e.version for e in merged.opset_import}
    del merged.opset_import[:]
    merged.opset_import.extend(helper.make_opsetid(d, v) for d, v in imports.items())
    order = [v.name for v in model.graph.input]
    by_name = {v.name: v for v in merged.graph.input}
    reordered = [by_name[n] for n in order if n in by_name]
    del merged.graph.input[:]
    merged.graph.input.extend(reordered)
    return merged


# -- forget step alone ------------------------------------------------------------------------------------


def forget_step_graph(
    vector: ForgetVector | None,
    shape: tuple[int, int, int] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    pixel_range: Clamp = PIXEL_RANGE,
) -> onnx.ModelProto:
    """The forget step alone for the Triton ensemble: `image` [N,C,H,W] float32 -> `image_fv`, `vector_id` [N,1].

    `vector` None is the identity ("off") step (input still sanitised), which needs
    `shape` = (C,H,W). A bank composition arrives here already combined into one
    vector (`fv_serving.arithmetic.compose`), so the step stays a single Add (+ clamp)
    whatever the bank size. Why not ship the bank and take w as an input: (1) a runtime
    input lets any caller pick w = 0 and bypass unlearning; (2) the bank (600 MB for
    1000 classes at 3x224x224) would sit in server memory and be multiplied on every
    request; (3) changing w must be a published, versioned, auditable event anyway,
    and a new forget_step version is exactly that, with the classifier untouched.
    """
    if vector is None:
        if shape is None:
            raise InvalidInputError("the identity (off) forget step needs the image shape (C, H, W)")
        chw = tuple(int(s) for s in shape)
    else:
        chw = tuple(int(s) for s in vector.delta.shape)
        if shape is not None and tuple(shape) != chw:
            raise InvalidInputError(f"shape {list(shape)} differs from the vector's shape {list(chw)}")
    if len(chw) != 3 or min(chw) < 1:
        raise InvalidInputError(f"image shape must be (C, H, W) with positive sizes, got {list(chw)}")
    if opset < 11:
        raise InvalidInputError(f"the forget step is written for opset >= 11 (Clip with tensor bounds), got {opset}")
    image = helper.make_tensor_value_info(STEP_INPUT, TensorProto.FLOAT, ["batch", *chw])
    graph = _perturbation_graph(vector, image, TensorProto.FLOAT, STEP_OUTPUT, "fv_", None, pixel_range, opset)
    graph.name = "forget_step" if vector is not None else "forget_step_off"
    vector_id = vector.vector_id if vector is not None else OFF_ID
    nodes, tensors = _id_output_nodes(STEP_INPUT, vector_id, "fv_")
    graph.node.extend(nodes)
    graph.initializer.extend(tensors)
    graph.output.append(_id_output_info())
    imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph, opset_imports=imports, ir_version=helper.find_min_ir_version_for(imports), producer_name="fv-serving"
    )
    props: dict[str, object] = {
        f"{META_PREFIX}kind": "forget_step",
        f"{META_PREFIX}vector_id": vector_id,
        f"{META_PREFIX}input_space": _input_space(None, pixel_range),
        f"{META_PREFIX}vector": _vector_json(vector)
        if vector is not None
        else json.dumps({"vector_id": OFF_ID, "shape": list(chw)}),
    }
    if vector is not None:
        props[f"{META_PREFIX}classifier_sha256"] = vector.classifier.weights_sha256
    return with_metadata(model, props)
