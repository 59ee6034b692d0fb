"""Classifier export and forget-step graphs, checked in onnxruntime against PyTorch on real images.

The classifier and the vector are the session fixtures (a small CNN trained on a real
Fashion-MNIST subset, a class vector learned for it). Tolerances: ONNX vs PyTorch
logits 1e-4; the forget step must equal apply_delta exactly (same float32 Add/Clip).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from fv_serving.arithmetic import vector_from_bank
from fv_serving.cli.main import main
from fv_serving.data import Dataset, ForgetSpec, to_numpy_images
from fv_serving.errors import InvalidInputError
from fv_serving.fingerprint import weights_digest
from fv_serving.metrics import predict
from fv_serving.models import ModelSpec, PerturbedClassifier, load_classifier
from fv_serving.onnx import (
    TensorInfo,
    forget_step,
    forget_step_graph,
    fuse_vector,
    load_model,
    metadata,
    providers_for,
    save_model,
)
from fv_serving.onnx.export import classifier_to_onnx, export_classifier
from fv_serving.onnx.graph import GraphSummary
from fv_serving.perturbation import apply_delta
from fv_serving.pipeline import Workspace
from fv_serving.vectors import ForgetVector, VectorBank, save_bank

FORGET_CLASS = 1


def ort_run(model: onnx.ModelProto | Path, x: np.ndarray, name: str = "image") -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {name: np.ascontiguousarray(x, np.float32)})[0])


def full_check(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


@pytest.fixture(scope="module")
def test_images(fmnist: Dataset) -> np.ndarray:
    return to_numpy_images(fmnist.test, torch.arange(1000))


@pytest.fixture(scope="module")
def exported(tiny_workspace: Workspace, test_images: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "classifier.onnx"
    summary = export_classifier(tiny_workspace.model, path, images=test_images[:256])
    assert summary.path == path
    return path


def test_export_writes_one_checked_file_with_fingerprint(
    exported: Path, tiny_workspace: Workspace, class_vector: tuple[ForgetVector, Path]
) -> None:
    full_check(exported)
    assert [p.name for p in exported.parent.iterdir()] == ["classifier.onnx"]  # no .data file, no temp file
    model = onnx.load(str(exported), load_external_data=False)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)
    summary = GraphSummary.of(model, exported, [])
    assert summary.inputs == (TensorInfo("image", TensorProto.FLOAT, ("batch", 1, 28, 28)),)
    assert summary.outputs == (TensorInfo("logits", TensorProto.FLOAT, ("batch", 10)),)
    assert summary.inputs[0].dtype == "float32" and summary.opset == 18
    meta = metadata(model)
    assert meta["fv_serving.kind"] == "classifier"
    assert meta["fv_serving.classifier_sha256"] == weights_digest(tiny_workspace.model)
    assert meta["fv_serving.classifier_sha256"] == class_vector[0].classifier.weights_sha256
    assert ModelSpec.from_json(json.loads(meta["fv_serving.spec"])) == tiny_workspace.model.spec
    assert [n.op_type for n in model.graph.node][:2] == ["Sub", "Div"]  # normalisation inside the graph


def test_onnx_logits_match_pytorch_on_real_images(
    exported: Path, tiny_workspace: Workspace, test_images: np.ndarray
) -> None:
    with torch.no_grad():
        expected = tiny_workspace.model(torch.from_numpy(test_images)).numpy()
    for batch in (1, 7, 64, len(test_images)):
        actual = np.concatenate([ort_run(exported, test_images[i : i + batch]) for i in range(0, 128, batch)])
        err = float(np.max(np.abs(actual - expected[: len(actual)])))
        assert err < 1e-4, f"batch {batch}: max |diff| {err}"
    assert float(np.max(np.abs(expected[:1] - expected[1:2]))) > 1e-2  # the images really differ


def test_unlearning_metrics_through_onnxruntime_match_pytorch(
    exported: Path, tiny_workspace: Workspace, class_vector: tuple[ForgetVector, Path]
) -> None:
    vector = class_vector[0]
    fused = fuse_vector(load_model(exported), vector).graph
    session = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    unlearned = PerturbedClassifier(tiny_workspace.model, torch.from_numpy(vector.delta), vector.clamp)
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    data = tiny_workspace.data
    sets = {"UA": (data.train, split.forget), "RA": (data.train, split.retain), "TA": (data.test, split.test)}
    for name, (images, every) in sets.items():
        indices = every[:: max(1, len(every) // 1000)]  # ~1000-2000 images per set keeps the test quick
        reference = predict(unlearned, images, indices)
        x = to_numpy_images(images, indices)
        labels = np.concatenate(
            [session.run(None, {"image": x[i : i + 1000]})[0].argmax(1) for i in range(0, len(x), 1000)]
        )
        onnx_acc = float(100.0 * np.mean(labels == reference.targets))
        torch_acc = reference.accuracy
        if name == "UA":
            onnx_acc, torch_acc = 100.0 - onnx_acc, 100.0 - torch_acc
        assert abs(onnx_acc - torch_acc) <= 0.1, f"{name}: onnxruntime {onnx_acc:.2f} vs PyTorch {torch_acc:.2f}"
    assert 100.0 - predict(unlearned, data.train, split.forget).accuracy > 50  # the vector really forgets


def test_legacy_exporter_matches_and_dynamo_refuses_old_opset(
    tiny_workspace: Workspace, test_images: np.ndarray, tmp_path: Path
) -> None:
    legacy = classifier_to_onnx(tiny_workspace.model, opset=17, exporter="legacy")
    with torch.no_grad():
        expected = tiny_workspace.model(torch.from_numpy(test_images[:64])).numpy()
    assert float(np.max(np.abs(ort_run(legacy, test_images[:64]) - expected))) < 1e-4
    with pytest.raises(InvalidInputError, match="opset >= 18"):
        export_classifier(tiny_workspace.model, tmp_path / "old.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


# -- forget step ----------------------------------------------------------------------------------------


def _bank(vector: ForgetVector, clamp: tuple[float, float] | None) -> VectorBank:
    rng = np.random.default_rng(0)
    vectors = np.stack([vector.delta, *(rng.normal(0, 0.2, vector.delta.shape) for _ in range(2))])
    return VectorBank(classifier=vector.classifier, vectors=vectors, classes=[1, 3, 5], clamp=clamp)


@pytest.mark.parametrize("clamp", [None, (0.0, 1.0)])
def test_forget_step_equals_apply_delta(
    class_vector: tuple[ForgetVector, Path], test_images: np.ndarray, clamp: tuple[float, float] | None
) -> None:
    base = class_vector[0]
    vector = ForgetVector(classifier=base.classifier, delta=base.delta, clamp=clamp)
    x = test_images[:200]
    bank = _bank(vector, clamp)
    composed = vector_from_bank(bank, [1.0, -0.5, 2.0], "coefficients")
    cases: dict[str, tuple[ForgetVector | None, np.ndarray]] = {
        "vector": (vector, vector.delta),
        "bank": (composed, bank.vectors[0] - 0.5 * bank.vectors[1] + 2 * bank.vectors[2]),
        "off": (None, np.zeros_like(vector.delta)),
    }
    for name, (source, delta) in cases.items():
        step = forget_step_graph(source, (1, 28, 28))
        onnx.checker.check_model(step, full_check=True)
        outputs = [o.name for o in step.graph.output]
        assert [i.name for i in step.graph.input] == ["image"] and outputs == ["image_fv", "vector_id"]
        ids = ort.InferenceSession(step.SerializeToString()).run(["vector_id"], {"image": x[:3]})[0]
        assert ids.shape == (3, 1) and set(ids.ravel()) == {source.vector_id if source else "off"}
        dims = step.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [1, 28, 28]
        step_clamp = None if name == "off" else clamp
        expected = apply_delta(torch.from_numpy(x), torch.from_numpy(delta.astype(np.float32)), step_clamp).numpy()
        actual = ort_run(step, x)
        tol = 1e-6 if name == "bank" else 0.0  # bank: combine() in numpy vs the test's own sum
        np.testing.assert_allclose(actual, expected, rtol=0, atol=tol, err_msg=name)
        if name != "off":
            assert float(np.max(np.abs(actual - x))) > 0.1  # the step changes the images
            meta = metadata(step)
            assert json.loads(meta["fv_serving.vector"])["clamp"] == (list(clamp) if clamp else None)
    if clamp is not None:
        assert float((x + vector.delta).max()) > 1.0 or float((x + vector.delta).min()) < 0.0  # the clamp bites


def test_forget_step_refuses_bad_input(class_vector: tuple[ForgetVector, Path]) -> None:
    vector = class_vector[0]
    with pytest.raises(InvalidInputError, match="needs the image shape"):
        forget_step_graph(None)
    with pytest.raises(InvalidInputError, match="differs from the vector's shape"):
        forget_step_graph(vector, (3, 28, 28))
    with pytest.raises(InvalidInputError, match="need 3 coefficients"):
        vector_from_bank(_bank(vector, None), np.ones(2), "coefficients")
    broken = ForgetVector(classifier=vector.classifier, delta=vector.delta.copy())
    broken.delta[0, 3, 3] = np.inf  # the object was checked at construction; the checked builder checks again
    with pytest.raises(InvalidInputError, match="non-finite"):
        forget_step(broken, (1, 28, 28))


# -- CLI ------------------------------------------------------------------------------------------------


def test_cli_export_classifier_and_forget_steps(
    tiny_classifier_path: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "clf.onnx"
    assert main(["export", "classifier", "--classifier", str(tiny_classifier_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input  image float32 [batch,1,28,28]" in printed and "output logits float32 [batch,10]" in printed
    assert "PyTorch on 256 given images" in printed and "onnx.checker full check" in printed
    full_check(out)

    vector, vector_path = class_vector
    bank_path = save_bank(_bank(vector, None), tmp_path / "bank.safetensors")
    runs = {
        "vector": ["--vector", str(vector_path), "--classifier-onnx", str(out)],
        "mean": ["--bank", str(bank_path), "--classes", "1", "5", "--mode", "mean"],
        "coef": ["--bank", str(bank_path), "--coefficients", "1", "0", "0"],
        "off": ["--off", "--shape", "1", "28", "28"],
    }
    x = to_numpy_images(load_classifier_data(tiny_classifier_path).test, torch.arange(32))
    for name, extra in runs.items():
        step_path = tmp_path / f"{name}.onnx"
        assert main(["export", "forget", *extra, "--out", str(step_path)]) == 0, name
        printed = capsys.readouterr().out
        assert "input  image float32 [batch,1,28,28]" in printed and "output image_fv float32" in printed
        assert "apply_delta" in printed
        assert ("same classifier" in printed) == (name == "vector")
        full_check(step_path)
        actual = ort_run(step_path, x)
        if name in ("vector", "coef"):  # coefficients (1, 0, 0) pick the class-1 vector, the learned one
            np.testing.assert_array_equal(actual, x + vector.delta)
        elif name == "mean":
            bank = _bank(vector, None)
            np.testing.assert_allclose(actual, x + (bank.vectors[0] + bank.vectors[2]) / 2, atol=1e-6)
        else:
            np.testing.assert_array_equal(actual, x)


def load_classifier_data(path: Path) -> Dataset:
    from fv_serving.data import load_dataset

    return load_dataset(load_classifier(path).info["dataset"])


def test_cli_forget_step_errors_are_one_line_and_write_nothing(
    class_vector: tuple[ForgetVector, Path],
    other_classifier_path: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = save_model(classifier_to_onnx(load_classifier(other_classifier_path).model), tmp_path / "other.onnx")
    out = tmp_path / "step.onnx"
    cases = {
        "needs --shape": ["--off"],
        "was made for classifier": ["--vector", str(class_vector[1]), "--classifier-onnx", str(other)],
        "but a 'bank' was expected": ["--bank", str(class_vector[1]), "--classes", "1"],  # a vector, not a bank
    }
    for message, extra in cases.items():
        assert main(["export", "forget", *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fv export: error:") and len(err.splitlines()) == 1, err
        assert message in err, err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


def test_cuda_provider_is_refused_clearly_without_cuda() -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert providers_for("cuda")[0] == "CUDAExecutionProvider"
        return
    with pytest.raises(InvalidInputError, match="onnxruntime-gpu"):
        providers_for("cuda")
    with pytest.raises(InvalidInputError, match="unknown provider"):
        providers_for("tpu")
