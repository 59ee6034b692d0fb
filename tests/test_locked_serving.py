"""A deployment as an attacker meets it: `fv serve --public` (real supervisor, tritonserver and nginx gateway).

Without the deployment's key, Triton refuses model control (no code runs: no marker
file), the index and the other operator APIs, over HTTP and gRPC; with the key,
`fv switch` and `fv status` work. Through the gateway only the public models answer,
and the request that aborts a bare Triton gets a 4xx while the server stays ready.
"""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from triton_testing import requires_triton
from tritonclient.utils import InferenceServerException

from fv_serving.cli.main import main
from fv_serving.net import free_port
from fv_serving.triton.control import KEY_FILENAME
from fv_serving.triton.deployment import deployed_classifier, published_step
from fv_serving.triton.repository import confirmed_version
from fv_serving.triton.supervisor import RunState, read_run_state
from fv_serving.triton.switch import ensemble_reference
from fv_serving.vectors import ForgetVector, save_vector

pytestmark = [requires_triton, pytest.mark.triton, pytest.mark.gateway]

MARKER_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("code ran")


class TritonPythonModel:
    def initialize(self, args):
        pathlib.Path({marker!r}).write_text("code ran")

    def execute(self, requests):
        return []
"""
PYTHON_MODEL_CONFIG = json.dumps(
    {
        "name": "evil",
        "backend": "python",
        "max_batch_size": 0,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}],
    }
)


@pytest.fixture(scope="module")
def deployment(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, RunState, dict[str, Path]]]:
    root = tmp_path_factory.mktemp("locked")
    vector = class_vector[0]
    files = {
        "a": class_vector[1],
        "b": save_vector(ForgetVector(classifier=vector.classifier, delta=vector.delta * 0.5), root / "b.safetensors"),
    }
    repo = root / "repo"
    build = ["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(files["a"]), "--fused"]
    assert main([*build, "--max-batch-size", "16", "--out", str(repo)]) == 0
    port = free_port("127.0.0.1")
    assert main(["serve", "--repository", str(repo), "--detach", "--public", f"127.0.0.1:{port}"]) == 0
    try:
        yield repo, read_run_state(root / "repo.server"), files
    finally:
        main(["stop", "--repository", str(repo)])


def http(state: RunState) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(state.server.http_url.removeprefix("http://"))


def test_without_the_key_model_control_runs_no_code(deployment, tmp_path: Path) -> None:
    _, state, _ = deployment
    marker = tmp_path / "marker"
    client = http(state)
    files = {"file:1/model.py": MARKER_CODE.format(marker=str(marker)).encode()}
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model("evil", config=PYTHON_MODEL_CONFIG, files=files)
    assert not marker.exists()
    grpc = triton_grpc.InferenceServerClient(state.server.grpc_url.removeprefix("grpc://"))
    with pytest.raises(InferenceServerException, match="restricted"):
        grpc.load_model("evil", config=PYTHON_MODEL_CONFIG, files=files)
    assert not marker.exists()
    for call in (
        lambda: client.unload_model("classifier"),
        lambda: client.load_model("classifier"),
        lambda: client.get_model_repository_index(),
        lambda: client.get_model_config("unlearned"),
        lambda: client.get_inference_statistics(),
        lambda: client.get_system_shared_memory_status(),
        lambda: client.get_log_settings(),
        lambda: client.get_trace_settings(),
        lambda: grpc.unload_model("classifier"),
        lambda: grpc.get_model_repository_index(),
    ):
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    assert client.is_model_ready("classifier") and client.is_model_ready("unlearned")  # nothing was unloaded


def test_with_the_key_the_operator_commands_work(deployment, capsys: pytest.CaptureFixture[str]) -> None:
    repo, _, files = deployment
    assert main(["switch", "--repository", str(repo), "--vector", str(files["b"])]) == 0
    assert main(["status", "--repository", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "switched forget_step" in out and "PROBLEM" not in out
    assert main(["switch", "--repository", str(repo), "--vector", str(files["a"])]) == 0


def test_the_key_stays_private(deployment, capsys: pytest.CaptureFixture[str]) -> None:
    repo, state, _ = deployment
    run_dir = Path(state.server.run_dir)
    key_file = run_dir / KEY_FILENAME
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    for path in [*run_dir.rglob("*"), *repo.rglob("*")]:  # logs, state, gateway config, the repository
        if path.is_file() and path != key_file:
            assert key.encode() not in path.read_bytes(), f"the key leaked into {path}"
    main(["status", "--repository", str(repo), "--json"])
    assert key not in capsys.readouterr().out


def test_the_gateway_exposes_only_the_public_models(deployment) -> None:
    _, state, _ = deployment
    assert state.public_url is not None
    base = state.public_url
    blocked = [
        ("POST", "/v2/models/classifier/infer"),
        ("POST", "/v2/models/forget_step/infer"),
        ("GET", "/v2/models/classifier"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/classifier/unload"),
        ("POST", "/v2/repository/models/evil/load"),
        ("GET", "/v2/models/unlearned/config"),
        ("GET", "/v2/models/stats"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/logging"),
        ("GET", "/v2/trace/setting"),
    ]
    for method, path in blocked:
        request = urllib.request.Request(base + path, data=b"{}" if method == "POST" else None, method=method)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code in (403, 404), path
        assert "error" in json.loads(refused.value.read()), path


def test_the_crashing_request_gets_a_4xx_and_the_server_stays_ready(deployment) -> None:
    repo, state, _ = deployment
    body = json.dumps(
        {"inputs": [{"name": "image", "shape": [64, 1, 28000, 28000], "datatype": "FP32", "data": [0.5]}]}
    ).encode()
    request = urllib.request.Request(f"{state.public_url}/v2/models/unlearned/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert 400 <= refused.value.code < 500 and "error" in json.loads(refused.value.read())
    client = http(state)  # (readiness is strict: it dips while an old forget_step version unloads after a switch)
    assert client.is_server_live() and client.is_model_ready("unlearned")
    assert read_run_state(repo.parent / "repo.server").server.pid == state.server.pid  # not restarted either


def test_answers_through_the_gateway_name_their_vector(deployment) -> None:
    repo, state, _ = deployment
    client = triton_http.InferenceServerClient(state.public_url.removeprefix("http://"))
    images = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    tensor = triton_http.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer("unlearned", [tensor])
    version = confirmed_version(repo)
    expected = ensemble_reference(deployed_classifier(repo), published_step(repo, version), images)
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-4)
    ids = {v.decode() for v in result.as_numpy("vector_id").ravel()}
    from fv_serving.triton.repository import read_forget_step_metadata

    assert ids == {read_forget_step_metadata(repo, version)["vector_id"]}
    assert os.environ.get("FV_ADMIN_KEY") is None  # the gateway path needs no key
