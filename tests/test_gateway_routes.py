"""Live routes: a public model flipped between two Triton models in one instant, under load, without a reload.

Pure tests check the config and the rendered admin listener. Tests marked `gateway`
and `triton` run a real Triton (locked model control) with three tiny graphs written
here: `unlearned_blue` and `unlearned_green` (classifier(x + delta) for two different
deltas: the forget steps of two vectors, so every answer says which one computed it)
and `classifier` (loaded, but not a route the public model may take). Real nginx
gateways in front of it, on loopback.

Which colour answered is decided from the logits (numpy reference, never the gateway)
and cross-checked with the model_name Triton puts in the answer.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.http as triton_http
from gateway_testing import live, requires_nginx
from onnx import TensorProto, helper, numpy_helper

from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.gateway import Gateway, GatewayConfig, PublicModel, render_nginx_conf, routes, set_route
from fv_serving.gateway.routes import check_key
from fv_serving.net import free_port, wait_for_port
from fv_serving.procfs import children, group_members
from fv_serving.triton.server import TritonServer

KEY = secrets.token_urlsafe(32)
PUBLIC = "unlearned"
BLUE, GREEN = "unlearned_blue", "unlearned_green"
COLOURS = (BLUE, GREEN)
INFER = f"/v2/models/{PUBLIC}/infer"
MAX_BATCH = 16
WEIGHT = np.random.default_rng(0).normal(size=(784, 10)).astype(np.float32)
DELTAS = {
    BLUE: (np.random.default_rng(1).normal(size=(1, 28, 28)) * 0.2).astype(np.float32),
    GREEN: (np.random.default_rng(2).normal(size=(1, 28, 28)) * 0.2).astype(np.float32),
}


# -- the tiny repository ------------------------------------------------------------------------------

_RUNNER = """backend: "python"
parameters { key: "onnx_file" value { string_value: "model.onnx" } }
parameters { key: "intra_op_threads" value { string_value: "1" } }
dynamic_batching { max_queue_delay_microseconds: 0 }
instance_group { kind: KIND_CPU count: 1 }
input { name: "image" data_type: TYPE_FP32 dims: [1, 28, 28] }
output { name: "logits" data_type: TYPE_FP32 dims: [10] }
"""


def _graph(name: str, delta: np.ndarray | None) -> onnx.ModelProto:
    """image [N,1,28,28] (+ delta) -> Flatten -> MatMul(W) -> logits [N,10]."""
    nodes = [
        helper.make_node("Flatten", ["shifted" if delta is not None else "image"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
    ]
    tensors = [numpy_helper.from_array(WEIGHT, "W")]
    if delta is not None:
        nodes.insert(0, helper.make_node("Add", ["image", "delta"], ["shifted"]))
        tensors.append(numpy_helper.from_array(delta, "delta"))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def build_repository(root: Path) -> Path:
    runner = resources.files("triton_models").joinpath("ort_runner", "model.py").read_bytes()
    for name, delta in ((BLUE, DELTAS[BLUE]), (GREEN, DELTAS[GREEN]), ("classifier", None)):
        version = root / name / "1"
        version.mkdir(parents=True)
        onnx.save(_graph(name, delta), version / "model.onnx")
        (version / "model.py").write_bytes(runner)
        (root / name / "config.pbtxt").write_text(f'name: "{name}"\nmax_batch_size: {MAX_BATCH}\n{_RUNNER}')
    return root


def expected(colour: str, x: np.ndarray) -> np.ndarray:
    shifted = x + DELTAS[colour] if colour in DELTAS else x
    return (shifted.reshape(len(x), -1) @ WEIGHT).astype(np.float32)


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)


def colour_of(logits: np.ndarray, model_name: str, x: np.ndarray) -> str:
    """The colour whose reference the logits match, if Triton's model_name agrees; else a description."""
    matches = [c for c in COLOURS if np.allclose(logits, expected(c, x), rtol=1e-4, atol=1e-3)]
    if len(matches) == 1 and model_name == matches[0]:
        return matches[0]
    return f"unknown (logits match {matches}, model_name {model_name!r})"


# -- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = build_repository(tmp_path_factory.mktemp("routes-repo"))
    with TritonServer(repository, [*COLOURS, "classifier"], admin_key=KEY) as server:
        yield server


def public_model(**changes: Any) -> PublicModel:
    model = PublicModel(
        name=PUBLIC,
        input_name="image",
        dims=(1, 28, 28),
        max_batch_size=MAX_BATCH,
        outputs=("logits",),
        upstream_model=BLUE,
        routes=COLOURS,
    )
    return replace(model, **changes)


def gateway_config(run_dir: Path, triton: TritonServer, **changes: Any) -> GatewayConfig:
    config = GatewayConfig(
        host="127.0.0.1",
        port=free_port("127.0.0.1"),
        upstreams=(f"127.0.0.1:{triton.state.http_port}",),
        models=(public_model(),),
        run_dir=str(run_dir),
        admin_port=free_port("127.0.0.1"),
    )
    return replace(config, **changes)


# -- HTTP helpers ------------------------------------------------------------------------------------------


def http_call(
    url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One request on a fresh connection: (status, JSON body or raw bytes)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        payload = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        connection.request(method, path, body=payload, headers=headers or {})
        response = connection.getresponse()
        raw = response.read()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(raw)
        return response.status, raw
    finally:
        connection.close()


def admin(gateway: Gateway, method: str, path: str, body: Any = None, key: str | None = KEY) -> tuple[int, Any]:
    assert gateway.admin_url is not None
    return http_call(gateway.admin_url, method, path, body, {"fv-admin-key": key} if key is not None else {})


def assert_json_error(answer: tuple[int, Any], status: int) -> str:
    code, body = answer
    assert code == status, answer
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], answer
    return str(body["error"])


def infer_body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A binary-input request asking for JSON logits."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def answered_colour(url: str, x: np.ndarray) -> str:
    body, headers = infer_body(x)
    status, answer = http_call(url, "POST", INFER, body, headers)
    assert status == 200, answer
    logits = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 10)
    return colour_of(logits, answer["model_name"], x)


# -- load: keep-alive clients that notice every failure and every connection the server closes ----------------


@dataclass
class Record:
    client: str
    sent: float
    received: float
    colour: str | None = None
    error: str | None = None


class KeepAlive:
    """One raw HTTP/1.1 keep-alive connection; counts what the server does to it instead of hiding it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.connection = self._open()
        self.opened = 1
        self.closed_by_server = 0  # responses with Connection: close, and connections dropped under a request

    def _open(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
        connection.connect()
        return connection

    @property
    def local_port(self) -> int:
        assert self.connection.sock is not None
        return int(self.connection.sock.getsockname()[1])

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Any:
        try:
            self.connection.request(method, path, body=body, headers=headers or {})
            response = self.connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException):
            self.closed_by_server += 1
            self.reopen()
            raise
        if response.will_close:
            self.closed_by_server += 1
            self.reopen()
        if response.status != 200:
            raise AssertionError(f"HTTP {response.status}: {raw[:200]!r}")
        return json.loads(raw) if raw else None

    def reopen(self) -> None:
        self.connection.close()
        self.connection = self._open()
        self.opened += 1

    def close(self) -> None:
        self.connection.close()


def _socket_inode(server_port: int, client_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = fields[1].rsplit(":", 1)[1], fields[2].rsplit(":", 1)[1]
                if int(local, 16) == server_port and int(remote, 16) == client_port:
                    return fields[9]
    return None


def _worker_holding(workers: list[int], inode: str) -> int | None:
    for pid in workers:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
    return None


def connections_on_every_worker(gateway: Gateway, per_worker: int, tries: int = 300) -> list[KeepAlive]:
    """Keep-alive connections, `per_worker` held by each nginx worker (checked in /proc, not assumed).

    An idle nginx worker tends to win every accept; call this under load so that all of them accept.
    """
    workers = children(gateway.pid)
    assert len(workers) == gateway.config.workers
    kept: dict[int, list[KeepAlive]] = {pid: [] for pid in workers}
    for _ in range(tries):
        if all(len(held) >= per_worker for held in kept.values()):
            break
        connection = KeepAlive(gateway.config.client_host, gateway.config.port)
        connection.request("GET", f"/v2/models/{PUBLIC}")  # accepted and served: now a worker holds it
        inode = _socket_inode(gateway.config.port, connection.local_port)
        pid = _worker_holding(workers, inode) if inode else None
        if pid is not None and len(kept[pid]) < per_worker:
            kept[pid].append(connection)
        else:
            connection.close()
    spread = {pid: len(held) for pid, held in kept.items()}
    assert all(n >= per_worker for n in spread.values()), f"could not reach every worker: {spread}"
    return [c for held in kept.values() for c in held]


@dataclass
class Load:
    """Client threads calling the public model until stopped; every request recorded."""

    gateway: Gateway
    records: list[Record] = field(default_factory=list)
    connections: list[KeepAlive] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _record(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def add_tritonclient(self, name: str, seed: int) -> None:
        x = images(2, seed)

        def run() -> None:
            client = triton_http.InferenceServerClient(self.gateway.url.removeprefix("http://"), concurrency=1)
            try:
                while not self._stop.is_set():
                    tensor = triton_http.InferInput("image", list(x.shape), "FP32")
                    tensor.set_data_from_numpy(x, binary_data=True)
                    sent = time.monotonic()
                    try:
                        result = client.infer(PUBLIC, [tensor])
                        logits = np.asarray(result.as_numpy("logits"))
                        colour = colour_of(logits, result.get_response()["model_name"], x)
                        self._record(Record(name, sent, time.monotonic(), colour=colour))
                    except Exception as exc:
                        self._record(Record(name, sent, time.monotonic(), error=repr(exc)))
            finally:
                client.close()

        self._start(run)

    def add_keepalive(self, name: str, connection: KeepAlive, seed: int) -> None:
        x = images(3, seed)
        body, headers = infer_body(x)
        self.connections.append(connection)

        def run() -> None:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    answer = connection.request("POST", INFER, body, headers)
                    logits = np.asarray(answer["outputs"][0]["data"], dtype=np.float32).reshape(len(x), 10)
                    self._record(
                        Record(name, sent, time.monotonic(), colour=colour_of(logits, answer["model_name"], x))
                    )
                except Exception as exc:
                    self._record(Record(name, sent, time.monotonic(), error=repr(exc)))

        self._start(run)

    def _start(self, run: Callable[[], None]) -> None:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def wait_requests(self, n: int, timeout_s: float = 30.0) -> None:
        """Until every client has made `n` more requests."""
        with self._lock:
            start = Counter(r.client for r in self.records)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                now = Counter(r.client for r in self.records)
            if len(now) == len(self._threads) and all(now[c] - start[c] >= n for c in now):
                return
            time.sleep(0.01)
        raise AssertionError(f"the clients did not make {n} requests each within {timeout_s} s: {now}")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        for connection in self.connections:
            connection.close()


@dataclass(frozen=True)
class Flip:
    started: float  # before the PUT was sent
    answered: float  # after its answer was read
    target: str


def allowed_colours(record: Record, flips: list[Flip], initial: str) -> set[str]:
    """What may answer a request sent at record.sent and answered at record.received.

    The route in force when it was sent (the target of the last flip answered before),
    plus the target of every flip whose [started, answered] overlaps the request.
    """
    current, allowed = initial, set()
    for flip in flips:
        if flip.answered <= record.sent:
            current = flip.target
        elif flip.started < record.received:
            allowed.add(flip.target)
    return {current, *allowed}


# ======================================================================================================
# pure: config, rendering, helpers
# ======================================================================================================


def _pure_config(**changes: Any) -> GatewayConfig:
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 8080,
        "upstreams": ("127.0.0.1:8000",),
        "models": (public_model(),),
        "run_dir": "/srv/fv-gateway",
        "admin_port": 8081,
    }
    return GatewayConfig(**{**fields, **changes})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: public_model(routes=(GREEN,)), "must include the default route"),
        (lambda: public_model(routes=(BLUE, BLUE)), "routes must be unique"),
        (lambda: public_model(routes=(BLUE, "a/b")), "route must be"),
        (lambda: public_model(routes="unlearned_blue"), "routes must be a sequence"),
        (lambda: _pure_config(admin_port=8080), "must differ from the public port"),
        (lambda: _pure_config(admin_port=0), "admin_port"),
        (lambda: _pure_config(admin_host="localhost"), "admin_host"),
        (lambda: _pure_config(admin_port=None, admin_passthrough=True), "needs an admin listener"),
        (lambda: _pure_config(admin_passthrough=1), "true or false"),
        (
            lambda: _pure_config(upstreams=("127.0.0.1:8000", "127.0.0.1:8001"), admin_passthrough=True),
            "exactly one upstream",
        ),
    ],
)
def test_route_and_admin_config_refuse_bad_values(build: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build()


def test_allowed_routes_default_to_the_upstream_and_survive_json() -> None:
    plain = PublicModel(name="fused", input_name="image", dims=(1, 28, 28), max_batch_size=4, outputs=("logits",))
    assert plain.allowed_routes == ("fused",)
    assert replace(plain, upstream_model="fused_v2").allowed_routes == ("fused_v2",)  # replace() stays valid
    assert public_model().allowed_routes == COLOURS
    config = _pure_config(models=(public_model(), plain), admin_host="::", admin_passthrough=True)
    assert GatewayConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert config.admin_url == "http://[::1]:8081"
    assert _pure_config(admin_port=None).admin_url is None


def test_the_admin_listener_is_rendered_apart_from_the_public_one() -> None:
    text = render_nginx_conf(_pure_config())
    public, admin_part = text.split("    server {")[1], text.split("    server {")[2]
    assert "listen 127.0.0.1:8080;" in public and "/fv/" not in public
    assert "listen 127.0.0.1:8081;" in admin_part
    assert "location = /fv/routes {" in admin_part and "location ^~ /fv/routes/ {" in admin_part
    assert "env FV_ADMIN_KEY;" in text
    assert "lua_shared_dict fv_routes 1m;" in text
    assert '"allowed":["unlearned_blue","unlearned_green"],"default":"unlearned_blue"' in text
    assert "/srv/fv-gateway/routes" in text
    # without passthrough nothing on the admin listener reaches Triton
    assert "proxy_pass" not in admin_part

    passthrough = render_nginx_conf(_pure_config(admin_passthrough=True)).split("    server {")[2]
    assert 'access_by_lua_block { require("fv_gateway_routes").authorise() }' in passthrough
    assert "proxy_pass_request_headers on;" in passthrough and "proxy_pass http://fv_triton;" in passthrough
    assert "proxy_next_upstream off;" in passthrough


@pytest.mark.gateway
@requires_nginx
def test_nginx_accepts_the_admin_listener_conf(tmp_path: Path) -> None:
    config = _pure_config(run_dir=str(tmp_path / "run"), admin_host="::1", admin_passthrough=True)
    Gateway(config, admin_key=KEY).validate()
    assert not Path(config.conf_path).exists() and not Path(config.routes_path).exists()


def test_client_helpers_refuse_bad_keys_urls_and_silent_gateways(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("", "two words", "line\nbreak", "é"):
        with pytest.raises(InvalidInputError, match="printable ASCII") as info:
            check_key(bad)
        assert bad not in str(info.value) or not bad
    monkeypatch.delenv("FV_ADMIN_KEY", raising=False)
    with pytest.raises(ServerError, match="no admin key"):
        routes("http://127.0.0.1:1")
    with pytest.raises(InvalidInputError, match="http://HOST:PORT"):
        routes("https://127.0.0.1:1", KEY)
    with pytest.raises(InvalidInputError, match="upstream model"):
        set_route("http://127.0.0.1:1", PUBLIC, "a/b", KEY)
    with pytest.raises(ServerError, match="did not answer"):
        set_route(f"http://127.0.0.1:{free_port('127.0.0.1')}", PUBLIC, GREEN, KEY, timeout_s=2)
    with pytest.raises(InvalidInputError, match="printable ASCII"):
        Gateway(_pure_config(), admin_key="has space")


# ======================================================================================================
# live
# ======================================================================================================


@live
def test_a_flip_under_load_fails_no_request_and_splits_answers_at_the_flip(
    tmp_path: Path, triton: TritonServer
) -> None:
    """Six flips between blue and green while six clients call the public model on keep-alive connections."""
    config = gateway_config(tmp_path / "gw", triton, workers=2)
    with Gateway(config, admin_key=KEY) as gateway:
        assert gateway.routes() == {PUBLIC: BLUE}
        load = Load(gateway)
        for i in range(2):
            load.add_tritonclient(f"tritonclient-{i}", seed=i)
        load.wait_requests(3)
        # raw keep-alive connections held by each of the two workers (opened under load, so both accept)
        for i, connection in enumerate(connections_on_every_worker(gateway, per_worker=2)):
            load.add_keepalive(f"keepalive-{i}", connection, seed=10 + i)
        try:
            load.wait_requests(5)
            flips: list[Flip] = []
            for target in (GREEN, BLUE, GREEN, BLUE, GREEN, BLUE):
                started = time.monotonic()
                gateway.route(PUBLIC, target)
                flips.append(Flip(started, time.monotonic(), target))
                load.wait_requests(8)  # every client, after every flip
        finally:
            load.stop()

    records = load.records
    failed = [r for r in records if r.error is not None]
    assert not failed, f"{len(failed)} of {len(records)} requests failed: {failed[:5]}"
    closed = {i: c.closed_by_server for i, c in enumerate(load.connections)}
    assert not any(closed.values()), f"the gateway closed keep-alive connections: {closed}"
    assert all(c.opened == 1 for c in load.connections)

    wrong, strict = [], Counter()
    for record in records:
        allowed = allowed_colours(record, flips, initial=BLUE)
        if record.colour not in allowed:
            wrong.append((record, allowed))
        if len(allowed) == 1:
            strict[record.colour] += 1
    assert not wrong, f"{len(wrong)} answers from the wrong model: {wrong[:5]}"
    # the check had teeth: most answers had exactly one allowed model, of both colours
    assert strict[BLUE] >= 30 and strict[GREEN] >= 30, strict
    overlapping = len(records) - sum(strict.values())
    latencies_ms = sorted((f.answered - f.started) * 1000 for f in flips)
    print(
        f"\nflip under load: {len(records)} requests from {len(Counter(r.client for r in records))} clients, "
        f"0 failed, {strict[BLUE]} blue + {strict[GREEN]} green with one allowed answer, {overlapping} overlapping "
        f"a flip; flip HTTP call ms: median {statistics.median(latencies_ms):.2f}, max {latencies_ms[-1]:.2f}"
    )
    assert latencies_ms[-1] < 2000


@live
def test_the_load_harness_sees_what_a_reload_does_to_keepalive_clients(tmp_path: Path, triton: TritonServer) -> None:
    """The control for the test above: flipping by reload closes every keep-alive connection."""
    config = gateway_config(tmp_path / "gw", triton, workers=2)
    with Gateway(config, admin_key=KEY) as gateway:
        load = Load(gateway)
        load.add_tritonclient("tritonclient", seed=0)
        load.wait_requests(3)
        for i, connection in enumerate(connections_on_every_worker(gateway, per_worker=1)):
            load.add_keepalive(f"keepalive-{i}", connection, seed=10 + i)
        try:
            load.wait_requests(5)
            gateway.reload(replace(config, models=(public_model(max_batch_size=8),)))
            load.wait_requests(5)
        finally:
            load.stop()
    closed = [c.closed_by_server for c in load.connections]
    assert all(n >= 1 for n in closed), f"a reload left keep-alive connections open: {closed}"


@live
def test_routes_outside_the_allowed_set_unknown_models_and_bad_bodies_are_refused(
    tmp_path: Path, triton: TritonServer
) -> None:
    config = gateway_config(tmp_path / "gw", triton)
    with Gateway(config, admin_key=KEY) as gateway:
        x = images(2, seed=3)
        with pytest.raises(ServerError, match=r"409.*not allowed; allowed: unlearned_blue, unlearned_green"):
            gateway.route(PUBLIC, "classifier")  # a real, loaded Triton model, but not one of the routes
        message = assert_json_error(admin(gateway, "PUT", f"/fv/routes/{PUBLIC}", {"upstream": "fused"}), 409)
        assert "not allowed" in message
        assert "no public model" in assert_json_error(
            admin(gateway, "PUT", "/fv/routes/classifier", {"upstream": BLUE}), 404
        )
        for body in ({"upstream": 5}, {"upstream": GREEN, "extra": 1}, ["x"], b"{not json", b""):
            assert_json_error(admin(gateway, "PUT", f"/fv/routes/{PUBLIC}", body), 400)
        assert_json_error(admin(gateway, "PUT", f"/fv/routes/{PUBLIC}", b"{" + b" " * 5000 + b"}"), 413)
        assert_json_error(admin(gateway, "POST", f"/fv/routes/{PUBLIC}", {"upstream": GREEN}), 405)
        assert_json_error(admin(gateway, "DELETE", "/fv/routes"), 405)
        assert_json_error(admin(gateway, "GET", "/fv/other"), 404)
        assert_json_error(admin(gateway, "POST", "/v2/repository/index", b"{}"), 404)  # no passthrough here
        # nothing changed
        assert gateway.routes() == {PUBLIC: BLUE}
        assert answered_colour(gateway.url, x) == BLUE
        assert not Path(config.routes_path).exists()

        # a route that cannot be persisted is not applied either
        routes_dir = Path(config.routes_dir)
        routes_dir.chmod(0o555)
        try:
            with pytest.raises(ServerError, match=r"500.*the route was not changed: cannot create"):
                gateway.route(PUBLIC, GREEN)
        finally:
            routes_dir.chmod(0o755)
        assert gateway.routes() == {PUBLIC: BLUE} and answered_colour(gateway.url, x) == BLUE
        assert list(routes_dir.iterdir()) == []

        gateway.route(PUBLIC, GREEN)
        assert answered_colour(gateway.url, x) == GREEN
        listing = admin(gateway, "GET", "/fv/routes")
        assert listing == (200, {"routes": {PUBLIC: GREEN}, "allowed": {PUBLIC: list(COLOURS)}})


@live
def test_metadata_and_ready_follow_the_route(tmp_path: Path, triton: TritonServer) -> None:
    config = gateway_config(tmp_path / "gw", triton)
    with Gateway(config, admin_key=KEY) as gateway:
        caller = KeepAlive(config.client_host, config.port)
        for colour in (BLUE, GREEN, BLUE):
            if gateway.routes()[PUBLIC] != colour:
                gateway.route(PUBLIC, colour)
            assert caller.request("GET", f"/v2/models/{PUBLIC}")["name"] == colour
            caller.request("GET", f"/v2/models/{PUBLIC}/ready")  # 200 (ready) or it raises
            assert answered_colour(gateway.url, images(1)) == colour
        # query strings and odd encodings of the public path never reach Triton as sent
        assert caller.request("GET", f"/v2/models/{PUBLIC}?name=classifier")["name"] == BLUE
        assert caller.request("GET", "/v2/models/unlearne%64")["name"] == BLUE
        assert caller.closed_by_server == 0
        caller.close()


@live
def test_admin_calls_need_the_key_and_nothing_works_without_one(
    tmp_path: Path, triton: TritonServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FV_ADMIN_KEY", raising=False)
    config = gateway_config(tmp_path / "gw", triton)
    with Gateway(config, admin_key=KEY) as gateway:
        put = ("PUT", f"/fv/routes/{PUBLIC}", {"upstream": GREEN})
        for method, path, body in (("GET", "/fv/routes", None), put):
            assert "needs the fv-admin-key header" in assert_json_error(admin(gateway, method, path, body, None), 401)
            assert_json_error(admin(gateway, method, path, body, ""), 401)
            assert assert_json_error(admin(gateway, method, path, body, "wrong"), 403) == "wrong fv-admin-key"
            assert_json_error(admin(gateway, method, path, body, KEY[:-1]), 403)
            assert_json_error(admin(gateway, method, path, body, KEY + "x"), 403)
        # the header twice: refused even if one of them is right
        connection = http.client.HTTPConnection(config.client_host, config.admin_port, timeout=10)
        connection.putrequest("GET", "/fv/routes")
        connection.putheader("fv-admin-key", KEY)
        connection.putheader("fv-admin-key", KEY)
        connection.endheaders()
        assert connection.getresponse().status == 401
        connection.close()
        with pytest.raises(ServerError, match=r"the key was refused.*403"):
            set_route(config.admin_url or "", PUBLIC, GREEN, "wrong")
        assert routes(config.admin_url or "", KEY) == {PUBLIC: BLUE}  # nothing changed
        assert "wrong fv-admin-key" in Path(config.error_log).read_text()

        # no secret anywhere in the run dir (nginx.conf names the variable, never its value)
        gateway.route(PUBLIC, GREEN)
        for path in Path(config.run_dir).rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
        assert "env FV_ADMIN_KEY;" in Path(config.conf_path).read_text()

    # FV_ADMIN_KEY unset (no admin_key, nothing in the environment): everything refused
    unkeyed = gateway_config(tmp_path / "unkeyed", triton)
    with Gateway(unkeyed) as gateway:
        for key in (KEY, "", None):
            message = assert_json_error(admin(gateway, "GET", "/fv/routes", key=key), 403)
            assert "FV_ADMIN_KEY is not set" in message
        assert_json_error(admin(gateway, "PUT", f"/fv/routes/{PUBLIC}", {"upstream": GREEN}), 403)
        with pytest.raises(ServerError, match="without an admin key"):
            gateway.route(PUBLIC, GREEN)
        assert answered_colour(gateway.url, images(1)) == BLUE

    # the caller's environment is where the key comes from by default
    monkeypatch.setenv("FV_ADMIN_KEY", KEY)
    with Gateway(gateway_config(tmp_path / "from-env", triton)) as gateway:
        gateway.route(PUBLIC, GREEN)
        assert routes(gateway.admin_url or "") == {PUBLIC: GREEN}


@live
def test_without_an_admin_listener_routes_are_fixed_until_a_reload_adds_one(
    tmp_path: Path, triton: TritonServer
) -> None:
    config = gateway_config(tmp_path / "gw", triton, admin_port=None)
    with Gateway(config, admin_key=KEY) as gateway:
        with pytest.raises(ServerError, match="no admin listener"):
            gateway.route(PUBLIC, GREEN)
        assert "FV_ADMIN_KEY" not in Path(config.conf_path).read_text()
        gateway.reload(replace(config, admin_port=free_port("127.0.0.1")))
        gateway.route(PUBLIC, GREEN)
        assert answered_colour(gateway.url, images(1)) == GREEN


@live
def test_the_public_listener_refuses_the_admin_api(tmp_path: Path, triton: TritonServer) -> None:
    config = gateway_config(tmp_path / "gw", triton)
    with Gateway(config, admin_key=KEY) as gateway:
        headers = {"fv-admin-key": KEY}
        for method, path in (("GET", "/fv/routes"), ("PUT", f"/fv/routes/{PUBLIC}"), ("GET", "/fv/")):
            body = json.dumps({"upstream": GREEN}).encode() if method == "PUT" else None
            assert_json_error(http_call(gateway.url, method, path, body, headers), 404)
        assert_json_error(http_call(gateway.url, "POST", "/v2/repository/index", b"{}", headers), 403)
        assert gateway.routes() == {PUBLIC: BLUE}
        assert answered_colour(gateway.url, images(1)) == BLUE


@live
def test_routes_survive_a_restart_and_a_reload_and_bad_files_fall_back_to_the_config(
    tmp_path: Path, triton: TritonServer
) -> None:
    config = gateway_config(tmp_path / "gw", triton)
    x = images(2, seed=7)
    with Gateway(config, admin_key=KEY) as gateway:
        gateway.route(PUBLIC, GREEN)
    stored = json.loads(Path(config.routes_path).read_text())
    assert stored["routes"] == {PUBLIC: GREEN}

    # stop + start from the same run dir: the stored route, not the rendered default
    with Gateway(config, admin_key=KEY) as gateway:
        assert gateway.routes() == {PUBLIC: GREEN}
        assert answered_colour(gateway.url, x) == GREEN
        # a reload (new limits) keeps the live route
        gateway.reload(replace(config, models=(public_model(max_batch_size=8),)))
        assert gateway.routes() == {PUBLIC: GREEN} and answered_colour(gateway.url, x) == GREEN
        # a reload whose config no longer allows it falls back to the config's default
        gateway.reload(replace(config, models=(public_model(routes=(BLUE,)),)))
        assert gateway.routes() == {PUBLIC: BLUE} and answered_colour(gateway.url, x) == BLUE
        gateway.reload(config)
        gateway.route(PUBLIC, BLUE)
        gateway.route(PUBLIC, GREEN)

    # a restarted nginx (killed, not stopped) comes back on the last route too
    gateway = Gateway(config, admin_key=KEY).start()
    os.killpg(gateway.pid, 9)
    gateway.stop()
    with Gateway(config, admin_key=KEY) as gateway:
        assert answered_colour(gateway.url, x) == GREEN

    # files that cannot be trusted: the config's default, and a warning in the log
    routes_file = Path(config.routes_path)
    other = tmp_path / "elsewhere.json"
    other.write_text(json.dumps({"routes": {PUBLIC: GREEN}}))
    for content in ("{not json", json.dumps({"routes": {PUBLIC: "classifier"}}), json.dumps([1]), None):
        routes_file.unlink()
        if content is None:
            routes_file.symlink_to(other)  # a worker-owned folder: links are not followed
        else:
            routes_file.write_text(content)
        log_size = Path(config.error_log).stat().st_size
        with Gateway(config, admin_key=KEY) as gateway:
            assert gateway.routes() == {PUBLIC: BLUE}, content
            assert answered_colour(gateway.url, x) == BLUE
        log = Path(config.error_log).read_bytes()[log_size:].decode()
        assert "fv gateway:" in log and ("ignoring" in log or "not allowed by the config" in log), log


@live
def test_an_nginx_started_elsewhere_from_a_prepared_run_dir_comes_back_on_the_last_route(
    tmp_path: Path, triton: TritonServer
) -> None:
    """A gateway container: its command runs nginx on the run dir pod-config prepared; it crashes and restarts."""
    config = gateway_config(tmp_path / "gw", triton)
    command = Gateway(config).prepare()
    assert Path(config.conf_path).is_file() and Path(config.routes_dir).is_dir()
    env = {"PATH": os.environ["PATH"], "FV_ADMIN_KEY": KEY}
    x = images(2, seed=9)
    for attempt, target in enumerate((GREEN, BLUE, GREEN)):
        process = subprocess.Popen(command, env=env, cwd=config.run_dir, start_new_session=True)
        try:
            assert wait_for_port(config.client_host, config.port, 10) and wait_for_port(
                config.admin_host, config.admin_port or 0, 10
            )
            previous = {0: BLUE, 1: GREEN, 2: BLUE}[attempt]
            assert routes(config.admin_url or "", KEY) == {PUBLIC: previous}
            assert answered_colour(config.url, x) == previous
            set_route(config.admin_url or "", PUBLIC, target, KEY)
            assert answered_colour(config.url, x) == target
        finally:
            os.killpg(process.pid, signal.SIGKILL)  # a crash: no graceful stop
            process.wait(10)
            deadline = time.monotonic() + 5
            while group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)


@live
def test_the_admin_passthrough_reaches_triton_model_control_with_the_callers_key(
    tmp_path: Path, triton: TritonServer
) -> None:
    # Triton's model control is locked with KEY: only a call that carries it is served
    direct = http_call(triton.http_url, "POST", "/v2/repository/index", b"{}")
    assert direct[0] != 200, direct
    config = gateway_config(tmp_path / "gw", triton, admin_passthrough=True)
    with Gateway(config, admin_key=KEY) as gateway:
        status, index = admin(gateway, "POST", "/v2/repository/index", b"{}")
        assert status == 200, index
        assert {m["name"] for m in index} == {*COLOURS, "classifier"}
        assert_json_error(admin(gateway, "POST", "/v2/repository/index", b"{}", key=None), 401)
        assert_json_error(admin(gateway, "POST", "/v2/repository/index", b"{}", key="wrong"), 403)
        # every other path goes to Triton as sent: a model the public listener hides
        body, headers = infer_body(images(1))
        status, answer = http_call(
            gateway.admin_url or "", "POST", "/v2/models/classifier/infer", body, {**headers, "fv-admin-key": KEY}
        )
        assert status == 200 and answer["model_name"] == "classifier"
        # and the routes API is still the gateway's own
        gateway.route(PUBLIC, GREEN)
        assert answered_colour(gateway.url, images(1)) == GREEN
        assert_json_error(http_call(gateway.url, "POST", "/v2/repository/index", b"{}", {"fv-admin-key": KEY}), 403)
