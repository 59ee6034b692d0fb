"""ONNX side of fv-serving: export the classifier, fuse a forget vector into a graph, build forget steps.

    export.py   PyTorch classifier -> self-contained ONNX file (raw pixels in, logits out)
    graph.py    inspection (which input is the image), checker, atomic single-file I/O
    fuse.py     pure graph surgery: fused graph (vector baked into a classifier) and forget-step graph
    gated.py    pure graph surgery: the gated fused graph (delta only where a forgotten class is predicted)
    checked.py  the same graphs with admission, classifier check, checker, parity and provenance
    runtime.py  onnxruntime sessions (cpu/cuda), classifier check, parity checks
    gate_check.py  the gated mode's definition in numpy, and parity of gated graphs in onnxruntime
    identity.py    the fingerprint of a classifier that exists only as an ONNX graph

A user with their own ONNX classifier and a vector file needs only graph.py, fuse.py,
checked.py and runtime.py, which this package re-exports and which do not import PyTorch;
`fv_serving.onnx.export` (PyTorch -> ONNX) is imported explicitly by those who export.
"""

from fv_serving.onnx.checked import CheckedGraph, forget_step, fuse_gated_vector, fuse_vector
from fv_serving.onnx.fuse import forget_step_graph, fuse_graph
from fv_serving.onnx.gated import gated_graph
from fv_serving.onnx.graph import (
    DEFAULT_OPSET,
    ImageInput,
    TensorInfo,
    check_model,
    find_image_input,
    graph_inputs,
    graph_outputs,
    load_model,
    metadata,
    save_model,
)
from fv_serving.onnx.runtime import (
    check_vector_matches,
    make_session,
    providers_for,
    verify_forget_step,
    verify_fused,
)

__all__ = [
    "DEFAULT_OPSET",
    "CheckedGraph",
    "ImageInput",
    "TensorInfo",
    "check_model",
    "check_vector_matches",
    "find_image_input",
    "forget_step",
    "forget_step_graph",
    "fuse_gated_vector",
    "fuse_graph",
    "fuse_vector",
    "gated_graph",
    "graph_inputs",
    "graph_outputs",
    "load_model",
    "make_session",
    "metadata",
    "providers_for",
    "save_model",
    "verify_forget_step",
    "verify_fused",
]
