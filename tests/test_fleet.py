"""A fleet on a real local S3 endpoint (moto server): 3 real tritonservers reading s3://, the real gateway in front.

Five fleet switches under load from 8 client threads through the gateway (which spreads
them over the replicas): no request fails, and every answer names its vector; answers
that arrived before a flip began name the old vector, answers to requests sent after it
ended name the new one. Faults: a replica killed while the new vector is prepared (no
flip, nothing left prepared, a clear error), a replica restarted after a switch (back
on the confirmed vector), the S3 endpoint down (refused, nothing changed).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from triton_testing import requires_triton

from fv_serving.cli.main import main
from fv_serving.errors import FVError, SwitchError
from fv_serving.failpoints import FILE_ENV, POINT_ENV
from fv_serving.fleet import layout
from fv_serving.fleet.members import Members
from fv_serving.fleet.recovery import recover_fleet
from fv_serving.fleet.store import S3Store
from fv_serving.fleet.switch import fleet_switch
from fv_serving.net import free_port
from fv_serving.triton.client import TritonClient
from fv_serving.triton.control import find_key
from fv_serving.triton.repository import ENSEMBLE_MODEL
from fv_serving.triton.supervisor import read_run_state
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import ForgetVector, load_vector, save_vector

pytestmark = [requires_triton, pytest.mark.triton, pytest.mark.gateway]

BUCKET = "fv-fleet"
REPLICAS = 3
CLIENTS = 8
SWITCHES = 5


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    from moto.server import ThreadedMotoServer

    port = free_port("127.0.0.1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "fv-test",
        "AWS_SECRET_ACCESS_KEY": "fv-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the supervisor and its tritonservers inherit the standard AWS settings
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield {"server": server, "port": port}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def fleet(
    s3: dict[str, object],
    tiny_classifier_path: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("fleet")
    base = class_vector[0]
    files = [class_vector[1]] + [
        save_vector(ForgetVector(classifier=base.classifier, delta=base.delta * s), root / f"v{i}.safetensors")
        for i, s in enumerate((0.5, -1.0, -0.5), start=1)
    ]
    url = f"s3://{BUCKET}/deployments/mnist"
    build = ["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(files[0]), "--fleet"]
    assert main([*build, "--max-batch-size", "16", "--out", url]) == 0
    run_dir = root / "fleet.server"
    port = free_port("127.0.0.1")
    serve = ["serve", "--repository", url, "--run-dir", str(run_dir), "--replicas", str(REPLICAS)]
    assert main([*serve, "--public", f"127.0.0.1:{port}", "--detach", "--max-restarts", "10"]) == 0
    try:
        yield {"url": url, "run_dir": run_dir, "files": files, "public": f"http://127.0.0.1:{port}"}
    finally:
        main(["stop", "--run-dir", str(run_dir)])


def members_of(fleet: dict[str, object]) -> tuple[Members, str]:
    run_dir = Path(str(fleet["run_dir"]))
    state = read_run_state(run_dir)
    key = find_key(run_dir)
    assert key is not None and state.admin_url is not None
    return Members(tuple(s.http_url for s in state.servers), (state.admin_url,)), key


def live_id(store: S3Store) -> str:
    return str(layout.read_sidecar(store, layout.read_state(store).live_version)["vector_id"])


def next_file(fleet: dict[str, object], store: S3Store) -> Path:
    files = [Path(str(f)) for f in fleet["files"]]  # type: ignore[union-attr]
    ids = [load_vector(f).vector_id for f in files]
    return files[(ids.index(live_id(store)) + 1) % len(files)]


def test_five_fleet_switches_under_load(fleet: dict[str, object]) -> None:
    store = S3Store(str(fleet["url"]))
    members, key = members_of(fleet)
    images = np.random.default_rng(3).random((2, 1, 28, 28), dtype=np.float32)
    stop = threading.Event()
    answers: list[tuple[float, float, str]] = []  # (sent, received, vector id)
    failures: list[str] = []
    lock = threading.Lock()

    def load() -> None:
        with TritonClient(str(fleet["public"])) as client:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    _, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
                except FVError as exc:
                    with lock:
                        failures.append(str(exc))
                    continue
                with lock:
                    assert len(set(ids)) == 1  # one request, one vector
                    answers.append((sent, time.monotonic(), ids[0]))

    threads = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    flips: list[tuple[float, float, str, str]] = []  # (flip began, flip ended, old id, new id)
    timings = []
    try:
        time.sleep(1.0)
        for _ in range(SWITCHES):
            old, target = live_id(store), next_file(fleet, store)
            window: list[float] = []

            def timed(flip, window=window):  # type: ignore[no-untyped-def]
                def run(upstream: str) -> None:
                    window.append(time.monotonic())
                    flip(upstream)
                    window.append(time.monotonic())

                return run

            replicas = members.replica_handles(key, 60)
            result = fleet_switch(store, replicas, [timed(f) for f in members.route_flips(key, 60)],
                                  VectorChoice(vector=target), timeout_s=60)  # fmt: skip
            assert result.vector_id == load_vector(target).vector_id == live_id(store)
            flips.append((window[0], window[-1], old, result.vector_id))
            timings.append(result.all_serving_s)
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert failures == [], failures[:5]
    assert len(answers) >= 200
    for k, (began, ended, old, new) in enumerate(flips):
        previous_end = flips[k - 1][1] if k else float("-inf")
        next_begin = flips[k + 1][0] if k + 1 < len(flips) else float("inf")
        before = {vid for sent, received, vid in answers if sent > previous_end and received < began}
        after = {vid for sent, received, vid in answers if sent > ended and received < next_begin}
        assert before == {old}, f"switch {k}: answers before the flip named {before}"
        assert after == {new}, f"switch {k}: answers after the flip named {after}"
    print(f"time to all-serving per switch (s): {[round(t, 2) for t in timings]}")


def test_a_replica_killed_while_preparing_flips_nothing(fleet: dict[str, object], tmp_path: Path) -> None:
    store = S3Store(str(fleet["url"]))
    members, key = members_of(fleet)
    before, state_before = live_id(store), layout.read_state(store)
    marker = tmp_path / "at"
    os.environ.update({POINT_ENV: "fleet:before-prepare", FILE_ENV: str(marker)})
    victim = read_run_state(Path(str(fleet["run_dir"]))).servers[1]
    errors: list[BaseException] = []

    def switch() -> None:
        try:
            fleet_switch(store, members.replica_handles(key, 30), members.route_flips(key, 30),
                         VectorChoice(vector=next_file(fleet, store)), timeout_s=30)  # fmt: skip
        except BaseException as exc:  # the test wants it, whatever it is
            errors.append(exc)

    thread = threading.Thread(target=switch)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline, "the switch never reached the prepare"
            time.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        marker.unlink()
        thread.join(timeout=120)
    finally:
        for k in (POINT_ENV, FILE_ENV):
            os.environ.pop(k, None)
    assert len(errors) == 1 and isinstance(errors[0], SwitchError), errors
    assert "nothing flipped" in str(errors[0]) and victim.http_url.split("//")[1] in str(errors[0])
    assert layout.read_state(store) == state_before and live_id(store) == before
    # prepared state removed: forget_step pins the two colours' versions again on the store and the replicas
    assert layout.pinned_forget_step(store) == tuple(sorted(set(state_before.versions.values())))
    wait_for_replicas(fleet, previous={victim.pid})
    assert_every_replica_serves(fleet, before)
    # The new version's folder stays until no replica may be loading it: the next switch's recovery sets it aside.
    newest = max(state_before.versions.values())
    left = [f for f in layout.step_folders(store) if f.isdigit() and int(f) > newest]
    notes = recover_fleet(store, members.replica_handles(key, 30), members.route_flips(key, 30), 30)
    assert all(any(f"unconfirmed version {f}" in n for n in notes) for f in left), notes
    assert not [f for f in layout.step_folders(store) if f.isdigit() and int(f) > newest]


def test_a_replica_restarted_after_a_switch_serves_the_confirmed_vector(fleet: dict[str, object]) -> None:
    store = S3Store(str(fleet["url"]))
    run_dir = Path(str(fleet["run_dir"]))
    assert main(["switch", "--repository", str(fleet["url"]), "--run-dir", str(run_dir),
                 "--vector", str(next_file(fleet, store))]) == 0  # fmt: skip
    confirmed = live_id(store)
    victim = read_run_state(run_dir).servers[0]
    os.kill(victim.pid, signal.SIGKILL)
    wait_for_replicas(fleet, previous={victim.pid})
    assert_every_replica_serves(fleet, confirmed)


def test_the_object_store_down_refuses_the_switch_and_changes_nothing(
    fleet: dict[str, object], s3: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    store = S3Store(str(fleet["url"]))
    before, state_before = live_id(store), layout.read_state(store)
    run_dir = Path(str(fleet["run_dir"]))
    target = next_file(fleet, store)
    s3["server"].stop()  # type: ignore[attr-defined]
    try:
        capsys.readouterr()
        code = main(["switch", "--repository", str(fleet["url"]), "--run-dir", str(run_dir), "--vector", str(target)])
        err = capsys.readouterr().err
    finally:
        from moto.server import ThreadedMotoServer

        restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=int(s3["port"]))  # type: ignore[arg-type]
        restarted.start()
        s3["server"] = restarted
    assert code == 2 and "unreachable" in err and len(err.strip().splitlines()) == 1, err
    assert layout.read_state(store) == state_before and live_id(store) == before
    assert_every_replica_serves(fleet, before)


# -- helpers ------------------------------------------------------------------------------------------------


def wait_for_replicas(fleet: dict[str, object], previous: set[int], timeout_s: float = 90.0) -> None:
    """The supervisor restarted the killed replica(s): new pids, all ready."""
    run_dir = Path(str(fleet["run_dir"]))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            servers = read_run_state(run_dir).servers
        except FVError:
            servers = ()
        if len(servers) == REPLICAS and not previous & {s.pid for s in servers}:
            return
        time.sleep(0.2)
    raise AssertionError("the supervisor did not restart the killed replica")


def assert_every_replica_serves(fleet: dict[str, object], vector_id: str) -> None:
    """Directly on every replica, through the live colour, and through the gateway."""
    store = S3Store(str(fleet["url"]))
    live = layout.colour_model(layout.read_state(store).live)
    images = np.random.default_rng(4).random((2, 1, 28, 28), dtype=np.float32)
    for server in read_run_state(Path(str(fleet["run_dir"]))).servers:
        with TritonClient(server.http_url) as client:
            deadline = time.monotonic() + 30
            while not client.is_model_ready(live):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert set(client.infer_with_ids(live, images)[1]) == {vector_id}
    with TritonClient(str(fleet["public"])) as client:
        for _ in range(2 * REPLICAS):
            assert set(client.infer_with_ids(ENSEMBLE_MODEL, images)[1]) == {vector_id}
