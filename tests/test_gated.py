"""The gated fused graph (fv_serving/onnx/gated.py) against PyTorch's gated mode (fv_serving/gating.py).

On real Fashion-MNIST test images with the session's tiny classifier and its Trouser
vector; with a hand-made classifier whose logits carry the batch size, which shows
from the answers themselves that the second pass ran on the gated rows only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from fv_serving.cli.main import main
from fv_serving.data import Dataset, to_numpy_images
from fv_serving.errors import InvalidInputError, OnnxGraphError
from fv_serving.fingerprint import ClassifierFingerprint, probe_batch
from fv_serving.gating import GatedPerturbedClassifier
from fv_serving.onnx import load_model, metadata
from fv_serving.onnx.checked import fuse_gated_vector
from fv_serving.onnx.export import classifier_to_onnx
from fv_serving.onnx.gated import gate_classes, gated_graph, gated_vector_id
from fv_serving.pipeline import Workspace
from fv_serving.vectors import ForgetVector


def run(model: onnx.ModelProto, x: np.ndarray, name: str = "image") -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, {name: np.ascontiguousarray(x, np.float32)})]


def torch_gated(workspace: Workspace, vector: ForgetVector, classes: tuple[int, ...], x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        gated = GatedPerturbedClassifier(workspace.model, torch.from_numpy(vector.delta), classes, vector.clamp)
        return gated(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def images(fmnist: Dataset) -> np.ndarray:
    return to_numpy_images(fmnist.test, torch.arange(0, 3000, 10))  # 300 real test images, all classes


@pytest.fixture(scope="module")
def classifier(tiny_workspace: Workspace) -> onnx.ModelProto:
    return classifier_to_onnx(tiny_workspace.model)


@pytest.mark.parametrize("classes", [None, (1, 7, 8)])
def test_gated_graph_equals_the_pytorch_gated_mode(
    classifier: onnx.ModelProto,
    tiny_workspace: Workspace,
    class_vector: tuple[ForgetVector, Path],
    images: np.ndarray,
    classes: tuple[int, ...] | None,
) -> None:
    vector = class_vector[0]
    gate = classes or gate_classes(vector)
    built = fuse_gated_vector(classifier, vector, classes=classes, id_output=True)
    logits, ids = run(built.graph, images)
    expected = torch_gated(tiny_workspace, vector, gate, images)
    assert float(np.max(np.abs(logits - expected))) <= 1e-4
    assert np.array_equal(logits.argmax(1), expected.argmax(1))
    plain = run(classifier, images)[0]
    gated_rows = np.isin(plain.argmax(1), gate)
    assert 0 < gated_rows.sum() < len(images)  # both sides of the gate are exercised
    assert np.array_equal(logits[~gated_rows], plain[~gated_rows])  # the others keep the original's answers exactly
    assert float(np.max(np.abs(logits[gated_rows] - plain[gated_rows]))) > 0.5
    assert set(ids.ravel()) == {gated_vector_id(vector)} and ids.shape == (len(images), 1)
    for batch in (images[gated_rows][:1], images[~gated_rows][:5], images[gated_rows][:5]):  # 1, none, all gated
        assert (
            float(np.max(np.abs(run(built.graph, batch)[0] - torch_gated(tiny_workspace, vector, gate, batch)))) <= 1e-4
        )


def test_gated_graph_records_the_gate_and_shares_the_weights(
    classifier: onnx.ModelProto, class_vector: tuple[ForgetVector, Path]
) -> None:
    vector = class_vector[0]
    gated = fuse_gated_vector(classifier, vector).graph
    meta = metadata(gated)
    assert json.loads(meta["fv_serving.gate"])["forgotten_classes"] == [1]
    assert meta["fv_serving.kind"] == "fused_gated" and meta["fv_serving.vector_id"] == gated_vector_id(vector)
    extra = gated.ByteSize() - classifier.ByteSize()
    assert extra < vector.delta.nbytes + 40_000  # delta and a few small constants: no second copy of the weights
    weights = {t.name for t in classifier.graph.initializer}
    layers = [n for n in classifier.graph.node if n.op_type in ("Conv", "Gemm")]
    second_pass = [n for n in gated.graph.node if n.op_type in ("Conv", "Gemm") and n.name.startswith("fv_pass2_")]
    assert len(second_pass) == len(layers) and all(n.input[1] in weights for n in second_pass)  # the same weights
    assert not any(n.op_type == "If" for n in gated.graph.node)  # this graph runs an empty second pass: no guard
    assert json.loads(meta["fv_serving.gate"])["guarded"] is False


def batch_counting_classifier(empty_batch: bool = True) -> onnx.ModelProto:
    """logits = flatten(x) @ W + (batch size) on every class: answers tell which batch computed them.

    `empty_batch=False` flattens with Reshape(x, [0, -1]), which onnxruntime refuses on an empty batch.
    """
    w = np.zeros((4, 3), np.float32)
    w[0, 0] = w[1, 1] = w[2, 2] = 10.0
    flatten = helper.make_node("Flatten", ["image"], ["flat"])
    if not empty_batch:
        flatten = helper.make_node("Reshape", ["image", "copy_batch"], ["flat"])
    nodes = [
        flatten,
        helper.make_node("MatMul", ["flat", "w"], ["scores"]),
        helper.make_node("Shape", ["image"], ["shape"], start=0, end=1),
        helper.make_node("Cast", ["shape"], ["batch"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["scores", "batch"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "counting",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0, -1], np.int64), "copy_batch")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("empty_batch", [True, False])
def test_the_second_pass_runs_on_the_gated_rows_only(empty_batch: bool) -> None:
    """Both forms: the second pass on the gathered rows, and inside If when the graph cannot take an empty batch."""
    model = batch_counting_classifier(empty_batch)
    fingerprint = ClassifierFingerprint("counting", (1, 2, 2), 3, run(model, probe_batch((1, 2, 2)))[0])
    vector = ForgetVector(
        classifier=fingerprint, delta=np.full((1, 2, 2), 0.01, np.float32), forget={"kind": "class", "classes": [2]}
    )
    x = np.zeros((6, 1, 2, 2), np.float32)
    x[[1, 4], 0, 1, 0] = 1.0  # pixel 2 bright: class 2, the forgotten one, for rows 1 and 4
    x[[0, 2, 3, 5], 0, 0, 0] = 1.0
    built = fuse_gated_vector(model, vector).graph  # the checked form: it picks the guard where it is needed
    assert any(n.op_type == "If" for n in built.graph.node) == (not empty_batch)
    logits = run(built, x)[0]
    offsets = logits - run(model, x + 0.01)[0] + 6.0  # the batch size each row was computed in
    assert np.allclose(offsets[[1, 4]], 2.0) and np.allclose(logits[[0, 2, 3, 5]], run(model, x)[0][[0, 2, 3, 5]])
    none_gated = x[[0, 2, 3]]
    assert np.allclose(run(built, none_gated)[0], run(model, none_gated)[0])


def test_gated_cli(
    classifier: onnx.ModelProto,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx.save(classifier, str(tmp_path / "clf.onnx"))
    args = [
        "export",
        "fused",
        "--onnx",
        str(tmp_path / "clf.onnx"),
        "--vector",
        str(class_vector[1]),
        "--out",
        str(tmp_path / "g.onnx"),
    ]
    assert main([*args, "--gated"]) == 0
    printed = capsys.readouterr().out
    assert "gated(x) == the gated mode" in printed and "where the classifier predicts a forgotten class" in printed
    assert metadata(load_model(tmp_path / "g.onnx"))["fv_serving.kind"] == "fused_gated"


def test_hostile_inputs_are_sanitised_in_both_passes(
    classifier: onnx.ModelProto, class_vector: tuple[ForgetVector, Path]
) -> None:
    x = probe_batch((1, 28, 28)) * 3 - 1
    x[:, 0, 0, :3] = [np.nan, np.inf, -np.inf]
    gated = fuse_gated_vector(
        classifier, class_vector[0], classes=tuple(range(10))
    ).graph  # every row through both passes
    logits = run(gated, x)[0]
    assert np.all(np.isfinite(logits))
    assert np.allclose(logits, run(gated, np.clip(np.nan_to_num(x, nan=0, posinf=1, neginf=0), 0, 1))[0])


def test_refusals(classifier: onnx.ModelProto, class_vector: tuple[ForgetVector, Path]) -> None:
    vector = class_vector[0]
    random = ForgetVector(classifier=vector.classifier, delta=vector.delta, forget={"kind": "random", "percent": 10})
    with pytest.raises(InvalidInputError, match="class-wise"):
        fuse_gated_vector(classifier, random)
    with pytest.raises(InvalidInputError, match=r"subset of 0\.\.9"):
        gated_graph(classifier, vector, (12,))
    static = onnx.ModelProto()
    static.CopyFrom(classifier)
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    with pytest.raises(OnnxGraphError, match="static batch"):
        gated_graph(static, vector)
    with pytest.raises(OnnxGraphError, match="already carries"):
        gated_graph(gated_graph(classifier, vector), vector)
