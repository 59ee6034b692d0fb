"""ORT runner: a Triton python-backend model that runs the ONNX graph beside it with onnxruntime.

The Triton bundled in nvidia-pytriton has no onnxruntime backend, so on the embedded
default every ONNX step (classifier, forget step, fused graph) is served by this file,
copied into the step's version folder next to `model.onnx`. Inputs, outputs and
batching come from the model's config.pbtxt, so one file serves every graph.

It runs inside Triton's python-backend stub, whose interpreter finds onnxruntime and
numpy through the `python3` first on PATH (the server launcher puts the venv there).

Per execute() call, all requests that Triton's dynamic batcher hands over are
concatenated into one ORT run and the outputs are split back per request. A request
that cannot be read gets its own error response; a failing batched run is retried
request by request so that one bad request does not fail its neighbours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

ONNX_FILE_KEY = "onnx_file"
THREADS_KEY = "intra_op_threads"


class RequestError(Exception):
    """A request this model cannot serve; reported to its caller only."""


class TritonPythonModel:
    """Triton's entry points: initialize once per instance, execute per batch of requests."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / (parameters.get(ONNX_FILE_KEY) or "model.onnx")

        self.model_name = config["name"]
        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = {t["name"]: pb_utils.triton_string_to_numpy(t["data_type"]) for t in config["input"]}
        self.outputs = [t["name"] for t in config["output"]]
        self.session = ort.InferenceSession(
            str(onnx_path),
            _session_options(int(parameters.get(THREADS_KEY) or 1)),
            providers=_providers(args),
        )
        pb_utils.Logger.log_info(
            f"ort_runner {self.model_name!r}: loaded {onnx_path} with {self.session.get_providers()}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        readable: list[tuple[int, dict[str, np.ndarray]]] = []
        for index, request in enumerate(requests):
            try:
                readable.append((index, self._read_inputs(request)))
            except RequestError as exc:
                responses[index] = _error_response(str(exc))
        if not readable:
            return responses

        try:
            results = self._run_together([feeds for _, feeds in readable])
        except Exception:  # one bad request must not fail the others: retry them one by one
            results = [self._run_alone(feeds) for _, feeds in readable]
        for (index, _), result in zip(readable, results, strict=True):
            responses[index] = result
        return responses

    def finalize(self) -> None:
        self.session = None

    # -- helpers -----------------------------------------------------------------------------------

    def _read_inputs(self, request: Any) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"{self.model_name}: missing input {name!r}")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise RequestError(f"{self.model_name}: input {name!r} must be {dtype}, got {array.dtype}")
            feeds[name] = array
        return feeds

    def _run_together(self, feeds_list: list[dict[str, np.ndarray]]) -> list[Any]:
        """One ORT run over all requests, outputs split back by each request's batch size."""
        if not self.batching:
            return [self._run_alone(feeds) for feeds in feeds_list]
        if len(feeds_list) == 1:
            return [self._response(self.session.run(self.outputs, feeds_list[0]))]
        first = next(iter(self.inputs))
        sizes = [feeds[first].shape[0] for feeds in feeds_list]
        merged = {name: np.concatenate([feeds[name] for feeds in feeds_list]) for name in self.inputs}
        outputs = self.session.run(self.outputs, merged)
        cuts = np.cumsum(sizes)[:-1]
        per_output = [np.split(output, cuts) for output in outputs]
        return [self._response(parts) for parts in zip(*per_output, strict=True)]

    def _run_alone(self, feeds: dict[str, np.ndarray]) -> Any:
        try:
            return self._response(self.session.run(self.outputs, feeds))
        except Exception as exc:
            return _error_response(f"{self.model_name}: onnxruntime failed: {exc}")

    def _response(self, arrays: Any) -> Any:
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(array)) for name, array in zip(self.outputs, arrays, strict=True)
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Few threads and no spinning: idle ORT threads otherwise burn the cores Triton needs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _providers(args: dict[str, str]) -> list[Any]:
    """CPU, or CUDA on the instance's GPU when the config asks for KIND_GPU."""
    if args.get("model_instance_kind") != "GPU":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            "instance kind GPU needs onnxruntime-gpu (CUDAExecutionProvider) in the stub's Python; "
            f"available: {ort.get_available_providers()}"
        )
    device_id = int(args.get("model_instance_device_id") or 0)
    return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]


def _error_response(message: str) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
