"""Reading a deployment: what a repository holds and what its server serves.

Used by `fv status`, `fv switch` and `fv infer`; it never imports the builder, and
nothing here needs PyTorch. The repository says what is published (deployment.json,
the classifier graph, the forget-step versions and their sidecars, the confirmed
version); the server says which forget-step version is READY.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import onnx

from fv_serving.errors import DataNotFoundError, FileFormatError, OnnxGraphError, ServerError
from fv_serving.onnx.graph import load_model
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import TritonClient
from fv_serving.triton.repository import CLASSIFIER_MODEL, ENSEMBLE_MODEL, FORGET_STEP_MODEL, ONNX_FILENAME

DEPLOYMENT_FILENAME = "deployment.json"
DEPLOYMENT_FORMAT = "fv-serving/deployment"


def read_deployment(repository: str | Path) -> dict[str, Any]:
    """`deployment.json` of a repository; empty when it was built without one (e.g. by the library)."""
    path = Path(repository) / DEPLOYMENT_FILENAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise FileFormatError(f"{path} is not a JSON object")
    return data


def class_names_of(repository: str | Path) -> list[str]:
    """The deployed classifier's class names (empty when unknown: classes are then shown as numbers)."""
    return list(read_deployment(repository).get("classifier", {}).get("class_names") or [])


def deployed_classifier(repository: str | Path) -> onnx.ModelProto:
    """The classifier graph the repository serves (what a new vector must match)."""
    path = Path(repository) / CLASSIFIER_MODEL / "1" / ONNX_FILENAME
    if not path.is_file():
        raise DataNotFoundError(f"{path} is missing: {repository} is not a forget-vector repository")
    return load_model(path, "deployed classifier graph")


def forget_step_input_shape(repository: str | Path) -> tuple[int, int, int]:
    """The image dims (batch excluded) the deployed forget step takes, from its config."""
    config = mcfg.read_config(Path(repository) / FORGET_STEP_MODEL)
    inputs = mcfg.tensor_specs(config.input)
    if len(inputs) != 1 or len(inputs[0].dims) != 3:
        raise FileFormatError(f"{repository}: forget_step must take one [C,H,W] image input, has {inputs}")
    c, h, w = inputs[0].dims
    return (c, h, w)


def step_path(repository: str | Path, version: int, *, model: str = FORGET_STEP_MODEL) -> Path:
    return Path(repository) / model / str(version) / ONNX_FILENAME


def published_step(repository: str | Path, version: int, *, model: str = FORGET_STEP_MODEL) -> onnx.ModelProto:
    """The forget-step graph of a published version (of `model`: forget_step or forget_step_gated)."""
    path = step_path(repository, version, model=model)
    if not path.is_file():
        raise DataNotFoundError(
            f"{model} version {version} has no {path}: the server does not serve this repository, or the "
            "folder was removed"
        )
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxGraphError(f"cannot read the forget step {path}: {exc}") from exc


def step_digest(repository: str | Path, version: int, *, model: str = FORGET_STEP_MODEL) -> str:
    """sha256 of a version's model.onnx: what the journal records of it."""
    return hashlib.sha256(step_path(repository, version, model=model).read_bytes()).hexdigest()


def served_version(client: TritonClient) -> int:
    """The forget_step version the server has READY (the newest if two are READY mid-switch).

    The ensemble must be ready too. (Not is_server_ready(): with strict readiness the
    server reports "not ready" while an old version is still unloading after a switch,
    although the ensemble serves.)
    """
    if not client.is_model_ready(ENSEMBLE_MODEL):
        raise ServerError(f"the server at {client.url} does not have the ensemble {ENSEMBLE_MODEL!r} ready")
    ready = [
        int(e.version)
        for e in client.repository_index()
        if e.name == FORGET_STEP_MODEL and e.state == "READY" and e.version.isdigit()
    ]
    if not ready:
        raise ServerError(f"the server at {client.url} has no READY {FORGET_STEP_MODEL!r} version")
    return max(ready)
