"""Forget-vector and bank files: safetensors tensors plus JSON metadata, never pickle.

A file holds the perturbation(s) in pixel space ([0,1] images, before normalisation),
the classifier fingerprint they were made for (weights digest + probe logits), the
forget specification, hyper-parameters and the metrics measured at creation. A
content digest over the tensors detects corruption that safetensors itself would
not (flipped bytes inside the data section). Loading refuses anything that does
not hold up, with a message that names the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fv_serving.atomic import atomic_path
from fv_serving.errors import DataNotFoundError, FileFormatError, InvalidInputError
from fv_serving.fingerprint import PROBE_COUNT, ClassifierFingerprint

FORMAT = "fv-serving/forget-vector"
FORMAT_VERSION = 1
METADATA_KEY = "fv_serving"
PIXEL_SPACE = "raw pixels in [0,1], added before the model's mean/std normalisation"
Clamp = tuple[float, float] | None


def content_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{t.dtype}|{t.shape}|".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def require_finite(array: np.ndarray, what: str) -> None:
    """The one finiteness check of vectors, banks and probe logits (InvalidInputError, naming the count)."""
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InvalidInputError(f"{what} holds {bad} non-finite value(s) (NaN or Inf); refusing it")


def _check_clamp(clamp: Clamp) -> Clamp:
    if clamp is None:
        return None
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:
        raise InvalidInputError(f"clamp must be (low, high) with low < high, got {clamp}")
    return (lo, hi)


@dataclass
class _Payload:
    """What vectors and banks share: fingerprint, clamp and descriptive metadata."""

    classifier: ClassifierFingerprint
    clamp: Clamp = None
    forget: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


@dataclass
class ForgetVector(_Payload):
    """One perturbation delta [C,H,W]: g(x) = f(clamp(x + delta))."""

    delta: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __post_init__(self) -> None:
        self.delta = np.asarray(self.delta, dtype=np.float32)
        self.clamp = _check_clamp(self.clamp)
        if self.delta.shape != self.classifier.input_shape:
            raise InvalidInputError(
                f"vector shape {list(self.delta.shape)} differs from the classifier's input shape "
                f"{list(self.classifier.input_shape)}"
            )
        require_finite(self.delta, "forget vector")

    @property
    def vector_id(self) -> str:
        """Short content id: same delta, clamp and classifier -> same id."""
        h = hashlib.sha256(self.delta.tobytes())
        h.update(repr(self.clamp).encode())
        h.update(self.classifier.weights_sha256.encode())
        return h.hexdigest()[:16]

    @property
    def l2_norm(self) -> float:
        return float(np.linalg.norm(self.delta.ravel()))

    def describe(self) -> dict[str, Any]:
        """JSON summary for status displays and ONNX/Triton metadata."""
        return {
            "vector_id": self.vector_id,
            "shape": list(self.delta.shape),
            "l2_norm": round(self.l2_norm, 6),
            "clamp": list(self.clamp) if self.clamp else None,
            "pixel_space": PIXEL_SPACE,
            "classifier_sha256": self.classifier.weights_sha256,
            "forget": self.forget,
            "metrics": self.metrics,
            "created": self.created,
        }


@dataclass
class VectorBank(_Payload):
    """K class vectors [K,C,H,W] of one classifier, the raw material of forget-vector arithmetic."""

    vectors: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    classes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self.clamp = _check_clamp(self.clamp)
        if self.vectors.ndim != 4 or self.vectors.shape[1:] != self.classifier.input_shape:
            raise InvalidInputError(
                f"bank shape {list(self.vectors.shape)} is not [K, *{list(self.classifier.input_shape)}]"
            )
        if len(self.classes) != self.vectors.shape[0]:
            raise InvalidInputError(f"bank has {self.vectors.shape[0]} vectors but {len(self.classes)} class ids")
        require_finite(self.vectors, "vector bank")

    def vector_for(self, cls: int) -> np.ndarray:
        if cls not in self.classes:
            raise InvalidInputError(f"class {cls} is not in the bank (it holds classes {self.classes})")
        return self.vectors[self.classes.index(cls)]


def _metadata(kind: str, payload: _Payload, tensors: dict[str, np.ndarray], extra: dict[str, Any]) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "pixel_space": PIXEL_SPACE,
            "clamp": list(payload.clamp) if payload.clamp else None,
            "classifier": payload.classifier.to_json(),
            "forget": payload.forget,
            "hparams": payload.hparams,
            "metrics": payload.metrics,
            "notes": payload.notes,
            "created": payload.created,
            "content_sha256": content_digest(tensors),
            **extra,
        },
        sort_keys=True,
    )


def _write(path: str | Path, tensors: dict[str, np.ndarray], metadata: str) -> Path:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: metadata})
    return Path(path)


def save_vector(vector: ForgetVector, path: str | Path) -> Path:
    tensors = {"delta": vector.delta, "probe_logits": vector.classifier.probe_logits.astype(np.float32)}
    meta = _metadata("vector", vector, tensors, {"shape": list(vector.delta.shape), "vector_id": vector.vector_id})
    return _write(path, tensors, meta)


def save_bank(bank: VectorBank, path: str | Path) -> Path:
    tensors = {"bank": bank.vectors, "probe_logits": bank.classifier.probe_logits.astype(np.float32)}
    meta = _metadata("bank", bank, tensors, {"shape": list(bank.vectors.shape), "classes": bank.classes})
    return _write(path, tensors, meta)


KINDS = ("vector", "bank")


def _read(path: str | Path, kind: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and verify one file: existence, container, metadata, kind, digest, finiteness, shapes.

    `kind` None accepts either kind (the caller dispatches on `meta["kind"]`).
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"{kind or 'vector or bank'} file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = (f.metadata() or {}).get(METADATA_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError, MemoryError) as exc:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}") from exc
    if raw_meta is None:
        raise FileFormatError(f"{path} has no fv-serving metadata: not a forget-vector file")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}: metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise FileFormatError(f"{path}: metadata is not a JSON object")
    if meta.get("format") != FORMAT:
        raise FileFormatError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version", 0)
    if not isinstance(version, int):
        raise FileFormatError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise FileFormatError(f"{path}: format version {meta['format_version']} is newer than this fv-serving")
    found = meta.get("kind")
    if found not in KINDS or (kind is not None and found != kind):
        raise FileFormatError(f"{path} holds a {found!r}, but a {kind or ' or '.join(KINDS)!r} was expected")
    main = "delta" if found == "vector" else "bank"
    if main not in tensors or "probe_logits" not in tensors:
        raise FileFormatError(f"{path}: missing tensor {main!r} or 'probe_logits'")
    if content_digest(tensors) != meta.get("content_sha256"):
        raise FileFormatError(f"{path} is corrupted: its tensors do not match the recorded content digest")
    for name in (main, "probe_logits"):
        try:
            require_finite(tensors[name], f"{path} ({name})")
        except InvalidInputError as exc:
            raise FileFormatError(str(exc)) from exc
    if list(tensors[main].shape) != list(meta.get("shape", [])):
        raise FileFormatError(
            f"{path}: tensor shape {list(tensors[main].shape)} differs from recorded shape {meta.get('shape')}"
        )
    return meta, tensors


def _fields(path: str | Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """The payload's constructor arguments from verified metadata; malformed entries become FileFormatError."""
    try:
        classifier = meta["classifier"]
        n_classes = int(classifier["num_classes"])
        if tensors["probe_logits"].shape != (PROBE_COUNT, n_classes):
            raise ValueError(
                f"probe logits have shape {list(tensors['probe_logits'].shape)}, expected [{PROBE_COUNT}, {n_classes}]"
            )
        clamp = meta.get("clamp")
        fields: dict[str, Any] = {
            "classifier": ClassifierFingerprint.from_json(classifier, tensors["probe_logits"]),
            "clamp": (float(clamp[0]), float(clamp[1])) if clamp else None,
            "created": str(meta.get("created", "")),
        }
        for key in ("forget", "hparams", "metrics", "notes"):
            value = meta.get(key, {})
            if not isinstance(value, dict):
                raise ValueError(f"{key!r} must be a JSON object, got {type(value).__name__}")
            fields[key] = value
        if meta["kind"] == "bank":
            classes = meta["classes"]
            if not isinstance(classes, list) or not all(isinstance(c, int) for c in classes):
                raise ValueError(f"'classes' must be a list of class ids, got {classes!r}")
            fields["classes"] = classes
    except KeyError as exc:
        raise FileFormatError(f"{path}: metadata lacks the key {exc}") from exc
    except (TypeError, ValueError, IndexError) as exc:
        raise FileFormatError(f"{path}: malformed metadata: {exc}") from exc
    return fields


def _build(path: str | Path, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> ForgetVector | VectorBank:
    fields = _fields(path, meta, tensors)
    try:
        if meta["kind"] == "vector":
            return ForgetVector(delta=tensors["delta"], **fields)
        return VectorBank(vectors=tensors["bank"], **fields)
    except InvalidInputError as exc:
        raise FileFormatError(f"{path}: {exc}") from exc


def load_vector(path: str | Path) -> ForgetVector:
    vector = _build(path, *_read(path, "vector"))
    assert isinstance(vector, ForgetVector)
    return vector


def load_bank(path: str | Path) -> VectorBank:
    bank = _build(path, *_read(path, "bank"))
    assert isinstance(bank, VectorBank)
    return bank


def load_any(path: str | Path) -> ForgetVector | VectorBank:
    """A vector or a bank, whichever the file holds (for tools such as `fv inspect`)."""
    return _build(path, *_read(path, None))
