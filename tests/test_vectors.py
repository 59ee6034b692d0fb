"""Vector files: round trip, and every kind of untrustworthy file refused with a named reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from vector_files import craft

from fv_serving.errors import DataNotFoundError, FileFormatError, InvalidInputError, ModelMismatchError
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.models import load_classifier
from fv_serving.vectors import ForgetVector, VectorBank, load_bank, load_vector, save_bank, save_vector


def _fingerprint() -> ClassifierFingerprint:
    return ClassifierFingerprint("ab" * 32, (1, 4, 4), 3, np.arange(12, dtype=np.float32).reshape(4, 3))


def _vector(delta: np.ndarray | None = None) -> ForgetVector:
    d = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4) if delta is None else delta
    return ForgetVector(
        classifier=_fingerprint(),
        delta=d,
        clamp=(0.0, 1.0),
        forget={"kind": "class", "classes": [1]},
        hparams={"beta": 5.0},
        metrics={"UA": 99.5},
    )


def test_round_trip(tmp_path: Path) -> None:
    vector = _vector()
    path = save_vector(vector, tmp_path / "v.safetensors")
    loaded = load_vector(path)
    assert np.array_equal(loaded.delta, vector.delta)
    assert loaded.clamp == (0.0, 1.0) and loaded.forget == vector.forget and loaded.metrics == {"UA": 99.5}
    assert loaded.vector_id == vector.vector_id
    assert loaded.classifier.weights_sha256 == vector.classifier.weights_sha256
    assert np.array_equal(loaded.classifier.probe_logits, vector.classifier.probe_logits)
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temporary file left


def test_bank_round_trip(tmp_path: Path) -> None:
    bank = VectorBank(
        classifier=_fingerprint(),
        vectors=np.ones((3, 1, 4, 4), np.float32) * [[[[1]]], [[[2]]], [[[3]]]],
        classes=[0, 1, 2],
    )
    loaded = load_bank(save_bank(bank, tmp_path / "b.safetensors"))
    assert np.array_equal(loaded.vectors, bank.vectors) and loaded.classes == [0, 1, 2]
    assert float(loaded.vector_for(2).mean()) == 3.0
    with pytest.raises(InvalidInputError, match="class 7 is not in the bank"):
        loaded.vector_for(7)
    with pytest.raises(FileFormatError, match="holds a 'bank', but a 'vector' was expected"):
        load_vector(tmp_path / "b.safetensors")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="not found"):
        load_vector(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path: Path) -> None:
    path = save_vector(_vector(), tmp_path / "v.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(FileFormatError, match="truncated or corrupt"):
        load_vector(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        load_vector(path)


def test_flipped_bytes_detected(tmp_path: Path) -> None:
    path = save_vector(_vector(), tmp_path / "v.safetensors")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40  # inside the tensor data: safetensors itself cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="corrupted"):
        load_vector(path)


def test_nan_in_file_refused(tmp_path: Path) -> None:
    path = save_vector(_vector(), tmp_path / "v.safetensors")
    delta = _vector().delta.copy()
    delta[0, 1, 1] = np.nan
    craft(path, path, tensors={"delta": delta, "probe_logits": _fingerprint().probe_logits})
    with pytest.raises(FileFormatError, match=r"1 non-finite value\(s\)"):
        load_vector(path)


def test_wrong_shape_refused(tmp_path: Path) -> None:
    path = save_vector(_vector(), tmp_path / "v.safetensors")
    craft(path, path, tensors={"delta": np.zeros((1, 5, 5), np.float32), "probe_logits": _fingerprint().probe_logits})
    with pytest.raises(FileFormatError, match=r"tensor shape \[1, 5, 5\] differs from recorded shape"):
        load_vector(path)
    craft(
        path,
        path,
        tensors={"delta": np.zeros((1, 5, 5), np.float32), "probe_logits": _fingerprint().probe_logits},
        meta={"shape": [1, 5, 5]},
    )
    with pytest.raises(FileFormatError, match=r"vector shape \[1, 5, 5\] differs from the classifier's input"):
        load_vector(path)


def test_not_our_file(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"delta": np.zeros((1, 4, 4), np.float32)}, str(path))
    with pytest.raises(FileFormatError, match="no fv-serving metadata"):
        load_vector(path)


def test_nan_vector_never_written(tmp_path: Path) -> None:
    delta = np.zeros((1, 4, 4), np.float32)
    delta[0, 0, 0] = np.inf
    with pytest.raises(InvalidInputError, match="non-finite"):
        save_vector(_vector(delta), tmp_path / "v.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_vector_for_another_classifier_refused(class_vector, other_classifier_path: Path, tiny_classifier_path) -> None:
    vector, _ = class_vector
    vector.classifier.check_weights(load_classifier(tiny_classifier_path).model, "the vector")  # its own: fine
    other = load_classifier(other_classifier_path).model
    with pytest.raises(ModelMismatchError, match="different weights"):
        vector.classifier.check_weights(other, "the vector")
    with pytest.raises(ModelMismatchError, match="probe images differ"):
        vector.classifier.check_outputs(lambda x: other(__import__("torch").from_numpy(x)).numpy(), "the vector")


def test_atomic_files_get_normal_permissions(tmp_path: Path) -> None:
    import os

    path = save_vector(_vector(), tmp_path / "v.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
