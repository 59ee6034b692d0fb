"""Fused graphs: classifier(clamp(x + delta)) as one drop-in ONNX graph, and every refusal.

Checked in onnxruntime on real Fashion-MNIST test images, on graphs this project
exported, on graphs built by hand with onnx.helper (3 channels, normalised input,
static batch, old opset) and on a torchvision ResNet-18 exported with other settings
(TorchScript exporter, opset 17, input "input", normalisation outside the graph).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fv_serving.cli.main import main
from fv_serving.data import Dataset, to_numpy_images
from fv_serving.errors import InvalidInputError, ModelMismatchError, OnnxGraphError
from fv_serving.fingerprint import ClassifierFingerprint, probe_batch
from fv_serving.models import Normalize, PerturbedClassifier, freeze, load_classifier
from fv_serving.onnx import (
    find_image_input,
    fuse_vector,
    graph_inputs,
    graph_outputs,
    load_model,
    metadata,
    save_model,
)
from fv_serving.onnx.export import classifier_to_onnx, export_classifier
from fv_serving.perturbation import apply_delta
from fv_serving.pipeline import Workspace
from fv_serving.vectors import ForgetVector, save_vector

MEAN3, STD3 = (0.2, 0.5, 0.7), (0.3, 0.25, 0.4)


def ort_run(model: onnx.ModelProto | Path, **feeds: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()})[0])


def perturbed(x: np.ndarray, vector: ForgetVector) -> np.ndarray:
    return apply_delta(torch.from_numpy(x), torch.from_numpy(vector.delta), vector.clamp).numpy()


def normalize(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    m, s = np.array(mean).reshape(1, -1, 1, 1), np.array(std).reshape(1, -1, 1, 1)
    return ((x - m) / s).astype(np.float32)


def with_clamp(vector: ForgetVector, clamp: tuple[float, float] | None) -> ForgetVector:
    return ForgetVector(classifier=vector.classifier, delta=vector.delta, clamp=clamp)


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(fmnist: Dataset) -> np.ndarray:
    return to_numpy_images(fmnist.test, torch.arange(0, 2000, 10))  # 200 real test images, all classes


@pytest.fixture(scope="module")
def images3(images: np.ndarray) -> np.ndarray:
    """Real images as 3 distinct channels (x, 1 - x, x^2), all in [0,1]."""
    return np.concatenate([images, 1.0 - images, images**2], axis=1)


@pytest.fixture(scope="module")
def classifier_onnx(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuse") / "classifier.onnx"
    export_classifier(tiny_workspace.model, path)
    return path


@pytest.fixture(scope="module")
def other_onnx(other_classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A different classifier (same architecture, other seed), exported with the legacy exporter."""
    model = classifier_to_onnx(load_classifier(other_classifier_path).model, opset=17, exporter="legacy")
    return save_model(model, tmp_path_factory.mktemp("other") / "other.onnx")


def linear_graph(
    channels: int = 3,
    *,
    dims: tuple[str | int, ...] = ("N", 3, 28, 28),
    input_name: str = "pixels",
    extra_image_input: str | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    """A classifier written by hand: input -> Flatten -> MatMul -> Add -> Relu -> MatMul -> `scores`.

    With `extra_image_input`, a second image-like input (listed FIRST) is scaled and added to the image.
    """
    rng = np.random.default_rng(7)
    n_in = channels * 28 * 28
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.05, (n_in, 64)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (64,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (64, 10)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["scores"]),
    ]
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(dims))]
    if extra_image_input is None:
        nodes.insert(0, helper.make_node("Identity", [input_name], ["x"]))
    else:
        weights.append(numpy_helper.from_array(np.array(0.5, np.float32), "half"))
        nodes[:0] = [
            helper.make_node("Mul", [extra_image_input, "half"], ["scaled"]),
            helper.make_node("Add", [input_name, "scaled"], ["x"]),
        ]
        inputs.insert(0, helper.make_tensor_value_info(extra_image_input, TensorProto.FLOAT, list(dims)))
    graph = helper.make_graph(
        nodes, "hand_made", inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [dims[0], 10])], weights
    )
    imports = [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=imports, ir_version=helper.find_min_ir_version_for(imports))


def foreign_vector(
    model: onnx.ModelProto,
    shape: tuple[int, int, int],
    normalized: tuple[tuple[float, ...], tuple[float, ...]] | None,
    clamp: tuple[float, float] | None,
    input_name: str,
) -> ForgetVector:
    """A vector for a graph we did not export: its fingerprint is the graph's own probe logits."""
    probe = probe_batch(shape)
    x = probe if normalized is None else normalize(probe, *normalized)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(None, {input_name: x[i : i + 1]})[0] for i in range(len(x))])
    digest = hashlib.sha256(model.SerializeToString()).hexdigest()
    fingerprint = ClassifierFingerprint(digest, shape, 10, logits.astype(np.float32))
    delta = np.random.default_rng(3).normal(0, 0.3, shape).astype(np.float32)
    return ForgetVector(classifier=fingerprint, delta=delta, clamp=clamp)


# -- our own classifier graph -------------------------------------------------------------------------------


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_fused_equals_classifier_of_perturbed_input(
    classifier_onnx: Path,
    tiny_workspace: Workspace,
    class_vector: tuple[ForgetVector, Path],
    images: np.ndarray,
    clamp: tuple[float, float] | None,
) -> None:
    vector = with_clamp(class_vector[0], clamp)
    original = load_model(classifier_onnx)
    fused = fuse_vector(original, vector).graph
    actual = ort_run(fused, image=images)
    expected = ort_run(original, image=perturbed(images, vector))
    assert float(np.max(np.abs(actual - expected))) <= 1e-5
    with torch.no_grad():
        torch_logits = PerturbedClassifier(tiny_workspace.model, torch.from_numpy(vector.delta), clamp)(
            torch.from_numpy(images)
        ).numpy()
    assert float(np.max(np.abs(actual - torch_logits))) <= 1e-4
    assert float(np.max(np.abs(actual - ort_run(original, image=images)))) > 0.5  # the vector changes the logits
    if clamp is not None:
        unclamped = ort_run(fuse_vector(original, with_clamp(vector, None)).graph, image=images)
        assert float(np.max(np.abs(actual - unclamped))) > 1e-3  # the clamp is in the graph and bites


def test_fused_graph_is_a_drop_in_replacement(
    classifier_onnx: Path, class_vector: tuple[ForgetVector, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector, vector_path = class_vector
    out = tmp_path / "fused.onnx"
    assert (
        main(["export", "fused", "--onnx", str(classifier_onnx), "--vector", str(vector_path), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "input  image float32 [batch,1,28,28]" in printed and "output logits float32 [batch,10]" in printed
    assert "classifier check: the classifier graph reproduces" in printed and "fused(x) == original" in printed
    onnx.checker.check_model(str(out), full_check=True)
    original, fused = load_model(classifier_onnx), load_model(out)
    assert graph_inputs(fused) == graph_inputs(original) and graph_outputs(fused) == graph_outputs(original)
    first = fused.graph.node[0]  # the image is sanitised first: NaN -> 0, clipped to [0,1] (perturbation.py)
    assert first.op_type == "IsNaN" and first.input[0] == "image"
    add = next(n for n in fused.graph.node if n.op_type == "Add" and n.input[1].endswith("delta"))
    delta = next(t for t in fused.graph.initializer if t.name == add.input[1])
    np.testing.assert_array_equal(numpy_helper.to_array(delta), vector.delta[None])
    meta = metadata(fused)
    assert meta["fv_serving.vector_id"] == vector.vector_id
    assert json.loads(meta["fv_serving.vector"]) == json.loads(json.dumps(vector.describe()))
    assert meta["fv_serving.classifier_check"].startswith("passed") and "fv_serving.forced" not in meta
    assert meta["fv_serving.classifier_sha256"] == vector.classifier.weights_sha256  # kept from the classifier


# -- graphs this project did not export -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("normalized", "batch", "clamp", "opset"),
    [
        (False, "N", None, 17),
        (False, 1, (0.0, 1.0), 17),  # static batch of 1: checks run image by image
        (False, "N", (0.0, 1.0), 10),  # old opset: Clip without tensor bounds -> Max/Min
        (True, "N", None, 17),
        (True, "N", (0.0, 1.0), 17),  # per-channel bounds in normalised space
    ],
)
def test_fuse_hand_made_graph(
    images3: np.ndarray,
    normalized: bool,
    batch: str | int,
    clamp: tuple[float, float] | None,
    opset: int,
) -> None:
    model = linear_graph(dims=(batch, 3, 28, 28), opset=opset)
    norm = (MEAN3, STD3) if normalized else None
    vector = foreign_vector(model, (3, 28, 28), norm, clamp, "pixels")
    fused = fuse_vector(model, vector, normalized_input=norm).graph
    onnx.checker.check_model(fused, full_check=True)
    assert graph_inputs(fused) == graph_inputs(model) and graph_outputs(fused) == graph_outputs(model)
    x = images3[:40] if batch == "N" else images3[:1]
    feed = normalize(x, MEAN3, STD3) if normalized else x
    expected_input = perturbed(x, vector)
    if normalized:
        expected_input = normalize(expected_input, MEAN3, STD3)  # graph((clamp(x + delta) - mean) / std)
    actual, expected = ort_run(fused, pixels=feed), ort_run(model, pixels=expected_input)
    assert float(np.max(np.abs(actual - expected))) <= 1e-5
    assert float(np.max(np.abs(actual - ort_run(model, pixels=feed)))) > 0.1
    if clamp is not None:
        assert np.any(x + vector.delta > 1.0) and np.any(x + vector.delta < 0.0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
def test_fuse_torchvision_model_exported_with_other_settings(
    fmnist: Dataset, class_vector: tuple[ForgetVector, Path], images: np.ndarray, tmp_path: Path
) -> None:
    """ResNet-18 (torchvision), TorchScript exporter, opset 17, input "input", normalised input."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    freeze(net)
    path = tmp_path / "resnet.onnx"
    torch.onnx.export(
        net,
        (torch.zeros(2, 1, 28, 28),),
        str(path),
        dynamo=False,
        input_names=["input"],
        output_names=["output"],
        opset_version=17,
        dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
    )
    in_pixels = freeze(nn.Sequential(Normalize(fmnist.mean, fmnist.std), net))
    vector = ForgetVector(
        classifier=ClassifierFingerprint.of(in_pixels, (1, 28, 28), 10), delta=class_vector[0].delta, clamp=(0.0, 1.0)
    )
    original = load_model(path)
    fused = fuse_vector(original, vector, normalized_input=(fmnist.mean, fmnist.std)).graph
    onnx.checker.check_model(fused, full_check=True)
    x = images[:64]
    actual = ort_run(fused, input=normalize(x, fmnist.mean, fmnist.std))
    expected = ort_run(original, input=normalize(perturbed(x, vector), fmnist.mean, fmnist.std))
    assert float(np.max(np.abs(actual - expected))) <= 1e-5
    with torch.no_grad():
        torch_logits = in_pixels(apply_delta(torch.from_numpy(x), torch.from_numpy(vector.delta), (0.0, 1.0)))
    assert float(np.max(np.abs(actual - torch_logits.numpy()))) <= 1e-4
    with pytest.raises(ModelMismatchError, match="mean/std"):  # wrong normalisation: the check notices
        fuse_vector(original, vector, normalized_input=((0.5,), (0.5,)))


def test_named_image_input_among_several(images3: np.ndarray) -> None:
    """Two image-like inputs: refused without a name; with one (and force), the order of inputs is kept."""
    model = linear_graph(extra_image_input="mask")
    vector = foreign_vector(linear_graph(), (3, 28, 28), None, None, "pixels")
    with pytest.raises(OnnxGraphError, match="several image-like inputs"):
        fuse_vector(model, vector)
    with pytest.raises(OnnxGraphError, match="also needs"):  # the check can only feed the image
        fuse_vector(model, vector, input_name="pixels")
    fused = fuse_vector(model, vector, input_name="pixels", force=True).graph
    assert [i.name for i in fused.graph.input] == ["mask", "pixels"]
    x, mask = images3[:16], images3[16:32]
    np.testing.assert_allclose(
        ort_run(fused, pixels=x, mask=mask), ort_run(model, pixels=x + vector.delta, mask=mask), atol=1e-5
    )
    assert find_image_input(fused, "pixels").chw == (3, 28, 28)


# -- refusals -----------------------------------------------------------------------------------------------------


def test_force_skips_the_check_and_records_it(
    other_onnx: Path, class_vector: tuple[ForgetVector, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    vector, vector_path = class_vector
    out = tmp_path / "forced.onnx"
    argv = ["export", "fused", "--onnx", str(other_onnx), "--vector", str(vector_path), "--out", str(out), "--force"]
    assert main(argv) == 0
    assert "classifier check SKIPPED" in capsys.readouterr().out
    onnx.checker.check_model(str(out), full_check=True)
    meta = metadata(load_model(out))
    forced = json.loads(meta["fv_serving.forced"])
    assert forced["vector_classifier_sha256"] == vector.classifier.weights_sha256
    assert forced["graph_classifier_sha256"] == metadata(load_model(other_onnx))["fv_serving.classifier_sha256"]
    assert meta["fv_serving.classifier_check"] == "skipped (forced)"


def test_refusals_leave_no_output_file(
    classifier_onnx: Path,
    other_onnx: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vector, vector_path = class_vector
    graphs = tmp_path / "graphs"
    anonymous = onnx.load(str(other_onnx))  # the other classifier without our metadata: only behaviour tells
    del anonymous.metadata_props[:]
    save_model(anonymous, graphs / "anonymous.onnx")
    save_model(linear_graph(), graphs / "three_channels.onnx")
    save_model(linear_graph(channels=1, dims=("N", 1, "H", "W")), graphs / "dynamic_hw.onnx")
    save_model(linear_graph(channels=1, dims=("N", 1, 28, 28), extra_image_input="mask"), graphs / "two_inputs.onnx")
    save_model(fuse_vector(load_model(classifier_onnx), vector).graph, graphs / "fused.onnx")
    nan_vector = with_clamp(vector, None)
    nan_vector.delta = nan_vector.delta.copy()
    nan_vector.delta[0, 5, 5] = np.nan
    save_vector(nan_vector, graphs / "nan.safetensors")
    clf, vec = str(classifier_onnx), str(vector_path)
    cases = {
        "has shape [1, 28, 28], but input 'pixels' takes [N,3,28,28]": [str(graphs / "three_channels.onnx"), vec],
        "dynamic height or width": [str(graphs / "dynamic_hw.onnx"), vec],
        "several image-like inputs": [str(graphs / "two_inputs.onnx"), vec],
        "records classifier": [str(other_onnx), vec],
        "probe images differ": [str(graphs / "anonymous.onnx"), vec],
        "no input named 'img'": [clf, vec, "--input-name", "img"],
        "non-finite": [clf, str(graphs / "nan.safetensors")],
        "already carries forget vector": [str(graphs / "fused.onnx"), vec],
        "one mean and one std per channel": [clf, vec, "--normalized-input", "--mean", "0.1", "0.2", "--std", "1", "1"],
        "only used with --normalized-input": [clf, vec, "--mean", "0.5"],
        "not found": [str(graphs / "missing.onnx"), vec],
    }
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases["install onnxruntime-gpu"] = [clf, vec, "--provider", "cuda"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "fused.onnx"
    for message, (graph, vector_file, *extra) in cases.items():
        argv = ["export", "fused", "--onnx", graph, "--vector", vector_file, "--out", str(out), *extra]
        assert main(argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("fv export: error:") and len(err.splitlines()) == 1, err
        assert message in err, err
        assert list(out_dir.iterdir()) == [], message  # no output, no temporary file


def test_library_refusals(classifier_onnx: Path, class_vector: tuple[ForgetVector, Path]) -> None:
    original = load_model(classifier_onnx)
    vector = with_clamp(class_vector[0], None)
    vector.delta = vector.delta.copy()
    vector.delta[0, 0, 0] = np.inf  # a vector mutated after its (checked) construction
    with pytest.raises(InvalidInputError, match="non-finite"):
        fuse_vector(original, vector)
    with pytest.raises(InvalidInputError, match="std finite and > 0"):
        fuse_vector(original, class_vector[0], normalized_input=((0.5,), (0.0,)))
    broken = onnx.ModelProto()
    broken.CopyFrom(original)
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(OnnxGraphError, match="fails the ONNX checker"):
        fuse_vector(broken, class_vector[0], force=True)
