"""The fingerprint recognises one classifier in other forms and still refuses other classifiers.

Forms are real exports of the session's tiny classifier (fv_serving/bench/forms.py):
float16 end to end, ending in softmax, both, and taking normalised input (mean/std
given). Each must be fused by `fv export fused` WITHOUT --force. The classifier of
another seed (same architecture, same data) must be refused in its float32 and its
float16 + softmax form.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from fv_serving.bench.forms import float16_form, normalized_input_form, softmax_form
from fv_serving.cli.main import main
from fv_serving.errors import ModelMismatchError
from fv_serving.fingerprint import FORM_ATOL, form_distance, is_probabilities, log_probabilities
from fv_serving.models import load_classifier
from fv_serving.onnx import fuse_vector, metadata, save_model
from fv_serving.onnx.export import classifier_to_onnx
from fv_serving.pipeline import Workspace
from fv_serving.vectors import ForgetVector


def form(workspace: Workspace, name: str) -> onnx.ModelProto:
    model = workspace.model
    return {
        "float16": lambda: float16_form(model),
        "softmax": lambda: softmax_form(classifier_to_onnx(model)),
        "float16 + softmax": lambda: softmax_form(float16_form(model)),
        "normalised input": lambda: normalized_input_form(model),
    }[name]()


@pytest.mark.parametrize("name", ["float16", "softmax", "float16 + softmax", "normalised input"])
def test_the_same_model_in_another_form_is_fused_without_force(
    name: str, tiny_workspace: Workspace, class_vector: tuple[ForgetVector, Path], tmp_path: Path
) -> None:
    graph = save_model(form(tiny_workspace, name), tmp_path / "form.onnx")
    args = [
        "export",
        "fused",
        "--onnx",
        str(graph),
        "--vector",
        str(class_vector[1]),
        "--out",
        str(tmp_path / "f.onnx"),
    ]
    if name == "normalised input":
        spec = tiny_workspace.model.spec
        args += ["--normalized-input", "--mean", *map(str, spec.mean), "--std", *map(str, spec.std)]
    assert main(args) == 0
    assert "forced" not in metadata(onnx.load(str(tmp_path / "f.onnx")))["fv_serving.classifier_check"]


@pytest.mark.parametrize("name", ["float32", "float16 + softmax"])
def test_another_seed_is_refused(
    name: str, other_classifier_path: Path, class_vector: tuple[ForgetVector, Path]
) -> None:
    other = load_classifier(other_classifier_path).model
    graph = classifier_to_onnx(other) if name == "float32" else softmax_form(float16_form(other))
    del graph.metadata_props[:]  # no recorded digest to refuse it by: the probe outputs must
    with pytest.raises(ModelMismatchError, match="a different model"):
        fuse_vector(graph, class_vector[0])


def test_the_rule_ignores_a_row_offset_and_reads_probabilities() -> None:
    logits = np.random.default_rng(0).normal(0, 4, (4, 10)).astype(np.float32)
    assert form_distance(logits + np.arange(4, dtype=np.float32)[:, None] * 7, logits) < 1e-5
    probabilities = np.exp(log_probabilities(logits)[0])
    assert is_probabilities(probabilities) and not is_probabilities(logits)
    assert form_distance(probabilities.astype(np.float32), logits) < 1e-5
    moved = logits.copy()
    moved[1, 3] += 10 * FORM_ATOL  # one class of one probe image moved: another model
    assert form_distance(moved, logits) > FORM_ATOL


def test_float16_probabilities_below_their_precision_count_as_equal() -> None:
    logits = np.array([[0.0, -5.0, -30.0, -40.0]], np.float32)  # two classes far below float16's smallest normal
    probabilities, floor = log_probabilities(np.exp(log_probabilities(logits)[0]).astype(np.float16))
    assert floor == pytest.approx(np.log(float(np.finfo(np.float16).tiny)))
    assert probabilities[0, 2] == probabilities[0, 3] == pytest.approx(floor)
    assert form_distance(np.exp(log_probabilities(logits)[0]).astype(np.float16), logits) < 1e-2
