"""Talking to a running Triton server: inference, model control, readiness and statistics.

A thin layer over tritonclient's HTTP and gRPC clients (chosen by the URL scheme or
`protocol`), so that callers get numpy in, numpy out, batches split to the model's
max_batch_size, and one exception type naming the model and the problem instead of
tritonclient's transport-specific errors.

The statistics helpers exist to prove, from the server's own records, what a
forget-vector switch touched. Triton 2.51 exposes no load timestamp (the
`nv_model_load_time` metric came in a later release), but a model that is reloaded
starts with fresh statistics, so a classifier whose inference_count did not drop
across a switch and whose repository-index entry is unchanged was not reloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from google.protobuf import json_format
from tritonclient.grpc.model_config_pb2 import ModelConfig
from tritonclient.utils import InferenceServerException

from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.onnx.graph import ID_OUTPUT
from fv_serving.triton.control import ADMIN_HEADER, GRPC_ADMIN_HEADER
from fv_serving.triton.model_config import TensorSpec

Protocol = Literal["http", "grpc"]

_NUMPY_TO_TRITON = {
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float64): "FP64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.bool_): "BOOL",
}


class InferenceError(ServerError):
    """The server answered a request with an error (bad input, model not ready, backend failure...)."""


#: Images per request when the model's limit cannot be read (its config is locked, or behind a gateway).
FALLBACK_BATCH = 16


@dataclass(frozen=True)
class ModelIO:
    """A served model's inputs and outputs (dims without the batch dim) and its batch limit (None: unknown)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int | None


@dataclass(frozen=True)
class ModelIndexEntry:
    """One row of the repository index: a model version and its state (READY, UNAVAILABLE, ...)."""

    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class ModelStats:
    """Per model version counters from the statistics extension.

    inference_count counts batch items, execution_count backend executions (a batched
    run counts once), success/fail count requests. `last_inference_ms` is a Unix time.
    All of them start from zero when a model version is (re)loaded.
    """

    name: str
    version: str
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success_count: int
    fail_count: int


class TritonClient:
    """A client for one server. `url` is "http://host:port", "grpc://host:port" or "host:port".

    Use as a context manager or call close(): an open keep-alive connection makes the
    server wait (up to its exit timeout) on shutdown.
    """

    def __init__(
        self, url: str, protocol: Protocol | None = None, timeout_s: float = 60.0, admin_key: str | None = None
    ) -> None:
        scheme, sep, address = url.partition("://")
        if not sep:
            scheme, address = protocol or "http", url
        if protocol is not None and scheme != protocol:
            raise InvalidInputError(f"url {url!r} does not match protocol {protocol!r}")
        if scheme not in ("http", "grpc"):
            raise InvalidInputError(f"url scheme must be http or grpc, got {scheme!r} in {url!r}")
        self.url = f"{scheme}://{address}"
        self.protocol: Protocol = "grpc" if scheme == "grpc" else "http"
        self.timeout_s = timeout_s
        # The model-control key travels on every call: harmless on open APIs, needed on locked ones.
        header = GRPC_ADMIN_HEADER if self.protocol == "grpc" else ADMIN_HEADER
        self._headers = {header: admin_key} if admin_key else None
        self._io: dict[str, ModelIO] = {}
        self._client: Any
        if self.protocol == "grpc":
            self._client = triton_grpc.InferenceServerClient(address)
        else:
            self._client = triton_http.InferenceServerClient(
                address, connection_timeout=timeout_s, network_timeout=timeout_s
            )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # health and model control

    def is_server_ready(self) -> bool:
        return bool(self._call("server", lambda: self._client.is_server_ready(headers=self._headers)))

    def is_model_ready(self, model_name: str, version: str = "") -> bool:
        return bool(
            self._call(model_name, lambda: self._client.is_model_ready(model_name, version, headers=self._headers))
        )

    def load_model(self, model_name: str, config: ModelConfig | None = None) -> None:
        """Ask the server to (re)load a model; returns when it is done.

        With `config`, Triton loads the repository's files under that config instead of
        config.pbtxt (not persisted: a restart reads config.pbtxt again). A switch uses it
        to load a version before the repository pins it. A no-op if nothing changed;
        requests keep being served by the old version until the new one is ready.
        """
        self._io.pop(model_name, None)
        text = json_format.MessageToJson(config, preserving_proto_field_name=True) if config is not None else None
        self._call(model_name, lambda: self._client.load_model(model_name, headers=self._headers, config=text))

    def unload_model(self, model_name: str) -> None:
        self._io.pop(model_name, None)
        self._call(model_name, lambda: self._client.unload_model(model_name, headers=self._headers))

    # metadata

    def model_config(self, model_name: str) -> ModelConfig:
        """The config the server actually uses (with its defaults filled in)."""
        data = self._call(
            model_name, lambda: self._client.get_model_config(model_name, headers=self._headers, **self._as_json)
        )
        config = data.get("config", data)  # gRPC wraps it in {"config": ...}
        return json_format.ParseDict(config, ModelConfig(), ignore_unknown_fields=True)

    def model_io(self, model_name: str) -> ModelIO:
        """Input/output names, types and dims from the server's model metadata (cached).

        The batch limit comes from the model config, which only an operator (the key) may
        read; a plain client learns from the metadata that the model batches (-1 first
        dim) and sends FALLBACK_BATCH images per request.
        """
        if model_name not in self._io:
            meta = self._call(
                model_name, lambda: self._client.get_model_metadata(model_name, headers=self._headers, **self._as_json)
            )
            inputs = tuple(_spec(t) for t in meta.get("inputs", []))
            limit: int | None = None
            if self._headers is not None:
                with contextlib.suppress(InferenceError):  # a gateway refuses config reads even with a key
                    limit = self.model_config(model_name).max_batch_size
            elif inputs and inputs[0].dims and inputs[0].dims[0] != -1:
                limit = 0  # the metadata shows no batch dim: not a batching model
            self._io[model_name] = ModelIO(
                name=model_name,
                inputs=inputs,
                outputs=tuple(_spec(t) for t in meta.get("outputs", [])),
                max_batch_size=limit,
            )
        return self._io[model_name]

    def repository_index(self) -> list[ModelIndexEntry]:
        """Every model of the repository with its loaded version and state."""
        data = self._call(
            "repository", lambda: self._client.get_model_repository_index(headers=self._headers, **self._as_json)
        )
        rows = data.get("models", []) if isinstance(data, dict) else data
        return [
            ModelIndexEntry(r["name"], str(r.get("version", "")), r.get("state", ""), r.get("reason", "")) for r in rows
        ]

    def model_statistics(self, model_name: str = "") -> list[ModelStats]:
        """Statistics of every loaded version of `model_name` (of every model if empty)."""
        data = self._call(
            model_name or "server",
            lambda: self._client.get_inference_statistics(model_name, headers=self._headers, **self._as_json),
        )
        return [_stats(s) for s in data.get("model_stats", [])]

    # inference

    def infer(self, model_name: str, images: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Run a batching single-input model over `images` [N, ...]; return its (non-id) output [N, ...].

        The array is sent in chunks of `batch_size` (default and upper bound: the
        model's max_batch_size). Shape and dtype are checked against the model's
        metadata before anything is sent.
        """
        return self._infer_chunks(model_name, images, batch_size)[0]

    def infer_with_ids(
        self, model_name: str, images: np.ndarray, batch_size: int | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """Logits [N, K] and the id of the vector that produced each answer (models with a `vector_id` output)."""
        logits, ids = self._infer_chunks(model_name, images, batch_size)
        if ids is None:
            raise InvalidInputError(f"{model_name}: has no {ID_OUTPUT!r} output, so answers do not name a vector")
        return logits, ids

    def _infer_chunks(
        self, model_name: str, images: np.ndarray, batch_size: int | None
    ) -> tuple[np.ndarray, list[str] | None]:
        io = self.model_io(model_name)
        outputs = [t.name for t in io.outputs if t.name != ID_OUTPUT]
        if len(io.inputs) != 1 or len(outputs) != 1 or io.max_batch_size == 0:
            raise InvalidInputError(
                f"{model_name}: infer() serves batching single-input single-output models (+ {ID_OUTPUT}); this "
                f"one has inputs {[t.name for t in io.inputs]}, outputs {[t.name for t in io.outputs]} and "
                f"max_batch_size {io.max_batch_size} (use infer_raw)"
            )
        spec = io.inputs[0]
        _check_batch(model_name, spec, images)
        limit = io.max_batch_size
        size = batch_size if batch_size is not None else (limit or FALLBACK_BATCH)
        if size < 1 or (limit is not None and size > limit):
            raise InvalidInputError(f"{model_name}: batch_size must be in 1..{limit or 'its limit'}, got {size}")
        named = len(io.outputs) > 1
        logits, ids = [], []
        start = 0
        while start < len(images):
            try:
                out = self.infer_raw(model_name, {spec.name: images[start : start + size]})
            except InferenceError as exc:
                told = _told_batch_limit(str(exc))
                if limit is not None or batch_size is not None or told is None or told >= size:
                    raise
                # The limit was unknown (no key to read the config): the server just said it; use it.
                size = limit = told
                self._io[model_name] = dataclasses.replace(io, max_batch_size=told)
                continue
            logits.append(out[outputs[0]])
            if named:
                ids += [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(out[ID_OUTPUT]).ravel()]
            start += size
        return np.concatenate(logits), (ids if named else None)

    def infer_raw(self, model_name: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request exactly as given (no checks, no splitting); every output by name."""
        module: Any = triton_grpc if self.protocol == "grpc" else triton_http
        tensors = []
        for name, array in inputs.items():
            datatype = _NUMPY_TO_TRITON.get(np.asarray(array).dtype)
            if datatype is None:
                raise InvalidInputError(f"{model_name}: input {name!r} has unsupported dtype {array.dtype}")
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            tensors.append(tensor)
        kwargs: dict[str, Any] = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        result = self._call(
            model_name, lambda: self._client.infer(model_name, tensors, headers=self._headers, **kwargs)
        )
        response = result.get_response(as_json=True) if self.protocol == "grpc" else result.get_response()
        return {out["name"]: result.as_numpy(out["name"]) for out in response.get("outputs", [])}

    # helpers

    @property
    def _as_json(self) -> dict[str, Any]:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def _call(self, what: str, call: Any) -> Any:
        """Every failure of a call becomes one of ours: callers (a switch's rollback) rely on it.

        tritonclient raises InferenceServerException for answers, but a transport that
        breaks mid-call surfaces as whatever its library raises (geventhttpclient's
        HTTPConnectionClosed, gevent's LoopExit, socket errors...): all mean "the server
        could not be reached or stopped answering".
        """
        try:
            return call()
        except InferenceServerException as exc:
            raise InferenceError(f"{what}: {_describe(exc)} (server {self.url})") from exc
        except Exception as exc:
            raise ServerError(
                f"{what}: lost the connection to Triton at {self.url}: {type(exc).__name__}: {exc}"
            ) from exc


#: How Triton and the gateway state a model's batch limit in their refusals.
_BATCH_LIMIT_TOLD = re.compile(r"batch-size must be <= (\d+)|1 <= N <= (\d+)")


def _told_batch_limit(message: str) -> int | None:
    match = _BATCH_LIMIT_TOLD.search(message)
    return int(match.group(1) or match.group(2)) if match else None


def _describe(exc: InferenceServerException) -> str:
    message = exc.message() or str(exc)
    status = exc.status()
    return f"[{status}] {message}" if status else message


def _spec(tensor: Mapping[str, Any]) -> TensorSpec:
    """A metadata tensor (its shape includes the batch dim as -1 when the model batches)."""
    shape = tuple(int(d) for d in tensor.get("shape", []))
    return TensorSpec(tensor["name"], tensor["datatype"], shape)


def _stats(data: Mapping[str, Any]) -> ModelStats:
    inference = data.get("inference_stats", {})
    return ModelStats(
        name=data["name"],
        version=str(data.get("version", "")),
        last_inference_ms=int(data.get("last_inference", 0)),
        inference_count=int(data.get("inference_count", 0)),
        execution_count=int(data.get("execution_count", 0)),
        success_count=int(inference.get("success", {}).get("count", 0)),
        fail_count=int(inference.get("fail", {}).get("count", 0)),
    )


def _check_batch(model_name: str, spec: TensorSpec, images: np.ndarray) -> None:
    """Refuse, before sending, an array the server would reject; say what was expected.

    `spec.dims` is the metadata shape, whose first dim is the batch (-1).
    """
    if not isinstance(images, np.ndarray):
        raise InvalidInputError(f"{model_name}: images must be a numpy array, got {type(images).__name__}")
    expected_dtype = next((d for d, name in _NUMPY_TO_TRITON.items() if name == spec.datatype), None)
    if images.dtype != expected_dtype:
        raise InvalidInputError(
            f"{model_name}: input {spec.name!r} must be {expected_dtype} ({spec.datatype}), got {images.dtype}"
        )
    item_dims = spec.dims[1:]
    rank_ok = images.ndim == len(item_dims) + 1
    if not rank_ok or any(d not in (-1, s) for d, s in zip(item_dims, images.shape[1:], strict=True)):
        raise InvalidInputError(
            f"{model_name}: input {spec.name!r} must have shape [N, {', '.join(map(str, item_dims))}], "
            f"got {list(images.shape)}"
        )
    if len(images) == 0:
        raise InvalidInputError(f"{model_name}: images is empty (shape {list(images.shape)})")
