"""Helpers for tests that run a real tritonserver: tiny ONNX graphs and server fixtures.

The graphs mimic the project's real ones at MNIST scale so a server starts in
seconds on two cores: a classifier `image [N,1,28,28] -> Flatten -> MatMul -> logits
[N,10]`, a forget step `image -> sanitise -> Add(delta) -> image_fv` that also answers
`vector_id` (STRING [N,1]), and its fused form (logits and vector_id). They are written
by hand, node by node, so that they are a reference independent of the project's own
graph surgery (`fv_serving.onnx.fuse`); their semantics are those of
`fv_serving.perturbation.apply_delta` (NaN -> 0, clip to [0,1], then + delta).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fv_serving.triton.server import TritonServer

IMAGE_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
OPSET = 17
ID_OUTPUT = "vector_id"


def classifier_onnx(seed: int = 0) -> onnx.ModelProto:
    """`image` float32 [N,1,28,28] -> Flatten -> MatMul(W) -> `logits` [N,10]."""
    weight = np.random.default_rng(seed).normal(size=(784, NUM_CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "classifier",
        [_image("image")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _model(graph)


def delta_id(delta: np.ndarray) -> str:
    """The vector id the hand-made graphs of `delta` answer by default (a content digest, like real ids)."""
    return hashlib.sha256(np.asarray(delta, np.float32).tobytes()).hexdigest()[:16]


def forget_step_onnx(delta: np.ndarray, vector_id: str | None = None) -> onnx.ModelProto:
    """`image` -> sanitise -> Add(delta [1,28,28]) -> `image_fv`; and `vector_id` [N,1] (default `delta_id`)."""
    nodes, tensors = _perturbation_nodes("image", "image_fv", delta)
    id_nodes, id_tensors = _id_nodes("image", vector_id or delta_id(delta))
    graph = helper.make_graph(
        [*nodes, *id_nodes],
        "forget_step",
        [_image("image")],
        [_image("image_fv"), _id_info()],
        [*tensors, *id_tensors],
    )
    return _model(graph)


def fused_onnx(delta: np.ndarray, seed: int = 0, vector_id: str | None = None) -> onnx.ModelProto:
    """classifier(sanitise(image) + delta) as one graph: the classifier's IO plus `vector_id`."""
    classifier = classifier_onnx(seed)
    nodes, tensors = _perturbation_nodes("image", "image_fv", delta)
    id_nodes, id_tensors = _id_nodes("image", vector_id or delta_id(delta))
    graph = helper.make_graph(
        [
            *nodes,
            helper.make_node("Flatten", ["image_fv"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
            *id_nodes,
        ],
        "fused",
        list(classifier.graph.input),
        [*classifier.graph.output, _id_info()],
        [*tensors, *classifier.graph.initializer, *id_tensors],
    )
    return _model(graph)


def random_delta(seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=IMAGE_SHAPE) * scale).astype(np.float32)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE_SHAPE), dtype=np.float32)


def hostile_images(n: int, seed: int = 0) -> np.ndarray:
    """Images with NaN, +-Inf and pixels outside [0,1]: what the sanitising step must neutralise."""
    x = random_images(n, seed) * 3.0 - 1.0  # about a third below 0, a third above 1
    x[:, 0, 0, :4] = [np.nan, np.inf, -np.inf, -5.0]
    return x


def onnx_outputs(model: onnx.ModelProto, **feeds: np.ndarray) -> list[np.ndarray]:
    """Every output of `model` run by onnxruntime on CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [np.asarray(out) for out in session.run(None, feeds)]


def run_onnx(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    """The first output of `model` run by onnxruntime on CPU: the reference for server answers."""
    return onnx_outputs(model, **feeds)[0]


def server_fixture(
    build: Callable[[Path], Path],
    load_models: Sequence[str] | None = None,
    scope: Any = "module",
    **server_kwargs: Any,
) -> Any:
    """A pytest fixture that builds a repository with `build(tmp_dir)` and runs one server on it.

    One server per scope keeps suites fast: starting one costs seconds. The server
    locks model control behind a fresh key unless `admin_key=None` is passed:
    `server.client()` (or `TritonClient(url, admin_key=server.admin_key)`) carries it.
    """

    @pytest.fixture(scope=scope)
    def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
        repository = build(tmp_path_factory.mktemp("triton-repo"))
        with TritonServer(repository, load_models, **server_kwargs) as server:
            yield server

    return _server


# -- graph pieces -------------------------------------------------------------------------------------


def _image(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *IMAGE_SHAPE])


def _id_info() -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(ID_OUTPUT, TensorProto.STRING, ["N", 1])


def _perturbation_nodes(
    image: str, output: str, delta: np.ndarray
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """NaN -> 0, clip to [0,1], + delta: apply_delta's definition, written out."""
    nodes = [
        helper.make_node("IsNaN", [image], ["t_is_nan"]),
        helper.make_node("Where", ["t_is_nan", "t_zero", image], ["t_no_nan"]),
        helper.make_node("Clip", ["t_no_nan", "t_zero", "t_one"], ["t_sanitised"]),
        helper.make_node("Add", ["t_sanitised", "t_delta"], [output]),
    ]
    tensors = [
        numpy_helper.from_array(np.array(0.0, np.float32), "t_zero"),
        numpy_helper.from_array(np.array(1.0, np.float32), "t_one"),
        numpy_helper.from_array(np.asarray(delta, np.float32), "t_delta"),
    ]
    return nodes, tensors


def _id_nodes(image: str, vector_id: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """`vector_id` STRING [N,1]: Shape(image)[:1] ++ [1] -> Expand of a [1,1] string constant."""
    nodes = [
        helper.make_node("Shape", [image], ["t_batch"], start=0, end=1),
        helper.make_node("Concat", ["t_batch", "t_one_i64"], ["t_id_shape"], axis=0),
        helper.make_node("Expand", ["t_id", "t_id_shape"], [ID_OUTPUT]),
    ]
    tensors = [
        helper.make_tensor("t_id", TensorProto.STRING, [1, 1], [vector_id.encode()]),
        numpy_helper.from_array(np.array([1], np.int64), "t_one_i64"),
    ]
    return nodes, tensors


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    onnx.checker.check_model(model, full_check=True)
    return model


def triton_available() -> bool:
    """A tritonserver on PATH / in /opt, or nvidia-pytriton's bundled one."""
    import importlib.util
    import os
    import shutil

    return bool(
        shutil.which("tritonserver")
        or os.access("/opt/tritonserver/bin/tritonserver", os.X_OK)
        or importlib.util.find_spec("pytriton")
    )


requires_triton = pytest.mark.skipif(not triton_available(), reason="no tritonserver and no nvidia-pytriton")
