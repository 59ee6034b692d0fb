"""Helpers for tests that run a real tritonserver: tiny ONNX graphs and server fixtures.

The graphs mimic the project's real ones at MNIST scale so a server starts in
seconds on two cores: a classifier `image [N,1,28,28] -> Flatten -> MatMul -> logits
[N,10]`, a forget step `image -> Add(delta) -> image_fv` and its fused form.
"""

from __future__ import annotations

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


def classifier_onnx(seed: int = 0) -> onnx.ModelProto:
    """`image` float32 [N,1,28,28] -> Flatten -> MatMul(W) -> `logits` [N,10]."""
    weight = np.random.default_rng(seed).normal(size=(784, NUM_CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["image"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", NUM_CLASSES])],
        [numpy_helper.from_array(weight, "W")],
    )
    return _model(graph)


def forget_step_onnx(delta: np.ndarray) -> onnx.ModelProto:
    """`image` -> Add(delta [1,28,28]) -> `image_fv`."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["image", "delta"], ["image_fv"])],
        "forget_step",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        [helper.make_tensor_value_info("image_fv", TensorProto.FLOAT, ["N", *IMAGE_SHAPE])],
        [numpy_helper.from_array(delta.astype(np.float32), "delta")],
    )
    return _model(graph)


def fused_onnx(delta: np.ndarray, seed: int = 0) -> onnx.ModelProto:
    """classifier(image + delta) as one graph, same IO as the classifier."""
    classifier = classifier_onnx(seed)
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["image", "delta"], ["image_fv"]),
            helper.make_node("Flatten", ["image_fv"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        "fused",
        list(classifier.graph.input),
        list(classifier.graph.output),
        [numpy_helper.from_array(delta.astype(np.float32), "delta"), *classifier.graph.initializer],
    )
    return _model(graph)


def random_delta(seed: int, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=IMAGE_SHAPE) * scale).astype(np.float32)


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *IMAGE_SHAPE), dtype=np.float32)


def run_onnx(model: onnx.ModelProto, **feeds: np.ndarray) -> np.ndarray:
    """The first output of `model` run by onnxruntime on CPU: the reference for server answers."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def server_fixture(
    build: Callable[[Path], Path],
    load_models: Sequence[str] | None = None,
    scope: Any = "module",
    **server_kwargs: Any,
) -> Any:
    """A pytest fixture that builds a repository with `build(tmp_dir)` and runs one server on it.

    One server per scope keeps suites fast: starting one costs seconds.
    """

    @pytest.fixture(scope=scope)
    def _server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
        repository = build(tmp_path_factory.mktemp("triton-repo"))
        with TritonServer(repository, load_models, **server_kwargs) as server:
            yield server

    return _server


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    onnx.checker.check_model(model)
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
