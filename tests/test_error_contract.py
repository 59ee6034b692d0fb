"""The one-line error contract: each bad input ends in exit status 2, one line naming the problem, nothing written.

Files that `save_vector` would never write (NaN, malformed metadata, absurd values) are
crafted here at the safetensors level, with a valid content digest, so that the checks
behind the digest are what refuses them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from vector_files import craft

from fv_serving.cli.main import main
from fv_serving.data import SplitSpec, load_dataset
from fv_serving.errors import FileFormatError
from fv_serving.vectors import ForgetVector, load_vector, save_vector


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_refused(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def vector_file(class_vector: tuple[ForgetVector, Path]) -> Path:
    return class_vector[1]


# -- fv inspect and loading ---------------------------------------------------------------------------


def test_inspect_names_a_nan_vector_not_a_missing_bank(vector_file: Path, tmp_path: Path, capsys) -> None:
    delta = load_vector(vector_file).delta.copy()
    delta[0, 3, 3] = np.nan
    bad = craft(vector_file, tmp_path / "nan.safetensors", tensors={"delta": delta})
    line = assert_refused(*run(capsys, "inspect", bad)[::2], "non-finite")
    assert "bank" not in line


def test_inspect_names_truncation_and_corruption(vector_file: Path, tmp_path: Path, capsys) -> None:
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(vector_file.read_bytes()[:-100])
    assert_refused(*run(capsys, "inspect", truncated)[::2], "truncated or corrupt")
    flipped = bytearray(vector_file.read_bytes())
    flipped[-20] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    assert_refused(*run(capsys, "inspect", tmp_path / "flip.safetensors")[::2], "corrupted")


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        ({"classifier": None}, "lacks the key 'classifier'"),
        ({"forget": "all of it"}, "'forget' must be a JSON object"),
        ({"clamp": [0.0]}, "malformed metadata"),
        ({"format_version": "1"}, "format_version must be an integer"),
        ({"kind": "weights"}, "holds a 'weights'"),
    ],
)
def test_malformed_metadata_is_one_line(vector_file: Path, tmp_path: Path, capsys, edit: dict, fragment: str) -> None:
    bad = craft(vector_file, tmp_path / "bad.safetensors", meta=edit)
    with pytest.raises(FileFormatError, match=fragment.replace("(", r"\(")):
        load_vector(bad)
    assert_refused(*run(capsys, "inspect", bad)[::2], fragment)


def test_nan_probe_logits_are_refused(vector_file: Path, tmp_path: Path, capsys) -> None:
    logits = np.full((4, 10), np.nan, np.float32)
    bad = craft(vector_file, tmp_path / "probe.safetensors", tensors={"probe_logits": logits})
    assert_refused(*run(capsys, "inspect", bad)[::2], "probe_logits", "non-finite")


# -- learning on an empty forget set ------------------------------------------------------------------


def test_empty_forget_sets_are_refused_and_nothing_is_written(tmp_path: Path, capsys) -> None:
    split = SplitSpec(seed=0, val_size=1000, train_size=6)
    clf = tmp_path / "clf.safetensors"
    assert main(["train", "--epochs", "1", "--train-size", "6", "--val-size", "1000", "--out", str(clf)]) == 0
    capsys.readouterr()
    pool, _ = split.indices(60000)
    present = set(load_dataset("fashion-mnist").train.labels[pool].tolist())
    absent = next(c for c in range(10) if c not in present)
    out = tmp_path / "v.safetensors"
    code, _, err = run(capsys, "learn", "--classifier", clf, "--forget-class", absent, "--no-eval", "--out", out)
    assert_refused(code, err, "no training images", "nothing to forget")
    code, _, err = run(capsys, "learn", "--classifier", clf, "--forget-percent", "1", "--no-eval", "--out", out)
    assert_refused(code, err, "empty forget or retain set")
    assert not out.exists()


# -- ONNX ----------------------------------------------------------------------------------------------


def test_export_shape_mismatch_names_the_dims(tiny_classifier_path: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import fv_serving.onnx.export as export

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["image"], ["logits"])],
        "wrong",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1024])],
    )
    monkeypatch.setattr(export, "classifier_to_onnx", lambda *a, **k: helper.make_model(graph))
    out = tmp_path / "c.onnx"
    code, _, err = run(capsys, "export", "classifier", "--classifier", tiny_classifier_path, "--out", out)
    line = assert_refused(code, err, "[N,1,32,32]", "[N,1,28,28]")
    assert "batch" not in line and not out.exists()


def test_fused_output_onto_its_own_input_is_refused(
    vector_file: Path, classifier_graph: Path, tmp_path: Path, capsys
) -> None:
    graph = tmp_path / "clf.onnx"
    graph.write_bytes(classifier_graph.read_bytes())
    before = hashlib.sha256(graph.read_bytes()).hexdigest()
    code, _, err = run(capsys, "export", "fused", "--onnx", graph, "--vector", vector_file, "--out", graph)
    assert_refused(code, err, "is the input graph itself")
    assert hashlib.sha256(graph.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("value", [1e30, 3e38])
def test_absurd_vector_values_are_refused_unless_the_bound_is_raised(
    vector_file: Path, classifier_graph: Path, tmp_path: Path, capsys, value: float
) -> None:
    vector = load_vector(vector_file)
    big = vector.delta.copy()
    big[0, 0, 0] = value
    path = save_vector(ForgetVector(classifier=vector.classifier, delta=big), tmp_path / "big.safetensors")
    out = tmp_path / "fused.onnx"
    code, _, err = run(capsys, "export", "fused", "--onnx", classifier_graph, "--vector", path, "--out", out)
    assert_refused(code, err, "beyond the bound 4", "--max-abs")
    code, _, err = run(capsys, "export", "forget", "--vector", path, "--out", out)
    assert_refused(code, err, "beyond the bound")
    assert not out.exists()


def test_a_raised_bound_lets_a_large_vector_through(
    vector_file: Path, classifier_graph: Path, tmp_path: Path, capsys
) -> None:
    vector = load_vector(vector_file)
    path = save_vector(ForgetVector(classifier=vector.classifier, delta=vector.delta * 0 + 6.0), tmp_path / "six.sft")
    out = tmp_path / "fused.onnx"
    code, _, err = run(capsys, "export", "fused", "--onnx", classifier_graph, "--vector", path, "--out", out)
    assert_refused(code, err, "entries up to 6")
    code, _, _ = run(
        capsys, "export", "fused", "--onnx", classifier_graph, "--vector", path, "--out", out, "--max-abs", 8
    )
    assert code == 0 and onnx.load(str(out)).graph.node


def test_a_vector_that_changes_nothing_needs_allow_noop(
    vector_file: Path, classifier_graph: Path, tmp_path: Path, capsys
) -> None:
    vector = load_vector(vector_file)
    zero = save_vector(ForgetVector(classifier=vector.classifier, delta=vector.delta * 0), tmp_path / "zero.sft")
    out = tmp_path / "fused.onnx"
    code, _, err = run(capsys, "export", "fused", "--onnx", classifier_graph, "--vector", zero, "--out", out)
    assert_refused(code, err, "changes nothing", "--off")
    assert not out.exists()
    code, stdout, _ = run(
        capsys, "export", "fused", "--onnx", classifier_graph, "--vector", zero, "--out", out, "--allow-noop"
    )
    assert code == 0 and "WARNING" in stdout and "changes nothing" in stdout and out.exists()


def test_a_vector_that_missed_its_rule_says_so(vector_file: Path, classifier_graph: Path, tmp_path: Path, capsys):
    vector = load_vector(vector_file)
    stopping = {**vector.metrics["stopping"], "rule_met": False, "forget_acc_monitor": 37.5}
    missed = craft(
        vector_file, tmp_path / "missed.safetensors", meta={"metrics": {**vector.metrics, "stopping": stopping}}
    )
    out = tmp_path / "fused.onnx"
    code, stdout, _ = run(capsys, "export", "fused", "--onnx", classifier_graph, "--vector", missed, "--out", out)
    assert code == 0 and "did NOT meet its stopping rule" in stdout and "37.5%" in stdout


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier_graph(tiny_classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("graph") / "classifier.onnx"
    assert main(["export", "classifier", "--classifier", str(tiny_classifier_path), "--out", str(out)]) == 0
    return out
