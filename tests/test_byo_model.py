"""Forget vectors for a classifier this project did not train (fv_serving/byo.py).

The classifier is a torchvision MobileNetV3-small (first conv for one channel), trained
briefly here on real Fashion-MNIST images and exported the way a user might: the
TorchScript exporter, opset 17, input `input_0`, normalisation OUTSIDE the graph
(it takes (x - mean) / std), and a softmax at the end (output `probs`). A vector is
learned against that file, fused with `fv export fused` WITHOUT --force, and must
forget the class in onnxruntime; the raw-pixel export of the same model is accepted
by `fv triton build` without --force too. The nn.Module recipe of byo.py's docstring
is run as written.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from torch import nn

from fv_serving.byo import learn_vector_for_module, learn_vector_for_onnx, load_onnx_classifier
from fv_serving.cli.main import main
from fv_serving.config import TrainConfig, VectorConfig
from fv_serving.data import Dataset, ForgetSpec, SplitSpec, make_forget_split, to_numpy_images
from fv_serving.errors import OnnxGraphError
from fv_serving.models import Normalize, freeze
from fv_serving.onnx import fuse_vector, load_model, save_model
from fv_serving.onnx.identity import initializers_digest
from fv_serving.train import train_classifier
from fv_serving.vectors import load_vector

SPLIT = SplitSpec(seed=0, val_size=500, train_size=3000)
TROUSER = 1
#: Few, cheap checks; the rule stops at UA >= 95 allowing the weak classifier's hold-out to drop 10 points.
QUICK = VectorConfig(
    max_epochs=3,
    steps_per_epoch=15,
    checks_per_epoch=2,
    monitor_size=300,
    holdout_size=300,
    batch_size=128,
    forget_target=5.0,
    retain_margin=10.0,
)


def export_legacy(module: nn.Module, path: Path, input_name: str, output_name: str) -> Path:
    """The TorchScript exporter, opset 17, dynamic batch: settings of this test's choosing."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.rand(2, 1, 28, 28),),
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=[input_name],
            output_names=[output_name],
            opset_version=17,
            dynamic_axes={input_name: {0: "n"}, output_name: {0: "n"}},
        )
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture(scope="module")
def net(fmnist: Dataset) -> nn.Module:
    """MobileNetV3-small trained for 2 epochs on 3000 real images, behind nothing (takes normalised input)."""
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    model.features[0][0] = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
    for module in model.modules():  # torchvision's 0.01 leaves eval statistics far behind after 2 short epochs
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    pixels_in = nn.Sequential(Normalize(fmnist.mean, fmnist.std), model)
    pool, _ = SPLIT.indices(len(fmnist.train))
    train_classifier(pixels_in, fmnist, pool, TrainConfig(epochs=2, batch_size=64, lr=0.05), augmentation=None)
    return freeze(model)


@pytest.fixture(scope="module")
def user_onnx(net: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's export: normalised input `input_0`, softmax output `probs`."""
    return export_legacy(
        nn.Sequential(net, nn.Softmax(dim=1)), tmp_path_factory.mktemp("user") / "user.onnx", "input_0", "probs"
    )


def forget_images(data: Dataset) -> np.ndarray:
    return to_numpy_images(data.train, make_forget_split(data, SPLIT, ForgetSpec(classes=(TROUSER,))).forget)


def accuracy_on(graph: Path | onnx.ModelProto, input_name: str, pixels: np.ndarray, label: int, data: Dataset) -> float:
    """Accuracy (percent) of a graph that takes normalised input on images of one class, in onnxruntime."""
    source = str(graph) if isinstance(graph, Path) else graph.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    z = ((pixels - data.mean[0]) / data.std[0]).astype(np.float32)
    return float(100.0 * np.mean(session.run(None, {input_name: z})[0].argmax(axis=1) == label))


def test_learn_onnx_then_fuse_without_force(user_onnx: Path, net: nn.Module, fmnist: Dataset, tmp_path: Path) -> None:
    """`fv learn --onnx`, then `fv export fused` without --force: the class is forgotten in onnxruntime."""
    stats = (fmnist.mean, fmnist.std)
    mean, std = str(fmnist.mean[0]), str(fmnist.std[0])
    graph_input = ["--input-name", "input_0", "--normalized-input", "--mean", mean, "--std", std]
    out = tmp_path / "trouser.safetensors"
    quick = ["--max-epochs", "3", "--steps-per-epoch", "15", "--monitor-size", "300", "--holdout-size", "300"]
    quick += ["--forget-target", "5", "--retain-margin", "10"]
    learn = ["learn", "--onnx", str(user_onnx), "--forget-class", "Trouser", "--no-eval", "--out", str(out)]
    assert main([*learn, *graph_input, *quick]) == 0
    vector = load_vector(out)
    assert vector.classifier.weights_sha256 == initializers_digest(load_model(user_onnx))  # the graph's own identity
    assert vector.notes["classifier_source"]["learned_on"] == "the softmax's input (logits)"
    assert vector.metrics["stopping"]["rule_met"]

    fused = tmp_path / "fused.onnx"
    args = ["export", "fused", "--onnx", str(user_onnx), "--vector", str(out), "--out", str(fused)]
    assert main([*args, *graph_input]) == 0  # no --force
    images = forget_images(fmnist)
    assert accuracy_on(user_onnx, "input_0", images, TROUSER, fmnist) > 50.0  # the original knows trousers
    assert 100.0 - accuracy_on(fused, "input_0", images, TROUSER, fmnist) >= 95.0  # UA in onnxruntime

    raw_pixels = export_legacy(nn.Sequential(Normalize(*stats), net), tmp_path / "raw.onnx", "pixels", "scores")
    repo = tmp_path / "repo"
    assert (
        main(["triton", "build", "--classifier-onnx", str(raw_pixels), "--vector", str(out), "--out", str(repo)]) == 0
    )
    assert (repo / "forget_step" / "1" / "model.onnx").is_file()


def test_module_recipe(net: nn.Module, fmnist: Dataset, tmp_path: Path) -> None:
    """byo.py's docstring recipe: learn against the module, save with its fingerprint, fuse into one's own export."""
    mean, std = fmnist.mean, fmnist.std
    model = nn.Sequential(Normalize(mean, std), net).eval()  # raw pixels in [0,1] in
    _, metrics = learn_vector_for_module(
        model, fmnist, ForgetSpec(classes=(TROUSER,)), QUICK, tmp_path / "v.safetensors", split=SPLIT
    )
    assert metrics["UA"] >= 95.0
    program = torch.onnx.export(  # the user's own export: dynamo, normalised input, other names
        net,
        (torch.rand(2, 1, 28, 28),),
        None,
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes=({0: torch.export.Dim("n", min=1)},),
        external_data=False,
    )
    assert program is not None
    fused = fuse_vector(program.model_proto, load_vector(tmp_path / "v.safetensors"), normalized_input=(mean, std))
    path = save_model(fused.graph, tmp_path / "my_fused.onnx")
    assert 100.0 - accuracy_on(path, "x", forget_images(fmnist), TROUSER, fmnist) >= 95.0


def test_unconvertible_graph_is_refused_with_the_reason() -> None:
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("Hardmax", ["flat"], ["scores"])],
        "hardmax",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxGraphError, match="onnx2torch cannot convert"):
        load_onnx_classifier(model)


def test_image_folder_is_resized_to_the_graph(fmnist: Dataset, tmp_path: Path) -> None:
    """An ImageFolder of RGB PNGs (40 x 40) for a 3 x 32 x 32 graph: read, resized, learned on."""
    rng = np.random.default_rng(0)
    for split, start in (("train", 0), ("test", 1000)):
        for label in (0, TROUSER, 7):
            folder = tmp_path / "folder" / split / fmnist.class_names[label].replace("/", "-")
            folder.mkdir(parents=True)
            images = fmnist.train.images[fmnist.train.labels == label][start : start + 40]
            for i, img in enumerate(images):
                grey = Image.fromarray(img[0].numpy()).resize((40, 40))
                Image.merge("RGB", (grey, grey, grey)).save(folder / f"{i}.png")
    weights = rng.normal(0, 0.05, (3 * 32 * 32, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["scores"])],
        "linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "w")],
    )
    path = save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "linear.onnx")
    config = VectorConfig(max_epochs=1, steps_per_epoch=3, checks_per_epoch=1, batch_size=32)
    split = SplitSpec(val_size=12)
    vector, _ = learn_vector_for_onnx(
        path,
        ["1"],
        config,
        tmp_path / "v.safetensors",
        data="imagefolder",
        data_root=tmp_path / "folder",
        split=split,
        evaluate=False,
    )
    assert vector.delta.shape == (3, 32, 32) and vector.forget["classes"] == [1]
