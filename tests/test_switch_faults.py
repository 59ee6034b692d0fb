"""The fault matrix of a live switch, with real processes: whatever is killed, and when, a confirmed vector serves.

One supervised deployment (`fv serve --detach`) serves the module. Each scenario runs
`fv switch` as its own process, stops it at a named moment (fv_serving/failpoints.py)
and then kills the server (kill -9) or the switch (SIGTERM, SIGINT, kill -9). After
each: the next start of the server serves the confirmed vector and `fv status` names
it, the journal closed the switch (rolled back or recovered), no temporary folder or
LOADING model is left, and the next switch succeeds in its normal time.
"""

from __future__ import annotations

import json
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
from fv_serving.failpoints import FILE_ENV, MODE_ENV, POINT_ENV
from fv_serving.triton import journal
from fv_serving.triton.repository import FORGET_STEP_MODEL, confirmed_version, read_forget_step_metadata
from fv_serving.triton.supervisor import read_run_state
from fv_serving.vectors import ForgetVector, save_vector

pytestmark = [requires_triton, pytest.mark.triton]

#: A switch's own time on this machine is ~1 s; a switch stuck behind a leftover would take its timeout (60 s).
NORMAL_SWITCH_S = 15.0


def fv_json(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, dict]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr().out
    return code, json.loads(out)


@pytest.fixture(scope="module")
def deployment(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("faults")
    vector = class_vector[0]
    files = {
        "a": class_vector[1],
        "b": save_vector(ForgetVector(classifier=vector.classifier, delta=vector.delta * 0.5), root / "b.safetensors"),
    }
    repo = root / "repo"
    assert main(["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(files["a"]),
                 "--max-batch-size", "16", "--out", str(repo)]) == 0  # fmt: skip
    assert main(["serve", "--repository", str(repo), "--detach", "--max-restarts", "20"]) == 0
    try:
        yield {"repo": repo, **files}
    finally:
        main(["stop", "--repository", str(repo)])


def confirmed_id(repo: Path) -> str:
    return str(read_forget_step_metadata(repo, confirmed_version(repo))["vector_id"])


def other_file(deployment: dict[str, Path]) -> Path:
    """The vector file that is not served now."""
    from fv_serving.vectors import load_vector

    current = confirmed_id(deployment["repo"])
    return deployment["b"] if load_vector(deployment["a"]).vector_id == current else deployment["a"]


def start_faulted_switch(repo: Path, vector: Path, point: str, mode: str, marker: Path) -> subprocess.Popen[str]:
    env = {**os.environ, POINT_ENV: point, MODE_ENV: mode, FILE_ENV: str(marker)}
    command = [
        sys.executable,
        "-m",
        "fv_serving.cli.main",
        "switch",
        "--repository",
        str(repo),
        "--vector",
        str(vector),
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert process.poll() is None, f"the switch ended before {point}: {process.communicate()}"
        assert time.monotonic() < deadline, f"the switch never reached {point}"
        time.sleep(0.02)
    return process


def server_pid(repo: Path) -> int:
    return read_run_state(repo.parent / f"{repo.name}.server").server.pid


def wait_for_new_server(repo: Path, old_pid: int, timeout_s: float = 60.0) -> None:
    """The supervisor restarts a killed server (after recovery) and publishes its new state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = read_run_state(repo.parent / f"{repo.name}.server")
            if state.server.pid != old_pid:
                return
        except Exception:  # the state file is rewritten atomically; a read may miss it for a moment
            pass
        time.sleep(0.1)
    raise AssertionError("the supervisor did not restart the killed server")


def restart_deployment(repo: Path) -> None:
    assert main(["stop", "--repository", str(repo)]) == 0
    assert main(["serve", "--repository", str(repo), "--detach", "--max-restarts", "20"]) == 0


def check_after_fault(
    capsys: pytest.CaptureFixture[str], deployment: dict[str, Path], expected_id: str, journal_from: int
) -> None:
    repo = deployment["repo"]
    capsys.readouterr()
    code, status = fv_json(capsys, "status", "--repository", repo, "--json")
    assert code == 0 and status["problems"] == [], status["problems"]
    assert status["active"]["served"] and status["active"]["version"] == confirmed_version(repo)
    assert status["active"]["vector_id"] == expected_id == confirmed_id(repo)
    assert not [m for m in status["models"] if m["state"] in ("LOADING", "UNLOADING")], status["models"]
    code, answers = fv_json(capsys, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", "64", "--json")
    assert code == 0 and answers["vector_ids"] == [expected_id]
    events = journal.read(repo)[journal_from:]
    begins = [e for e in events if e["event"] == "begin"]
    assert len(begins) == 1, events
    outcomes = [e["event"] for e in events if e.get("switch") == begins[0]["switch"] and e["event"] != "begin"]
    assert len(outcomes) == 1 and outcomes[0] in ("rolled_back", "recovered", "confirmed"), events
    assert journal.unfinished(repo) == []
    leftovers = [p.name for p in (repo / FORGET_STEP_MODEL).iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    started = time.monotonic()
    target = other_file(deployment)
    assert main(["switch", "--repository", str(repo), "--vector", str(target)]) == 0
    assert time.monotonic() - started < NORMAL_SWITCH_S
    assert confirmed_id(repo) != expected_id


SWITCH_MOMENTS = [("switch:after-publish", "hang"), ("switch:loading", "mark"), ("switch:before-confirm", "hang")]


@pytest.mark.parametrize(("point", "mode"), SWITCH_MOMENTS, ids=[p for p, _ in SWITCH_MOMENTS])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=["SIGTERM", "SIGINT", "SIGKILL"])
def test_the_switch_process_dies(
    deployment: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], point: str, mode: str, sig: int
) -> None:
    repo = deployment["repo"]
    before, entries = confirmed_id(repo), len(journal.read(repo))
    switch = start_faulted_switch(repo, other_file(deployment), point, mode, tmp_path / "at")
    if mode == "mark":
        time.sleep(0.05)  # Triton is loading the new version now
    switch.send_signal(sig)
    out, err = switch.communicate(timeout=120)
    if sig != signal.SIGKILL:  # a stop signal rolls back and says so in one line
        assert switch.returncode == 2 and "switch failed: interrupted (SIG" in err, (out, err)
        assert len(err.strip().splitlines()) == 1, err
    restart_deployment(repo)  # "the next start"
    check_after_fault(capsys, deployment, before, entries)


SERVER_MOMENTS = [("switch:after-publish", "hang"), ("switch:loading", "mark"), ("switch:before-confirm", "hang")]


@pytest.mark.parametrize(("point", "mode"), SERVER_MOMENTS, ids=[p for p, _ in SERVER_MOMENTS])
def test_the_server_dies_mid_switch(
    deployment: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], point: str, mode: str
) -> None:
    repo = deployment["repo"]
    before, entries = confirmed_id(repo), len(journal.read(repo))
    target = other_file(deployment)
    marker = tmp_path / "at"
    switch = start_faulted_switch(repo, target, point, mode, marker)
    pid = server_pid(repo)
    if mode == "mark":
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    marker.unlink(missing_ok=True)  # let the switch go on against the dead server
    out, err = switch.communicate(timeout=120)
    wait_for_new_server(repo, pid)  # the supervisor's restart is "the next start"
    from fv_serving.vectors import load_vector

    # Killed before the new version was confirmed serving: the old vector; after (before-confirm): the switch
    # had seen the new one serve and pins it, so the restarted server serves the new one, confirmed.
    expected = load_vector(target).vector_id if point == "switch:before-confirm" else before
    assert (switch.returncode == 0) == (point == "switch:before-confirm"), (out, err)
    check_after_fault(capsys, deployment, expected, entries)


def test_the_switch_is_killed_right_after_it_pinned_the_new_version(
    deployment: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fv_serving.vectors import load_vector

    repo = deployment["repo"]
    entries = len(journal.read(repo))
    target = other_file(deployment)
    switch = start_faulted_switch(repo, target, "switch:after-confirm", "hang", tmp_path / "at")
    switch.kill()
    switch.communicate(timeout=60)
    restart_deployment(repo)
    check_after_fault(capsys, deployment, load_vector(target).vector_id, entries)
    recovered = [e for e in journal.read(repo)[entries:] if e["event"] == "recovered"]
    assert recovered and recovered[0]["confirmed"]["vector_id"] == load_vector(target).vector_id
