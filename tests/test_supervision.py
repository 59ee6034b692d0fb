"""Supervision with real processes: bounded restarts, a status that fails on a down model, clean-up of orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from triton_testing import requires_triton

from fv_serving.cli.main import main
from fv_serving.procfs import group_members, is_alive
from fv_serving.triton.client import TritonClient
from fv_serving.triton.control import find_key
from fv_serving.triton.supervisor import read_run_state
from fv_serving.vectors import ForgetVector

pytestmark = [requires_triton, pytest.mark.triton]


@pytest.fixture(scope="module")
def repo(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("supervised") / "repo"
    argv = ["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(class_vector[1])]
    assert main([*argv, "--max-batch-size", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture
def foreground(repo: Path) -> Iterator[subprocess.Popen[str]]:
    """`fv serve` in the foreground, as an operator (or systemd) runs it, with one restart allowed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fv_serving.cli.main", "serve", "--repository", str(repo), "--max-restarts", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_dir = repo.parent / "repo.server"
    deadline = time.monotonic() + 120
    while not (run_dir / "server.json").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read() if process.stdout else ""
        time.sleep(0.1)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        main(["stop", "--repository", str(repo)])


def wait_for(predicate, timeout_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_crashed_server_is_restarted_then_the_supervisor_gives_up(repo: Path, foreground) -> None:
    run_dir = repo.parent / "repo.server"
    first = read_run_state(run_dir).server
    os.kill(first.pid, signal.SIGKILL)
    wait_for(lambda: read_run_state(run_dir).server.pid != first.pid)
    second = read_run_state(run_dir)
    assert second.restarts == 1 and second.server.http_port == first.http_port  # same address after the restart
    with TritonClient(second.server.http_url) as client:
        assert client.is_model_ready("unlearned")
    os.kill(second.server.pid, signal.SIGKILL)  # a second crash within the window: over the limit of 1
    out, _ = foreground.communicate(timeout=60)
    assert foreground.returncode == 1
    assert "exited unexpectedly" in out and "restarting tritonserver in 1 s" in out and "giving up" in out
    assert not (run_dir / "server.json").exists()
    assert not is_alive(second.server.pid) and not group_members(second.server.pid)


def test_status_fails_and_names_a_model_that_is_down(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--repository", str(repo), "--detach"]) == 0
    try:
        run_dir = repo.parent / "repo.server"
        state = read_run_state(run_dir)
        assert main(["status", "--repository", str(repo)]) == 0
        with TritonClient(state.server.http_url, admin_key=find_key(run_dir)) as operator:
            operator.unload_model("classifier")  # what an attacker did before the key; an operator may still err
            wait_for(lambda: not operator.is_model_ready("classifier"))
        capsys.readouterr()
        assert main(["status", "--repository", str(repo)]) == 1
        out = capsys.readouterr().out
        assert "PROBLEM  model 'classifier' is not READY" in out
    finally:
        main(["stop", "--repository", str(repo)])


def test_stop_ends_what_is_left_of_a_dead_deployment(repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Supervisor and server leader killed: the python-backend stubs live on in the server's group; stop ends them."""
    assert main(["serve", "--repository", str(repo), "--detach"]) == 0
    run_dir = repo.parent / "repo.server"
    state = read_run_state(run_dir)
    os.kill(state.supervisor_pid, signal.SIGKILL)
    os.kill(state.server.pid, signal.SIGKILL)
    wait_for(lambda: not is_alive(state.server.pid))
    survivors = group_members(state.server.pid)
    assert survivors, "expected the stubs to outlive their server (that is what stop must clean up)"
    capsys.readouterr()
    assert main(["stop", "--repository", str(repo)]) == 0
    assert "supervisor was not running" in capsys.readouterr().out
    assert group_members(state.server.pid) == []
    assert not (run_dir / "server.json").exists()
