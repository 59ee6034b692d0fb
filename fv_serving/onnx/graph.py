"""Reading, checking and writing ONNX graphs, and finding the image input a forget vector attaches to.

Every graph this package writes goes through `save_model`: the ONNX checker with
`full_check=True` (strict shape inference included), one self-contained file (no
external data, so Triton takes it as a plain `model.onnx`), written atomically.
`find_image_input` is the one place that decides which input of a foreign graph is
"the image": the forget vector has one fixed [C,H,W] shape, so only a float
[N,C,H,W] input with static C, H and W qualifies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from fv_serving.atomic import atomic_path
from fv_serving.errors import DataNotFoundError, OnnxGraphError

#: Element types an image input may have (the vector is stored in the same type).
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)
#: Protobuf refuses to serialise a message over 2 GiB; such graphs need external data.
MAX_PROTO_BYTES = 2**31 - 1
#: Prefix of every metadata_props key this project writes.
META_PREFIX = "fv_serving."
#: Default operator set of the graphs this project writes. The dynamo exporter of torch 2.14
#: implements opset >= 18 only; 18 loads in onnxruntime >= 1.14 (Triton containers >= 23.04).
DEFAULT_OPSET = 18

#: Tensor names of the standalone forget step (the Triton ensemble maps them).
STEP_INPUT = "image"
STEP_OUTPUT = "image_fv"
#: The extra output that names the vector in every answer: one string per batch item, shape [N, 1].
ID_OUTPUT = "vector_id"
#: Id recorded for the identity ("off") forget step.
OFF_ID = "off"

Dim = int | str  # a static size, or the symbolic name of a dynamic one ("?" when unnamed)


@dataclass(frozen=True)
class TensorInfo:
    """Name, element type and shape of one graph input or output."""

    name: str
    elem_type: int
    shape: tuple[Dim, ...]

    @property
    def dtype(self) -> str:
        """numpy-style type name ("float32"), or the ONNX name for types numpy lacks."""
        try:
            return str(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))
        except (KeyError, ValueError, TypeError):
            return TensorProto.DataType.Name(self.elem_type)

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ImageInput:
    """The chosen image input: static [C,H,W]; batch None when dynamic."""

    name: str
    elem_type: int
    chw: tuple[int, int, int]
    batch: int | None
    position: int  # index among the graph's (non-initializer) inputs


def _dim(d: onnx.TensorShapeProto.Dimension) -> Dim:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    return d.dim_param or "?"


def _info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    shape = tuple(_dim(d) for d in tensor.shape.dim) if tensor.HasField("shape") else ()
    return TensorInfo(value.name, int(tensor.elem_type), shape)


def graph_inputs(model: onnx.ModelProto) -> tuple[TensorInfo, ...]:
    """The inputs a caller feeds (initializers listed as inputs by old exporters are left out)."""
    initializers = {t.name for t in model.graph.initializer}
    return tuple(_info(v) for v in model.graph.input if v.name not in initializers)


def graph_outputs(model: onnx.ModelProto) -> tuple[TensorInfo, ...]:
    return tuple(_info(v) for v in model.graph.output)


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ("ai.onnx") operator set the graph imports."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise OnnxGraphError("graph imports no default ONNX operator set (opset_import has no '' domain)")


def _is_image_like(info: TensorInfo) -> bool:
    return info.elem_type in FLOAT_TYPES and len(info.shape) == 4


def find_image_input(model: onnx.ModelProto, name: str | None = None) -> ImageInput:
    """The float [N,C,H,W] input a forget vector is added to.

    With `name`, that input (it must be image-like). Without, the only image-like
    input; several candidates are refused rather than guessed between, and a dynamic
    C, H or W is refused because one vector has one fixed shape.
    """
    inputs = graph_inputs(model)
    listing = ", ".join(i.describe() for i in inputs) or "none"
    if name is not None:
        matches = [i for i in inputs if i.name == name]
        if not matches:
            raise OnnxGraphError(f"the graph has no input named {name!r}; its inputs are: {listing}")
        chosen = matches[0]
        if not _is_image_like(chosen):
            raise OnnxGraphError(
                f"input {chosen.describe()} is not an image input: expected a float tensor [N,C,H,W] "
                "(float32, float16 or double, rank 4)"
            )
    else:
        candidates = [i for i in inputs if _is_image_like(i)]
        if not candidates:
            raise OnnxGraphError(f"the graph has no float [N,C,H,W] image input; its inputs are: {listing}")
        if len(candidates) > 1:
            names = ", ".join(repr(c.name) for c in candidates)
            raise OnnxGraphError(
                f"the graph has several image-like inputs ({names}); say which one the vector is added to "
                "(input_name= / --input-name)"
            )
        chosen = candidates[0]
    batch, c, h, w = chosen.shape
    if not isinstance(c, int):
        raise OnnxGraphError(f"input {chosen.describe()} has a dynamic channel dim; a forget vector needs it static")
    if not isinstance(h, int) or not isinstance(w, int):
        raise OnnxGraphError(
            f"input {chosen.describe()} has a dynamic height or width; a forget vector has one fixed [C,H,W] "
            "shape, so export the graph with static H and W (only the batch dim may be dynamic)"
        )
    return ImageInput(
        name=chosen.name,
        elem_type=chosen.elem_type,
        chw=(c, h, w),
        batch=batch if isinstance(batch, int) else None,
        position=inputs.index(chosen),
    )


# -- metadata --------------------------------------------------------------------------------------


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def with_metadata(model: onnx.ModelProto, props: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy with `props` set (added or replaced); non-string values are stored as JSON."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    merged = metadata(model)
    merged.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in props.items()})
    onnx.helper.set_model_props(out, merged)
    return out


# -- checking and file I/O -----------------------------------------------------------------------------


def check_model(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker with full_check (strict shape inference); failures become OnnxGraphError."""
    if model.ByteSize() > MAX_PROTO_BYTES:
        raise OnnxGraphError(f"{what} is larger than 2 GiB; this tool writes self-contained graphs only")
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxGraphError(f"{what} fails the ONNX checker (full check): {first}") from exc


def load_model(path: str | Path, what: str = "ONNX graph") -> onnx.ModelProto:
    """Load a graph with its external data (if any) inlined, so it can be rewritten as one file."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{what} not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise OnnxGraphError(f"cannot read {what} {path}: {exc}") from exc


def save_model(model: onnx.ModelProto, path: str | Path, what: str = "ONNX graph") -> Path:
    """Check (full) and write one self-contained file atomically: nothing is left behind on failure."""
    check_model(model, what)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
    return Path(path)


@dataclass(frozen=True)
class GraphSummary:
    """What a written graph looks like and what was verified about it (printed by the CLI)."""

    path: Path | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    opset: int
    ir_version: int
    size_bytes: int
    verified: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: onnx.ModelProto, path: Path | None, verified: list[str]) -> GraphSummary:
        return cls(
            path=path,
            inputs=graph_inputs(model),
            outputs=graph_outputs(model),
            opset=default_opset(model),
            ir_version=int(model.ir_version),
            size_bytes=path.stat().st_size if path is not None else model.ByteSize(),
            verified=tuple(verified),
            metadata=metadata(model),
        )

    def lines(self) -> list[str]:
        size = f"{self.size_bytes / 1e6:.2f} MB" if self.size_bytes >= 1e5 else f"{self.size_bytes / 1e3:.1f} kB"
        out = [f"wrote {self.path} ({size}, opset {self.opset}, IR {self.ir_version})"]
        out += [f"  input  {i.describe()}" for i in self.inputs]
        out += [f"  output {o.describe()}" for o in self.outputs]
        out += [f"  verified: {v}" for v in self.verified]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else None,
            "inputs": [i.to_json() for i in self.inputs],
            "outputs": [o.to_json() for o in self.outputs],
            "opset": self.opset,
            "ir_version": self.ir_version,
            "size_bytes": self.size_bytes,
            "verified": list(self.verified),
        }
