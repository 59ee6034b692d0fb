"""Graph surgery: a forget vector fused into a classifier graph, or a forget step on its own.

Pure functions in the manner of `onnx.compose`: ModelProto in -> new ModelProto out,
the input never modified, the ONNX checker (full) run on the result. The perturbation
is built as a tiny graph of its own with `onnx.helper` and joined to the classifier
with `onnx.compose.merge_models`, so its nodes come first and feed the classifier's
image input; every name it brings is chosen not to collide with the classifier's
(merge_models refuses overlapping node/edge/initializer/value_info names, and
`add_prefix` would also rename the shared image input).

The clamp has the semantics of `fv_serving.perturbation.apply_delta`:
clamp(x + delta, low, high) = min(max(x + delta, low), high), elementwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fv_serving.arithmetic import vector_from_bank
from fv_serving.errors import InvalidInputError, ModelMismatchError, OnnxGraphError
from fv_serving.onnx.graph import (
    DEFAULT_OPSET,
    META_PREFIX,
    ImageInput,
    check_model,
    default_opset,
    find_image_input,
    graph_inputs,
    graph_outputs,
    metadata,
    with_metadata,
)
from fv_serving.onnx.runtime import NormalizedInput, check_normalized_input, check_vector_matches
from fv_serving.vectors import ForgetVector, VectorBank

#: Tensor names of the standalone forget step (the Triton ensemble maps them).
STEP_INPUT = "image"
STEP_OUTPUT = "image_fv"
#: Id recorded for the identity ("off") forget step.
OFF_ID = "off"
#: Oldest default opset whose Add/Max/Min broadcast multidirectionally.
MIN_FUSE_OPSET = 8

BankSource = tuple[VectorBank, Sequence[float] | np.ndarray]


# -- the perturbation subgraph ------------------------------------------------------------------------


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


def _perturbation_graph(
    vector: ForgetVector,
    image: onnx.ValueInfoProto,
    elem_type: int,
    output: str,
    prefix: str,
    opset: int,
    normalized_input: NormalizedInput | None,
) -> onnx.GraphProto:
    """image -> Add(delta) [-> clamp] -> output.

    Pixel space: Add delta [1,C,H,W], then Clip(low, high) (Max/Min before opset 11).
    Normalised input z = (x - mean)/std: Add delta/std per channel, then the pixel
    bounds mapped per channel, (low - mean)/std and (high - mean)/std, with Max/Min
    (Clip only takes scalar bounds). Exact identity: (x + d - m)/s == (x - m)/s + d/s.
    """
    np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    channels = vector.delta.shape[0]
    mean, std = check_normalized_input(normalized_input, channels)
    scale = std.reshape(-1, 1, 1)
    delta = vector.delta.astype(np.float64) if normalized_input is None else vector.delta / scale
    tensors = [numpy_helper.from_array(delta[None].astype(np_type), f"{prefix}delta")]
    added = f"{prefix}perturbed" if vector.clamp is not None else output
    nodes = [helper.make_node("Add", [image.name, f"{prefix}delta"], [added], name=f"{prefix}add_delta")]
    if vector.clamp is not None:
        low, high = vector.clamp
        if normalized_input is None:
            lo = np.array(low, dtype=np_type)
            hi = np.array(high, dtype=np_type)
        else:
            lo = ((low - mean) / std).reshape(1, -1, 1, 1).astype(np_type)
            hi = ((high - mean) / std).reshape(1, -1, 1, 1).astype(np_type)
        tensors += [
            numpy_helper.from_array(lo, f"{prefix}clamp_low"),
            numpy_helper.from_array(hi, f"{prefix}clamp_high"),
        ]
        if normalized_input is None and opset >= 11:
            nodes.append(
                helper.make_node(
                    "Clip", [added, f"{prefix}clamp_low", f"{prefix}clamp_high"], [output], name=f"{prefix}clamp"
                )
            )
        else:
            nodes += [
                helper.make_node("Max", [added, f"{prefix}clamp_low"], [f"{prefix}above_low"], name=f"{prefix}max"),
                helper.make_node("Min", [f"{prefix}above_low", f"{prefix}clamp_high"], [output], name=f"{prefix}min"),
            ]
    out_info = onnx.ValueInfoProto()
    out_info.CopyFrom(image)
    out_info.name = output
    return helper.make_graph(nodes, f"{prefix}forget_vector", [image], [out_info], tensors)


def _require_finite(vector: ForgetVector) -> None:
    bad = int(vector.delta.size - np.count_nonzero(np.isfinite(vector.delta)))
    if bad:
        raise InvalidInputError(f"forget vector {vector.vector_id} holds {bad} non-finite value(s); refusing it")


def _vector_json(vector: ForgetVector) -> str:
    return json.dumps(vector.describe(), sort_keys=True, default=str)


# -- fused graph ----------------------------------------------------------------------------------------


def fuse_vector(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    force: bool = False,
    provider: str = "cpu",
) -> onnx.ModelProto:
    """A drop-in copy of `model` whose first nodes add the vector to its image input.

    Inputs and outputs (names, shapes, types, order) stay those of `model`. For a
    graph that takes normalised input, pass the pixel statistics it expects as
    `normalized_input=(mean, std)`: delta/std is added then. Before fusing, the
    unfused graph is run in onnxruntime on the vector's probe images and must give
    the vector's recorded logits (a vector learned for another classifier is
    refused with ModelMismatchError); `force=True` skips that check and records the
    skip in the graph's metadata.
    """
    _require_finite(vector)
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
    check_model(model, "the classifier graph")

    recorded = meta.get(f"{META_PREFIX}classifier_sha256")
    forced: dict[str, object] | None = None
    if force:
        forced = {
            "skipped": "classifier check (probe logits of the unfused graph vs the vector's fingerprint)",
            "vector_classifier_sha256": vector.classifier.weights_sha256,
            "graph_classifier_sha256": recorded,
            "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    else:
        if recorded is not None and recorded != vector.classifier.weights_sha256:
            raise ModelMismatchError(
                f"forget vector {vector.vector_id} was made for classifier {vector.classifier.short_id}, but the "
                f"graph records classifier {recorded[:12]} in its metadata"
            )
        check_vector_matches(model, vector, input_name=image.name, normalized_input=normalized_input, provider=provider)

    fused = _merge(model, vector, image, normalized_input)
    fused = with_metadata(
        fused,
        {
            f"{META_PREFIX}kind": "fused",
            f"{META_PREFIX}vector_id": vector.vector_id,
            f"{META_PREFIX}vector": _vector_json(vector),
            f"{META_PREFIX}image_input": image.name,
            f"{META_PREFIX}input_space": _input_space(normalized_input),
            f"{META_PREFIX}classifier_check": "skipped (forced)" if forced else "passed (probe logits)",
            **({f"{META_PREFIX}forced": forced} if forced else {}),
        },
    )
    check_model(fused, "the fused graph")
    if (graph_inputs(fused), graph_outputs(fused)) != (graph_inputs(model), graph_outputs(model)):
        raise OnnxGraphError("internal error: fusing changed the graph's inputs or outputs")
    return fused


def _input_space(normalized_input: NormalizedInput | None) -> dict[str, object]:
    if normalized_input is None:
        return {"space": "raw pixels in [0,1]"}
    mean, std = normalized_input
    return {"space": "normalised (x - mean) / std", "mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def _merge(
    model: onnx.ModelProto, vector: ForgetVector, image: ImageInput, normalized_input: NormalizedInput | None
) -> onnx.ModelProto:
    opset = default_opset(model)
    prefix = _free_prefix(model.graph)
    output = f"{prefix}image_fv"
    image_info = next(v for v in model.graph.input if v.name == image.name)
    step = helper.make_model(
        _perturbation_graph(vector, image_info, image.elem_type, output, prefix, opset, normalized_input),
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
    source: ForgetVector | BankSource | None,
    shape: tuple[int, int, int] | None = None,
    *,
    opset: int = DEFAULT_OPSET,
) -> onnx.ModelProto:
    """The forget step alone, `image` [N,C,H,W] float32 -> `image_fv`, for the Triton ensemble.

    `source` is a vector, a (bank, coefficients) pair, or None for the identity
    ("off") step, which needs `shape` = (C,H,W).

    Bank arithmetic happens here, at export: combine(bank, w) is baked into ONE
    initializer, so the step stays a single Add (+ clamp) whatever the bank size.
    Why not ship the bank and take w as an input or a second initializer: (1) a
    runtime input lets any caller pick w = 0 and bypass unlearning; (2) the bank
    (K vectors: 600 MB for 1000 classes at 3x224x224) would sit in server memory
    and be multiplied on every request; (3) changing w must be a published,
    versioned, auditable event anyway, and a new forget_step version (atomic,
    metadata naming the coefficients) is exactly that, with the classifier untouched.
    """
    if source is None:
        if shape is None:
            raise InvalidInputError("the identity (off) forget step needs the image shape (C, H, W)")
        vector: ForgetVector | None = None
        chw = tuple(int(s) for s in shape)
    else:
        vector = source if isinstance(source, ForgetVector) else vector_from_bank(*source, "coefficients")
        _require_finite(vector)
        chw = vector.delta.shape
        if shape is not None and tuple(shape) != chw:
            raise InvalidInputError(f"shape {list(shape)} differs from the vector's shape {list(chw)}")
    if len(chw) != 3 or min(chw) < 1:
        raise InvalidInputError(f"image shape must be (C, H, W) with positive sizes, got {list(chw)}")
    if opset < 11:
        raise InvalidInputError(f"the forget step is written for opset >= 11 (Clip with tensor bounds), got {opset}")
    image = helper.make_tensor_value_info(STEP_INPUT, TensorProto.FLOAT, ["batch", *chw])
    if vector is None:
        output = helper.make_tensor_value_info(STEP_OUTPUT, TensorProto.FLOAT, ["batch", *chw])
        graph = helper.make_graph(
            [helper.make_node("Identity", [STEP_INPUT], [STEP_OUTPUT], name="fv_off")],
            "forget_step_off",
            [image],
            [output],
        )
    else:
        graph = _perturbation_graph(vector, image, TensorProto.FLOAT, STEP_OUTPUT, "fv_", opset, None)
        graph.name = "forget_step"
    imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=imports,
        ir_version=helper.find_min_ir_version_for(imports),
        producer_name="fv-serving",
    )
    props: dict[str, object] = {f"{META_PREFIX}kind": "forget_step", f"{META_PREFIX}pixel_space": "raw pixels in [0,1]"}
    if vector is None:
        props[f"{META_PREFIX}vector_id"] = OFF_ID
        props[f"{META_PREFIX}vector"] = json.dumps({"vector_id": OFF_ID, "shape": list(chw)})
    else:
        props[f"{META_PREFIX}vector_id"] = vector.vector_id
        props[f"{META_PREFIX}vector"] = _vector_json(vector)
        props[f"{META_PREFIX}classifier_sha256"] = vector.classifier.weights_sha256
    model = with_metadata(model, props)
    check_model(model, "the forget step graph")
    return model
