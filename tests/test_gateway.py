"""The gateway (nginx + Lua checks) in front of a real tritonserver, as a hostile caller meets it.

Pure tests check the config and the rendered nginx.conf. Tests marked `gateway` and
`triton` run a real Triton (tiny graphs, a hand-written repository: classifier,
forget_step, the `unlearned` ensemble and `fused`) on loopback and real nginx
processes in front of it. One Triton and one gateway serve the module; tests that
reload, break or stop a gateway start their own.

Reference answers come from onnxruntime on the same graphs and from Triton called
directly, never from the gateway itself.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import inspect
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as triton_http
from gateway_testing import live, requires_nginx
from google.protobuf import text_format
from triton_testing import classifier_onnx, forget_step_onnx, fused_onnx, random_delta, run_onnx
from tritonclient.grpc import model_config_pb2 as mc

from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.gateway import Gateway, GatewayConfig, PublicModel, find_nginx, render_nginx_conf
from fv_serving.gateway.config import JSON_BYTES_PER_VALUE
from fv_serving.gateway.process import group_members
from fv_serving.net import free_port
from fv_serving.triton.server import TritonServer

DELTA = random_delta(3)
MAX_BATCH = 64
INFER = "/v2/models/unlearned/infer"


# -- a tiny repository written by hand (independent of the repository builder) ----------------------

_RUNNER = """backend: "python"
parameters { key: "onnx_file" value { string_value: "model.onnx" } }
parameters { key: "intra_op_threads" value { string_value: "1" } }
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group { kind: KIND_CPU count: 1 }
"""
_IMAGE = 'input { name: "image" data_type: TYPE_FP32 dims: [1, 28, 28] }\n'
_LOGITS = 'output { name: "logits" data_type: TYPE_FP32 dims: [10] }\n'
_ENSEMBLE = f"""name: "unlearned"
platform: "ensemble"
max_batch_size: {MAX_BATCH}
{_IMAGE}{_LOGITS}ensemble_scheduling {{
  step {{ model_name: "forget_step" model_version: -1 input_map {{ key: "image" value: "image" }}
         output_map {{ key: "image_fv" value: "perturbed" }} }}
  step {{ model_name: "classifier" model_version: -1 input_map {{ key: "image" value: "perturbed" }}
         output_map {{ key: "logits" value: "logits" }} }}
}}
"""


def build_repository(root: Path) -> Path:
    runner = resources.files("triton_models").joinpath("ort_runner", "model.py").read_bytes()
    image_fv = 'output { name: "image_fv" data_type: TYPE_FP32 dims: [1, 28, 28] }\n'
    graphs = {
        "classifier": (classifier_onnx(), _IMAGE + _LOGITS),
        "forget_step": (forget_step_onnx(DELTA), _IMAGE + image_fv),
        "fused": (fused_onnx(DELTA), _IMAGE + _LOGITS),
    }
    for name, (graph, io) in graphs.items():
        version = root / name / "1"
        version.mkdir(parents=True)
        onnx.save(graph, version / "model.onnx")
        (version / "model.py").write_bytes(runner)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nmax_batch_size: {MAX_BATCH}\n{io}{_RUNNER}')
    (root / "unlearned" / "1").mkdir(parents=True)
    (root / "unlearned" / "config.pbtxt").write_text(_ENSEMBLE)
    return root


def model_config(repository: Path, name: str) -> mc.ModelConfig:
    return text_format.Parse((repository / name / "config.pbtxt").read_text(), mc.ModelConfig())


def expected_logits(images: np.ndarray) -> np.ndarray:
    """classifier(x + delta): what the ensemble must answer."""
    return run_onnx(fused_onnx(DELTA), image=images)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("gateway-repo"))


@pytest.fixture(scope="module")
def triton(repository: Path) -> Iterator[TritonServer]:
    # Model control left open on purpose: what is refused here is refused by the gateway alone.
    kwargs = {"admin_key": None} if "admin_key" in inspect.signature(TritonServer).parameters else {}
    with TritonServer(repository, ["unlearned", "fused"], **kwargs) as server:
        yield server


@pytest.fixture(scope="module")
def public_model(repository: Path) -> PublicModel:
    return PublicModel.from_model_config(model_config(repository, "unlearned"))


def gateway_config(run_dir: Path, triton: TritonServer, model: PublicModel, **changes: Any) -> GatewayConfig:
    config = GatewayConfig(
        host="127.0.0.1",
        port=free_port("127.0.0.1"),
        upstreams=(f"127.0.0.1:{triton.state.http_port}",),
        models=(model,),
        run_dir=str(run_dir),
    )
    return replace(config, **changes)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, triton: TritonServer, public_model: PublicModel
) -> Iterator[Gateway]:
    with Gateway(gateway_config(tmp_path_factory.mktemp("gateway"), triton, public_model)) as running:
        yield running


# -- HTTP helpers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Caller:
    """Raw HTTP to one address over one keep-alive connection (reopened when the server closes it)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._connection: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        connection = self._connection
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        if response.will_close:
            self.close()
        return answer

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def assert_json_error(answer: Answer, status: int | tuple[int, ...]) -> str:
    """The answer has the expected status and a JSON body {"error": "..."}; returns the message."""
    statuses = (status,) if isinstance(status, int) else status
    assert answer.status in statuses, (answer.status, answer.body[:300])
    assert answer.headers.get("content-type", "").startswith("application/json"), answer.headers
    payload = answer.json()
    assert isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"], payload
    return str(payload["error"])


def json_request(x: np.ndarray, **fields: Any) -> bytes:
    request: dict[str, Any] = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    request.update(fields)
    return json.dumps(request).encode()


def binary_request(x: np.ndarray, *, size: object = "exact", **fields: Any) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request: JSON header (binary_data_size = `size`), then the raw FP32 bytes."""
    tensor = np.ascontiguousarray(x, dtype=np.float32).tobytes()
    size = len(tensor) if size == "exact" else size
    request: dict[str, Any] = {
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": list(x.shape), "parameters": {"binary_data_size": size}}
        ]
    }
    request.update(fields)
    header = json.dumps(request).encode()
    return header + tensor, {"Inference-Header-Content-Length": str(len(header))}


def logits_of(answer: Answer) -> np.ndarray:
    """Logits from a JSON or binary inference response."""
    assert answer.status == 200, answer.body[:300]
    length = answer.headers.get("inference-header-content-length")
    header = json.loads(answer.body[: int(length)] if length else answer.body)
    (output,) = [o for o in header["outputs"] if o["name"] == "logits"]
    if "data" in output:
        return np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    raw = answer.body[int(length) :]
    return np.frombuffer(raw[: output["parameters"]["binary_data_size"]], dtype=np.float32).reshape(output["shape"])


def triton_client(url: str) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(url.removeprefix("http://"))


def client_infer(url: str, x: np.ndarray, *, binary: bool, model: str = "unlearned") -> np.ndarray:
    client = triton_client(url)
    try:
        tensor = triton_http.InferInput("image", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x, binary_data=binary)
        output = triton_http.InferRequestedOutput("logits", binary_data=binary)
        return np.asarray(client.infer(model, [tensor], outputs=[output]).as_numpy("logits"))
    finally:
        client.close()


def worker_pids(gateway: Gateway) -> set[int]:
    return {p for p in group_members(gateway.pid) if p != gateway.pid}


# ======================================================================================================
# pure: config, validation, rendering
# ======================================================================================================


def test_public_model_from_triton_config_reads_input_dims_batch_and_outputs(tmp_path: Path) -> None:
    config = text_format.Parse(_ENSEMBLE, mc.ModelConfig())
    model = PublicModel.from_model_config(config)
    assert (model.name, model.input_name, model.datatype) == ("unlearned", "image", "FP32")
    assert (model.dims, model.max_batch_size, model.outputs) == ((1, 28, 28), MAX_BATCH, ("logits",))
    assert model.upstream == "unlearned"
    renamed = PublicModel.from_model_config(config, name="mnist", upstream_model="unlearned")
    assert (renamed.name, renamed.upstream) == ("mnist", "unlearned")

    config.max_batch_size = 0
    with pytest.raises(InvalidInputError, match="max_batch_size is 0"):
        PublicModel.from_model_config(config)
    config.max_batch_size = 8
    config.input[0].dims[1] = -1
    with pytest.raises(InvalidInputError, match="variable dims"):
        PublicModel.from_model_config(config)


def _model(**changes: Any) -> PublicModel:
    fields: dict[str, Any] = {
        "name": "unlearned",
        "input_name": "image",
        "dims": (1, 28, 28),
        "max_batch_size": 64,
        "outputs": ("logits",),
    }
    return PublicModel(**{**fields, **changes})


def _gateway(**changes: Any) -> GatewayConfig:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 8080,
        "upstreams": ("127.0.0.1:8000",),
        "models": (_model(),),
        "run_dir": "/srv/fv-gateway",
    }
    return GatewayConfig(**{**fields, **changes})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _model(name='un"learned'), "PublicModel.name"),
        (lambda: _model(name="stats"), "Triton API path"),
        (lambda: _model(input_name="im age"), "input_name"),
        (lambda: _model(datatype="INT8"), "datatype must be one of FP32"),
        (lambda: _model(dims=(1, 0, 28)), "dims"),
        (lambda: _model(dims=()), "dims"),
        (lambda: _model(max_batch_size=0), "max_batch_size"),
        (lambda: _model(max_batch_size=True), "max_batch_size"),
        (lambda: _model(outputs=()), "outputs"),
        (lambda: _model(outputs=("logits", "logits")), "unique"),
        (lambda: _model(pixel_range=(1.0, 0.0)), "low < high"),
        (lambda: _model(pixel_range=(0.0, float("inf"))), "finite"),
        (lambda: _model(upstream_model="a/b"), "upstream_model"),
        (lambda: _model(dims=(3, 4096, 4096)), "lower max_batch_size"),
        (lambda: _gateway(host="localhost"), "GatewayConfig.host"),
        (lambda: _gateway(port=0), "GatewayConfig.port"),
        (lambda: _gateway(upstreams=()), "at least one"),
        (lambda: _gateway(upstreams=("127.0.0.1",)), "host:port"),
        (lambda: _gateway(upstreams=("a;b:80",)), "host:port"),
        (lambda: _gateway(upstreams=("h:1", "h:1")), "unique"),
        (lambda: _gateway(models=()), "non-empty"),
        (lambda: _gateway(models=(_model(), _model())), "public names must be unique"),
        (lambda: _gateway(run_dir="relative/dir"), "run_dir"),
        (lambda: _gateway(run_dir="/srv/a b"), "run_dir"),
        (lambda: _gateway(run_dir="/srv/x;include /etc/passwd"), "run_dir"),
        (lambda: _gateway(run_dir="/srv/../etc"), "run_dir"),
        (lambda: _gateway(worker_user=("root", "root")), "must not be root"),
        (lambda: _gateway(workers=0), "workers"),
    ],
)
def test_config_refuses_bad_values_naming_the_field(build: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build()


def test_config_json_round_trip_and_unknown_fields() -> None:
    config = _gateway(models=(_model(), _model(name="fused", pixel_range=None, upstream_model="fused_v2")))
    assert GatewayConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(InvalidInputError, match="unknown fields"):
        GatewayConfig.from_json({**config.to_json(), "admin_key": "x"})


def test_body_cap_fits_a_full_batch_as_binary_and_as_json_text() -> None:
    model = _model(max_batch_size=8)
    values = model.max_batch_size * model.values_per_item
    worst = -1.2345678901234567e-05  # the longest repr of a float
    as_json = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [8, 1, 28, 28], "data": [worst] * values}]}
    )
    assert len(as_json) <= model.max_body_bytes
    assert values * 4 < model.max_body_bytes
    assert model.max_body_bytes <= values * JSON_BYTES_PER_VALUE + 64 * 1024  # and not much more


def test_rendered_conf_is_deterministic_and_routes_only_public_paths() -> None:
    config = _gateway(models=(_model(), _model(name="mnist", upstream_model="unlearned_v2")))
    text = render_nginx_conf(config)
    assert text == render_nginx_conf(config)
    assert "location = /v2/models/mnist/infer {" in text
    # the model routes rewrite to the live route (routes.lua) and proxy that URI as is
    assert 'require("fv_gateway_routes").route("mnist", "/infer")' in text
    assert 'require("fv_gateway_routes").route("mnist", "/ready")' in text
    assert '"mnist":{"allowed":["unlearned_v2"],"default":"unlearned_v2"}' in text
    # only the five routes per public model (health x2, metadata, ready, infer) go upstream
    proxied = [line.strip() for line in text.splitlines() if line.strip().startswith("proxy_pass ")]
    assert sorted(set(proxied)) == [
        "proxy_pass http://fv_triton/v2/health/live;",
        "proxy_pass http://fv_triton/v2/health/ready;",
        "proxy_pass http://fv_triton;",
    ]
    assert len(proxied) == 2 + 3 * 2
    assert text.count("rewrite_by_lua_block") == 3 * 2
    assert "user nobody nogroup;" in text
    assert "proxy_pass_request_headers off;" in text
    # no admin listener unless asked for, and then no key in the file, only its variable's name
    assert "/fv/" not in text and "FV_ADMIN_KEY" not in text


@pytest.mark.gateway
def test_missing_nginx_or_modules_name_the_debian_packages(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="apt-get install nginx-light libnginx-mod-http-lua lua-cjson") as info:
        find_nginx(executable=tmp_path / "no-nginx")
    assert "\n" not in str(info.value)
    with pytest.raises(ServerError, match=r"ngx_http_lua_module\.so") as info:
        find_nginx(modules_dir=tmp_path)
    assert "apt-get install" in str(info.value)


@pytest.mark.gateway
def test_check_lua_ships_as_package_data() -> None:
    source = resources.files("fv_serving.gateway").joinpath("check.lua").read_text()
    assert "function M.check" in source
    routes = resources.files("fv_serving.gateway").joinpath("routes.lua").read_text()
    assert "function M.route" in routes and "function M.put" in routes


@pytest.mark.gateway
@requires_nginx
def test_nginx_accepts_the_rendered_conf(tmp_path: Path) -> None:
    config = _gateway(run_dir=str(tmp_path / "run"), models=(_model(), _model(name="fused", pixel_range=None)))
    Gateway(config).validate()
    assert not Path(config.conf_path).exists()  # validation writes only a candidate, then removes it


# ======================================================================================================
# live: a real Triton behind a real gateway
# ======================================================================================================


@live
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("batch", [1, 7, MAX_BATCH])
def test_public_model_answers_like_direct_triton(
    triton: TritonServer, gateway: Gateway, batch: int, binary: bool
) -> None:
    x = images(batch, seed=batch)
    through = client_infer(gateway.url, x, binary=binary)
    direct = client_infer(triton.http_url, x, binary=binary)
    np.testing.assert_array_equal(through, direct)
    np.testing.assert_allclose(through, expected_logits(x), rtol=1e-4, atol=1e-4)


@live
def test_valid_request_forms_are_accepted(gateway: Gateway) -> None:
    """Everything Triton accepts for this model and the checks allow: nested or flat data, binary, params."""
    x = images(3, seed=11)
    expected = expected_logits(x)
    caller = Caller(gateway.url)
    nested = json.dumps(
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [3, 1, 28, 28], "data": x.tolist()}]}
    )
    body, headers = binary_request(x)
    forms: dict[str, tuple[bytes, dict[str, str]]] = {
        "flat json": (json_request(x), {}),
        "nested json": (nested.encode(), {}),
        "binary": (body, headers),
        "binary, binary output": binary_request(x, outputs=[{"name": "logits", "parameters": {"binary_data": True}}]),
        "binary_data_output": binary_request(x, parameters={"binary_data_output": True}),
        "json, json output": (json_request(x, outputs=[{"name": "logits", "parameters": {"binary_data": False}}]), {}),
        "id": (json_request(x, id="request-7"), {}),
        "header length = body": (json_request(x), {"Inference-Header-Content-Length": str(len(json_request(x)))}),
        "identity encoding": (json_request(x), {"Content-Encoding": "identity"}),
    }
    for name, (request_body, request_headers) in forms.items():
        answer = caller.request("POST", INFER, request_body, request_headers)
        np.testing.assert_allclose(logits_of(answer), expected, rtol=1e-4, atol=1e-4, err_msg=name)
    assert caller.request("POST", INFER, json_request(x, id="request-7")).json()["id"] == "request-7"

    # a full batch as JSON with the longest numbers: the body cap leaves room for it
    full = np.full((MAX_BATCH, 1, 28, 28), 1.2345678e-05, dtype=np.float32)
    answer = caller.request("POST", INFER, json_request(full.astype(np.float64) + 1e-17))
    np.testing.assert_allclose(logits_of(answer), expected_logits(full), rtol=1e-4, atol=1e-4)

    # chunked transfer encoding
    connection = http.client.HTTPConnection(caller.host, caller.port, timeout=30)
    connection.request("POST", INFER, body=iter([json_request(x)]), encode_chunked=True)
    chunked = connection.getresponse()
    assert chunked.status == 200
    connection.close()
    caller.close()


@live
def test_health_metadata_and_ready_routes(gateway: Gateway, triton: TritonServer) -> None:
    caller = Caller(gateway.url)
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/unlearned/ready"):
        assert caller.request("GET", path).status == 200, path
        assert_json_error(caller.request("POST", path, b"{}"), 405)
    metadata = caller.request("GET", "/v2/models/unlearned").json()
    assert metadata == triton_client(triton.http_url).get_model_metadata("unlearned")
    assert_json_error(caller.request("GET", INFER), 405)
    assert_json_error(caller.request("PUT", INFER, json_request(images(1))), 405)
    caller.close()


@live
@pytest.mark.skipif(os.geteuid() != 0, reason="nginx changes its workers' user only when started as root")
def test_workers_started_by_root_do_not_run_as_root(gateway: Gateway) -> None:
    assert _uid(gateway.pid) == 0
    workers = worker_pids(gateway)
    assert len(workers) == gateway.config.workers
    assert all(_uid(pid) != 0 for pid in workers)


def _uid(pid: int) -> int:
    (line,) = [x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:")]
    return int(line.split()[2])  # effective uid


BLOCKED = [
    ("POST", "/v2/models/classifier/infer", "infer"),
    ("POST", "/v2/models/forget_step/infer", "infer"),
    ("POST", "/v2/models/fused/infer", "infer"),
    ("POST", "/v2/models/classifier/versions/1/infer", "infer"),
    ("POST", "/v2/models/unlearned/versions/1/infer", "infer"),
    ("GET", "/v2/models/classifier", None),
    ("GET", "/v2/models/classifier/ready", None),
    ("POST", "/v2/repository/index", b"{}"),
    ("POST", "/v2/repository/models/classifier/unload", b"{}"),
    ("POST", "/v2/repository/models/forget_step/unload", b'{"parameters":{"unload_dependents":true}}'),
    ("POST", "/v2/repository/models/unlearned/load", b"{}"),
    ("POST", "/v2/repository/models/evil/load", "load-override"),
    ("GET", "/v2/models/unlearned/config", None),
    ("GET", "/v2/models/classifier/config", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/models/unlearned/stats", None),
    ("GET", "/v2/models/unlearned/versions/1/stats", None),
    ("GET", "/v2/systemsharedmemory/status", None),
    ("POST", "/v2/systemsharedmemory/region/r0/register", b'{"key":"/etc","offset":0,"byte_size":4096}'),
    ("POST", "/v2/systemsharedmemory/unregister", b"{}"),
    ("GET", "/v2/cudasharedmemory/status", None),
    ("GET", "/v2/trace/setting", None),
    ("POST", "/v2/trace/setting", b'{"trace_level":["TIMESTAMPS"]}'),
    ("GET", "/v2/models/unlearned/trace/setting", None),
    ("GET", "/v2/logging", None),
    ("POST", "/v2/logging", b'{"log_verbose_level":1}'),
    ("GET", "/v2", None),
    ("GET", "/v2/", None),
    ("GET", "/metrics", None),
    ("GET", "/", None),
    ("GET", "/v2/health", None),
    ("GET", "/v2/models/unlearned/infer/../../classifier", None),
    ("GET", "/v2/models/classifier%2Fready", None),
    ("GET", "/V2/REPOSITORY/INDEX", None),
]


@live
def test_internal_models_and_admin_apis_are_refused(gateway: Gateway, triton: TritonServer, tmp_path: Path) -> None:
    caller = Caller(gateway.url)
    override = json.dumps(
        {
            "parameters": {
                "config": json.dumps({"name": "evil", "backend": "python", "max_batch_size": 0}),
                "file:1/model.py": "aW1wb3J0IG9zOyBvcy5zeXN0ZW0oJ3RvdWNoIC90bXAvcHduZWQnKQ==",
            }
        }
    ).encode()
    before = triton_client(triton.http_url).get_model_repository_index()
    bodies = {"infer": json_request(images(1)), "load-override": override}
    for method, path, payload in BLOCKED:
        body = bodies[payload] if isinstance(payload, str) else payload
        message = assert_json_error(caller.request(method, path, body), (403, 404))
        assert "not exposed" in message or message.startswith(("unknown", "not found")), (path, message)
    caller.close()
    # nothing reached Triton: same models, all still loaded
    direct = triton_client(triton.http_url)
    assert direct.get_model_repository_index() == before
    assert all(direct.is_model_ready(m) for m in ("classifier", "forget_step", "unlearned", "fused"))


@live
def test_the_request_that_aborts_triton_is_refused(gateway: Gateway, triton: TritonServer) -> None:
    caller = Caller(gateway.url)
    crash = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [64, 1, 28000, 28000], "data": [0.5]}]}
    message = assert_json_error(caller.request("POST", INFER, json.dumps(crash).encode()), 400)
    assert "shape" in message and "28000" in message
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": [64, 1, 28000, 28000],
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    answer = caller.request("POST", INFER, header + b"\0\0\0\0", {"Inference-Header-Content-Length": str(len(header))})
    assert_json_error(answer, 400)
    caller.close()
    assert triton.is_running()
    assert triton_client(triton.http_url).is_server_ready()
    x = images(2, seed=5)
    np.testing.assert_allclose(client_infer(gateway.url, x, binary=True), expected_logits(x), rtol=1e-4, atol=1e-4)


@live
def test_pixel_range_refusal_names_the_problem(gateway: Gateway) -> None:
    caller = Caller(gateway.url)
    x = images(1) * 255
    message = assert_json_error(caller.request("POST", INFER, json_request(x)), 400)
    assert "pixel values must be in [0,1]" in message and "x/255" in message
    assert f"got {float(x.ravel()[0]):.9g} at flat index 0" in message
    body, headers = binary_request(x)
    assert "x/255" in assert_json_error(caller.request("POST", INFER, body, headers), 400)
    y = images(1)
    y[0, 0, 3, 4] = np.nan
    body, headers = binary_request(y)
    message = assert_json_error(caller.request("POST", INFER, body, headers), 400)
    assert "NaN" in message and str(3 * 28 + 4) in message
    caller.close()


# -- hostile requests, generated --------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    category: str
    body: bytes
    headers: dict[str, str]
    status: int


def _input(**fields: Any) -> dict[str, Any]:
    x = images(1)
    base: dict[str, Any] = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x.ravel().tolist()}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _json(request: Any) -> bytes:
    return json.dumps(request).encode()


def hostile_requests(rng: np.random.Generator, cap: int) -> list[Hostile]:
    """At least 500 malformed requests over the categories a hostile caller tries, each with its due status."""
    cases: list[Hostile] = []

    def add(category: str, body: bytes, headers: dict[str, str] | None = None, status: int = 400) -> None:
        cases.append(Hostile(category, body, headers or {}, status))

    good = _json({"inputs": [_input()]})
    x = images(2, seed=9)

    # invalid JSON: truncations, garbage, non-JSON number literals, trailing bytes
    for cut in rng.integers(1, len(good) - 1, size=50):
        add("invalid json", good[: int(cut)])
    for n in rng.integers(1, 200, size=10):
        add("invalid json", rng.integers(0, 256, size=int(n), dtype=np.uint8).tobytes())
    for token in ("NaN", "nan", "Infinity", "-Infinity", "0x10", "1e", "+1", ".5", "01"):
        add("invalid json", good.replace(b'"data": [', f'"data": [{token}, '.encode(), 1))
    for junk in (b"x", b"{}", b'{"a":1}', b"\0"):
        add("invalid json", good + junk)
    add("invalid json", b"{'inputs': []}")
    add("invalid json", b"[" * 100 + b"]" * 100)

    # not an inference request at the top level
    for top in (
        5,
        "x",
        None,
        [],
        [_input()],
        {"inputs": [_input()], "sequence_id": 1},
        {"inputs": [_input()], "priority": 1},
    ):
        add("unknown fields", _json(top))
    for field in ("contents", "extra", "shared_memory_region"):
        add("unknown fields", _json({"inputs": [_input(**{field: 1})]}))

    # datatype
    for datatype in ("FP16", "FP64", "INT8", "UINT8", "BYTES", "BF16", "fp32", "", 32, None, ["FP32"]):
        add("wrong datatype", _json({"inputs": [_input(datatype=datatype)]}))
    add("wrong datatype", _json({"inputs": [_input(datatype=_DROP)]}))

    # shapes: zero, negative, too big, huge, wrong dims, fractional, wrong rank, wrong type
    bad_shapes: list[Any] = [
        [0, 1, 28, 28],
        [-1, 1, 28, 28],
        [65, 1, 28, 28],
        [2**40, 1, 28, 28],
        [2**63, 1, 28, 28],
        [64, 1, 28000, 28000],
        [1, 3, 28, 28],
        [1, 1, 28, 27],
        [1, 1, 29, 28],
        [1, 0, 28, 28],
        [1, -1, 28, 28],
        [1.5, 1, 28, 28],
        [1, 1, 28, 28.5],
        ["1", 1, 28, 28],
        [True, 1, 28, 28],
        [None, 1, 28, 28],
        [1, 28, 28],
        [784],
        [1, 1, 1, 28, 28],
        [],
        "1,1,28,28",
        784,
        {"n": 1},
        [[1], 1, 28, 28],
        [1e300, 1, 28, 28],
        # as many values as the data holds (784), in the wrong dims: only the shape check refuses these
        [1, 1, 784, 1],
        [1, 28, 28, 1],
        [1, 1, 1, 784],
        [1, 784, 1, 1],
        [1, 4, 14, 14],
    ]
    for shape in bad_shapes:
        add("wrong shape", _json({"inputs": [_input(shape=shape)]}))
    for _ in range(40):
        shape = [int(v) for v in rng.integers(-(2**31), 2**31, size=4)]
        shape[1:] = shape[1:] if rng.random() < 0.5 else [1, 28, 28]
        if not (1 <= shape[0] <= MAX_BATCH and shape[1:] == [1, 28, 28]):
            add("wrong shape", _json({"inputs": [_input(shape=shape, data=[0.5])]}))
    add("wrong shape", _json({"inputs": [_input(shape=_DROP)]}))

    # inputs missing, empty, extra, misnamed
    for inputs in (_DROP, [], None, {}, {"image": _input()}, "image", [None], [5], [[]]):
        request = {} if inputs is _DROP else {"inputs": inputs}
        add("missing input", _json(request))
    for second in (_input(), _input(name="image2"), _input(name="perturbed"), {}):
        add("extra input", _json({"inputs": [_input(), second]}))
    for name in ("IMAGE", "image ", "perturbed", "", None, 1, "image\u0000"):
        add("wrong input name", _json({"inputs": [_input(name=name)]}))

    # non-finite and out-of-range values in JSON (1e999 is valid JSON text: it parses as infinity)
    for _ in range(40):
        values = [repr(v) for v in images(1, seed=int(rng.integers(1000))).ravel().tolist()]
        values[int(rng.integers(784))] = str(rng.choice(["1e999", "-1e999", "3.5e38", "-1e309"]))
        data = ("[" + ", ".join(values) + "]").encode()
        add("nan/inf json", _json({"inputs": [_input(data=[0])]}).replace(b"[0]", data, 1))
    for value in (255.0, 1.0001, -0.01, 2.0, 1e30, -1e-7):
        values = images(1).ravel().tolist()
        values[int(rng.integers(784))] = value
        add("out of range json", _json({"inputs": [_input(data=values)]}))
    for _ in range(20):  # just below 0 or just above 1, up to absurd
        values = images(1).ravel().tolist()
        offset = float(10 ** rng.uniform(-6, 30))
        values[int(rng.integers(784))] = -offset if rng.random() < 0.5 else 1 + offset
        add("out of range json", _json({"inputs": [_input(data=values)]}))

    # non-finite and out-of-range values in binary: quiet, signalling, negative NaNs, infinities
    patterns = [0x7FC00000, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x7F800000, 0xFF800000]
    for _ in range(60):
        y = x.copy()
        flat = y.reshape(-1).view(np.uint32)
        flat[int(rng.integers(flat.size))] = patterns[int(rng.integers(len(patterns)))]
        add("nan/inf binary", *binary_request(y))
    for value in (255.0, 1.0000001, -1e-30, 3.4e38, -2.0):
        y = x.copy()
        y.reshape(-1)[int(rng.integers(y.size))] = value
        add("out of range binary", *binary_request(y))

    # bodies over the cap (nginx answers before reading them)
    for extra in (1, 1000, 10**6):
        add("oversize", b"{" + b" " * (cap + extra - 2) + b"}", status=413)
    add("oversize", b"0" * (cap + 1), {"Inference-Header-Content-Length": "10"}, status=413)

    # Inference-Header-Content-Length lying
    body, headers = binary_request(x)
    header_length = int(headers["Inference-Header-Content-Length"])
    for declared in (
        str(len(body) + 1),
        str(len(body) * 2),
        str(2**40),
        "99999999999999999999",
        "-1",
        "-100",
        "abc",
        "",
        " ",
        "12.0",
        "0x10",
        "1e3",
        "0",
        str(header_length - 1),
        str(header_length - 10),
        str(header_length + 1),
        str(header_length + 100),
        f"{header_length},{header_length}",
    ):
        add("header length lies", body, {"Inference-Header-Content-Length": declared})
    for cut in rng.integers(1, header_length - 1, size=25):
        add("header length lies", body, {"Inference-Header-Content-Length": str(int(cut))})
    add("header length lies", body)  # binary bytes but no header length: the whole body is not JSON

    # binary_data_size lying, and binary bytes that do not match it
    size = x.nbytes
    for declared in (size + 4, size - 4, size * 2, 0, 4, -4, 1.5, "6272", None, True, 2**53):
        add("binary size lies", *binary_request(x, size=declared))
    for trailing in (b"\0", b"\0" * 4, x.tobytes()[:8]):
        b, h = binary_request(x)
        add("binary size lies", b + trailing, h)
    for missing in (1, 4, size // 2):
        b, h = binary_request(x)
        add("binary size lies", b[:-missing], h)
    b, h = binary_request(x)
    header = json.loads(b[: int(h["Inference-Header-Content-Length"])])
    header["inputs"][0]["data"] = [0.5] * x.size
    both = _json(header)
    add("binary size lies", both + x.tobytes(), {"Inference-Header-Content-Length": str(len(both))})
    add("binary size lies", good + x.tobytes(), {"Inference-Header-Content-Length": str(len(good))})

    # compressed bodies (Triton would decompress them: a bomb)
    for encoding, compress in (
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("GZIP", gzip.compress),
        ("br", lambda d: d),
        ("gzip, identity", gzip.compress),
        ("identity, gzip", gzip.compress),
        ("compress", lambda d: d),
        ("x-gzip", gzip.compress),
    ):
        add("compressed", compress(good), {"Content-Encoding": encoding}, status=415)
    bomb = gzip.compress(b" " * 10**7)
    add("compressed", bomb, {"Content-Encoding": "gzip"}, status=415)

    # shared-memory and other parameters
    shm = {"shared_memory_region": "r0", "shared_memory_byte_size": 3136, "shared_memory_offset": 0}
    for key, value in shm.items():
        add("parameters", _json({"inputs": [_input(data=_DROP, parameters={key: value})]}))
        add("parameters", _json({"inputs": [_input(parameters={key: value})]}))
        add("parameters", _json({"inputs": [_input()], "outputs": [{"name": "logits", "parameters": {key: value}}]}))
        add("parameters", _json({"inputs": [_input()], "parameters": {key: value}}))
    for params in (
        {"binary_data_output": "yes"},
        {"binary_data_output": 1},
        {"sequence_id": 5},
        {"priority": 0},
        {"timeout": 1},
        {"headers": {"a": "b"}},
        {"binary_data_output": True, "x": 1},
        [],
        "p",
    ):
        add("parameters", _json({"inputs": [_input()], "parameters": params}))
    for params in ({"binary_data": "true"}, {"classification": 3}, {"binary_data": True, "x": 1}, [1]):
        add("parameters", _json({"inputs": [_input()], "outputs": [{"name": "logits", "parameters": params}]}))
    add("parameters", _json({"inputs": [_input(parameters={"binary_data_size": 3136, "x": 1})]}))
    add("parameters", _json({"inputs": [_input(parameters="binary")]}))

    # outputs that do not exist, or are internal tensors, or malformed
    for outputs in (
        [{"name": "nope"}],
        [{"name": "image_fv"}],
        [{"name": "perturbed"}],
        [{"name": ""}],
        [{"name": None}],
        [{"name": "logits"}, {"name": "logits"}],
        [{"name": "logits"}, {"name": "vector_id"}],
        {"name": "logits"},
        "logits",
        [5],
        [{"name": "logits", "extra": 1}],
        [{}],
    ):
        add("unknown outputs", _json({"inputs": [_input()], "outputs": outputs}))

    # data with the wrong count, wrong nesting or wrong element types
    values = images(1).ravel().tolist()
    nested = images(1).tolist()  # [1][1][28][28]
    for data in (
        values[:-1],
        [*values, 0.5],
        values[:100],
        [],
        [[]],
        nested[0][0][:-1],
        [nested[0], nested[0]],
        [[[[[0.5] * 784]]]],
        [[[[[v] for v in values]]]],
        [[]] * 784,
        [{}] * 784,
        [*values[:-1], []],
        [*values[:-1], "0.5"],
        [*values[:-1], None],
        [*values[:-1], True],
        [*values[:-1], {"v": 0.5}],
        "0.5" * 784,
        None,
        0.5,
        {"0": 0.5},
    ):
        add("wrong data", _json({"inputs": [_input(data=data)]}))
    for _ in range(30):
        n = int(rng.integers(1, 4))
        data = images(n).tolist()
        cut = int(rng.integers(n)), int(rng.integers(28))
        del data[cut[0]][0][cut[1]]  # one row short
        add("wrong data", _json({"inputs": [_input(shape=[n, 1, 28, 28], data=data)]}))
    for _ in range(30):  # declared batch larger than the data
        n = int(rng.integers(2, MAX_BATCH + 1))
        add("wrong data", _json({"inputs": [_input(shape=[n, 1, 28, 28], data=values * (n - 1))]}))

    # request id abuse
    for request_id in (5, None, ["a"], "x" * 257, {"a": 1}):
        add("request id", _json({"id": request_id, "inputs": [_input()]}))

    # an empty body, with and without a declared header length
    add("empty", b"")
    add("empty", b"", {"Inference-Header-Content-Length": "0"})
    return cases


def unexpected_answers(gateway: Gateway, cases: list[Hostile]) -> list[str]:
    """Send every case over one keep-alive connection; describe each answer that is not the due JSON error."""
    caller = Caller(gateway.url)
    wrong: list[str] = []
    for number, case in enumerate(cases):
        answer = caller.request("POST", INFER, case.body, case.headers)
        try:
            assert_json_error(answer, case.status)
        except (AssertionError, ValueError) as exc:
            wrong.append(f"#{number} {case.category}: {exc}")
    caller.close()
    return wrong


@live
def test_hundreds_of_hostile_requests_are_refused_cleanly(
    tmp_path: Path, gateway: Gateway, triton: TritonServer, public_model: PublicModel
) -> None:
    cases = hostile_requests(np.random.default_rng(2026), public_model.max_body_bytes)
    assert len(cases) >= 500
    categories = Counter(c.category for c in cases)
    assert len(categories) >= 17 and min(categories.values()) >= 2, categories

    # 1. by the gateway alone: no Triton behind it, so a request that got through would answer 502
    alone = gateway_config(tmp_path / "alone", triton, public_model, upstreams=(f"127.0.0.1:{free_port('127.0.0.1')}",))
    with Gateway(alone) as lonely:
        wrong = unexpected_answers(lonely, cases)
    assert not wrong, f"{len(wrong)} of {len(cases)} hostile requests were not refused:\n" + "\n".join(wrong[:20])

    # 2. in front of the real Triton: the same answers, and nothing crashes
    workers, triton_pid = worker_pids(gateway), triton.pid
    started = time.monotonic()
    wrong = unexpected_answers(gateway, cases)
    assert not wrong, f"{len(wrong)} of {len(cases)} hostile requests got an unexpected answer:\n" + "\n".join(
        wrong[:20]
    )
    assert time.monotonic() - started < 120
    assert triton.is_running() and triton.pid == triton_pid
    assert triton_client(triton.http_url).is_server_ready()
    assert worker_pids(gateway) == workers  # a crashed nginx worker would have been respawned with a new pid
    log = Path(gateway.config.error_log).read_text()
    assert "exited on signal" not in log and "[alert]" not in log and "check failed" not in log
    for binary in (True, False):  # and correct answers afterwards
        x = images(5, seed=77)
        np.testing.assert_allclose(
            client_infer(gateway.url, x, binary=binary), expected_logits(x), rtol=1e-4, atol=1e-4
        )


# -- replicas, reload, lifecycle ----------------------------------------------------------------------


@contextlib.contextmanager
def dying_replica() -> Iterator[tuple[str, list[int]]]:
    """A 'replica' that reads a request and drops the connection: a Triton killed mid-request."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[int] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            accepted.append(1)
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(65536)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(5)
        server.close()


@live
def test_requests_survive_dead_and_dying_replicas(
    tmp_path: Path, triton: TritonServer, public_model: PublicModel
) -> None:
    with dying_replica() as (dying, accepted):
        dead = f"127.0.0.1:{free_port('127.0.0.1')}"  # nothing listens there
        upstreams = (dead, dying, f"127.0.0.1:{triton.state.http_port}")
        config = gateway_config(tmp_path / "gw", triton, public_model, upstreams=upstreams)
        with Gateway(config) as gateway:
            x = images(4, seed=21)
            expected = expected_logits(x)
            for i in range(30):
                np.testing.assert_allclose(
                    client_infer(gateway.url, x, binary=bool(i % 2)), expected, rtol=1e-4, atol=1e-4
                )
    assert accepted, "the dying replica was never tried: the test proves nothing"


@live
def test_reload_applies_new_limits_and_route_without_restart(
    tmp_path: Path, triton: TritonServer, public_model: PublicModel
) -> None:
    config = gateway_config(tmp_path / "gw", triton, public_model)
    with Gateway(config) as gateway:
        pid = gateway.pid
        caller = Caller(gateway.url)
        x8 = images(8, seed=8)
        assert caller.request("POST", INFER, json_request(x8)).json()["model_name"] == "unlearned"

        smaller = replace(public_model, max_batch_size=4, upstream_model="fused")
        gateway.reload(replace(config, models=(smaller,)))
        assert gateway.pid == pid and gateway.is_running()
        caller.close()  # the old worker closed its idle keep-alive connections: clients reconnect
        assert "N <= 4" in assert_json_error(caller.request("POST", INFER, json_request(x8)), 400)
        answer = caller.request("POST", INFER, json_request(x8[:4]))
        assert answer.json()["model_name"] == "fused"  # the route flipped
        np.testing.assert_allclose(logits_of(answer), expected_logits(x8[:4]), rtol=1e-4, atol=1e-4)
        caller.close()
        assert Gateway.from_run_dir(config.run_dir).config.models == (smaller,)


@live
def test_a_refused_reload_leaves_the_old_gateway_serving(
    tmp_path: Path, triton: TritonServer, public_model: PublicModel
) -> None:
    config = gateway_config(tmp_path / "gw", triton, public_model)
    with Gateway(config) as gateway:
        pid, workers = gateway.pid, worker_pids(gateway)
        conf_before = Path(config.conf_path).read_bytes()
        x = images(3, seed=3)

        def still_serving() -> None:
            assert gateway.is_running() and gateway.pid == pid and worker_pids(gateway) == workers
            assert Path(config.conf_path).read_bytes() == conf_before
            assert gateway.config == config
            np.testing.assert_allclose(
                client_infer(gateway.url, x, binary=True), expected_logits(x), rtol=1e-4, atol=1e-4
            )

        # nginx -t refuses it (an upstream that does not resolve)
        with pytest.raises(ServerError, match="keeps its previous config"):
            gateway.reload(replace(config, upstreams=("no-such-replica.invalid:8000",)))
        still_serving()

        # nginx -t accepts it but the running nginx cannot apply it (its new port is taken)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            with pytest.raises(ServerError, match="keeps serving the previous one"):
                gateway.reload(replace(config, port=taken.getsockname()[1]))
        still_serving()

        with pytest.raises(InvalidInputError, match="keeps the run dir"):
            gateway.reload(replace(config, run_dir=str(tmp_path / "elsewhere")))
        still_serving()


@live
def test_stop_leaves_no_process_and_a_detached_gateway_is_found_again(
    tmp_path: Path, triton: TritonServer, public_model: PublicModel
) -> None:
    config = gateway_config(tmp_path / "gw", triton, public_model)
    gateway = Gateway(config).start()
    pid = gateway.pid
    assert len(group_members(pid)) == 1 + config.workers
    state = gateway.detach()
    gateway.stop()  # a no-op once detached
    assert group_members(pid)

    found = Gateway.from_json(json.loads(json.dumps(state)))
    assert found.is_running() and found.pid == pid
    with pytest.raises(ServerError, match="already runs from"):
        Gateway(config).start()  # a second nginx on the same run dir
    assert Gateway.from_run_dir(config.run_dir).is_running()
    x = images(2)
    np.testing.assert_allclose(client_infer(found.url, x, binary=True), expected_logits(x), rtol=1e-4, atol=1e-4)
    found.stop()
    assert not found.is_running()
    assert group_members(pid) == []
    assert not os.path.exists(f"/proc/{pid}/stat") or "nginx" not in Path(f"/proc/{pid}/cmdline").read_text()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", config.port), timeout=2):
        pass
    with pytest.raises(ServerError, match="no gateway state"):
        Gateway.from_run_dir(config.run_dir)

    with Gateway(config) as again:  # the context manager stops it too
        pid = again.pid
    assert group_members(pid) == []


@live
def test_a_start_that_cannot_bind_fails_with_the_log_and_leaves_nothing(
    tmp_path: Path, triton: TritonServer, public_model: PublicModel
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = gateway_config(tmp_path / "gw", triton, public_model, port=taken.getsockname()[1])
        gateway = Gateway(config)
        with pytest.raises(ServerError, match="Address already in use"):
            gateway.start()
    assert not gateway.is_running()
    assert not nginx_processes_of(config)


def nginx_processes_of(config: GatewayConfig) -> list[int]:
    """Live processes started with this config's nginx.conf."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and config.conf_path in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
    return found
