"""`fv triton build | serve | stop | switch | status | infer` end to end, against a REAL tritonserver.

The commands run in-process through `fv_serving.cli.main.main` (`fv serve --detach`
starts the supervisor as a real daemon process, which runs tritonserver); the
foreground `fv serve` runs as a subprocess so that it can be signalled like an
operator would. `fv switch`, `fv status` and `fv infer` find the server's URL and its
model-control key from the run folder `fv serve` wrote (`<repository>.server`).
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

import numpy as np
import pytest
import torch
from PIL import Image
from triton_testing import requires_triton
from tritonclient.grpc import model_config_pb2 as mc

from fv_serving.cli.main import main
from fv_serving.data import Dataset, to_numpy_images
from fv_serving.triton import journal
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import TritonClient
from fv_serving.triton.processes import shm_regions
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    confirmed_version,
    forget_step_config,
    list_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
)
from fv_serving.triton.server import state_is_running
from fv_serving.triton.supervisor import STATE_FILENAME, read_run_state, stop_deployment
from fv_serving.vectors import ForgetVector, load_vector, save_vector

FORGOTTEN = 1  # conftest.FORGET_CLASS: Trouser


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """`fv argv...` in-process: exit code, stdout, stderr."""
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def repo(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("cli") / "repo"
    code = main(
        [
            "triton",
            "build",
            "--classifier",
            str(tiny_classifier_path),
            "--vector",
            str(class_vector[1]),
            "--fused",
            "--max-batch-size",
            "16",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def detached(repo: Path) -> Iterator[Path]:
    """`fv serve --detach` on the repository; `fv stop` afterwards. Yields the run folder."""
    assert main(["serve", "--repository", str(repo), "--detach"]) == 0
    run_dir = repo.parent / "repo.server"
    try:
        yield run_dir
    finally:
        main(["stop", "--repository", str(repo)])


def operator_client(run_dir: Path) -> TritonClient:
    """A client carrying the deployment's key, read from the run folder like `fv switch` does."""
    state = read_run_state(run_dir)
    return TritonClient(state.server.http_url, admin_key=(run_dir / "admin.key").read_text().strip())


# -- build --------------------------------------------------------------------------------------------


def test_build_from_checkpoint_writes_a_checked_repository(
    repo: Path, tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path]
) -> None:
    for model in (CLASSIFIER_MODEL, FORGET_STEP_MODEL, ENSEMBLE_MODEL, FUSED_MODEL):
        config = mcfg.read_config(repo / model)  # parsed by Triton's own protobuf schema
        assert config.max_batch_size == 16
    assert (repo / FUSED_MODEL / "1" / "model.onnx").is_file()
    for model in (ENSEMBLE_MODEL, FUSED_MODEL):  # both public models name the vector in every answer
        assert [t.name for t in mcfg.read_config(repo / model).output] == ["logits", "vector_id"]
    assert confirmed_version(repo) == 1
    deployment = json.loads((repo / "deployment.json").read_text())
    assert deployment["classifier"]["class_names"][FORGOTTEN] == "Trouser"
    assert deployment["classifier"]["source"] == str(tiny_classifier_path.absolute())
    assert deployment["initial_vector"]["forget"]["classes"] == [FORGOTTEN]
    assert deployment["fused"]["vector_id"] == class_vector[0].vector_id
    (built,) = journal.read(repo)
    assert built["event"] == "built" and built["to"]["version"] == 1
    assert built["to"]["vector_id"] == class_vector[0].vector_id


def test_build_from_onnx_with_a_bank_for_the_onnxruntime_backend_on_gpu(
    repo: Path, class_vector: tuple[ForgetVector, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fv_serving.vectors import VectorBank, save_bank

    vector = class_vector[0]
    bank = save_bank(
        VectorBank(classifier=vector.classifier, vectors=vector.delta[None], classes=[FORGOTTEN], notes=vector.notes),
        tmp_path / "bank.safetensors",
    )
    onnx_file = repo / CLASSIFIER_MODEL / "1" / "model.onnx"
    out = tmp_path / "gpu-repo"
    code, stdout, _ = run(
        capsys,
        *("triton", "build", "--classifier-onnx", onnx_file, "--bank", bank, "--classes", "Trouser"),
        *("--runtime", "onnxruntime", "--device", "gpu", "--instances", "2", "--fused", "--out", out),
    )
    assert code == 0 and "runtime onnxruntime, device gpu" in stdout
    for model in (CLASSIFIER_MODEL, FORGET_STEP_MODEL, FUSED_MODEL):
        config = mcfg.read_config(out / model)
        assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert config.instance_group[0].count == 2
        assert config.HasField("dynamic_batching")
        assert not (out / model / "1" / "model.py").exists()  # no ORT runner: Triton's backend runs the graph
    class_names = json.loads((out / "deployment.json").read_text())["classifier"]["class_names"]
    assert class_names[FORGOTTEN] == "Trouser"  # read back from the exported graph's metadata


def test_build_refuses_a_vector_of_another_classifier(
    other_classifier_path: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "never"
    code, _, stderr = run(
        capsys, "triton", "build", "--classifier", other_classifier_path, "--vector", class_vector[1], "--out", out
    )
    assert code == 2 and stderr.startswith("fv triton: error:")
    assert f"forget vector {class_vector[0].vector_id} was made for classifier" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_build_refuses_a_fused_model_without_a_vector(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    onnx_file = repo / CLASSIFIER_MODEL / "1" / "model.onnx"
    code, _, stderr = run(capsys, "triton", "build", "--classifier-onnx", onnx_file, "--off", "--fused", "--out", out)
    assert code == 2 and "nothing to fuse" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_serve_refuses_to_expose_triton_beyond_loopback(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "never"
    code, _, stderr = run(capsys, "serve", "--repository", repo, "--run-dir", run_dir, "--host", "0.0.0.0")
    assert code == 2 and "loopback only" in stderr and "--public 0.0.0.0:PORT" in stderr
    assert not run_dir.exists()


# -- serve, status, infer, switch, stop ---------------------------------------------------------------


@requires_triton
@pytest.mark.triton
def test_status_shows_the_active_vector_and_models(
    detached: Path, repo: Path, class_vector: tuple[ForgetVector, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = run(capsys, "status", "--repository", repo)
    assert code == 0, stdout
    assert "live and ready" in stdout and "forgets Trouser" in stdout
    assert f"vector   {class_vector[0].vector_id} = forget_step version 1 (served)" in stdout
    assert "(confirmed forget_step version 1;" in stdout
    assert "<- the classifier" in stdout and "PROBLEM" not in stdout
    code, stdout, _ = run(capsys, "status", "--run-dir", detached, "--json")
    assert code == 0
    status = json.loads(stdout)
    assert status["problems"] == []
    assert status["active"]["vector_id"] == class_vector[0].vector_id
    assert status["active"]["version"] == status["active"]["confirmed_version"] == 1
    assert status["repository"]["confirmed_version"] == 1
    assert {(m["name"], m["state"]) for m in status["models"]} >= {(CLASSIFIER_MODEL, "READY"), (FUSED_MODEL, "READY")}
    assert status["supervisor"]["pid"] == read_run_state(detached).supervisor_pid
    assert status["supervisor"]["restarts"] == 0


@requires_triton
@pytest.mark.triton
def test_infer_files_and_dataset_then_switch_off_and_back(
    detached: Path,
    repo: Path,
    fmnist: Dataset,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vector_id = class_vector[0].vector_id
    logged = len(journal.read(repo))
    x = to_numpy_images(fmnist.test, torch.arange(6))
    pngs = []
    for i in range(2):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(fmnist.test.images[i, 0].numpy()).save(path)
        pngs.append(path)
    np.save(tmp_path / "batch.npy", x[2:6])
    code, stdout, _ = run(capsys, "infer", "--repository", repo, *pngs, tmp_path / "batch.npy", "--json")
    assert code == 0
    rows = json.loads(stdout)["predictions"]
    assert [r["input"] for r in rows] == ["img0.png", "img1.png", *(f"batch.npy[{i}]" for i in range(4))]
    assert {r["vector_id"] for r in rows} == {vector_id}  # every answer names the vector that computed it
    code, stdout, _ = run(capsys, "infer", "--repository", repo, *pngs)
    assert code == 0 and f"answered by vector {vector_id}" in stdout

    def accuracy(*extra: object) -> dict[str, object]:
        code, stdout, _ = run(
            capsys, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", 500, "--json", *extra
        )
        assert code == 0
        return dict(json.loads(stdout))

    unlearned = accuracy()
    assert unlearned["forgotten"] == [FORGOTTEN] and unlearned["vector_ids"] == [vector_id]
    assert unlearned["per_class"][FORGOTTEN]["accuracy"] < 10.0  # type: ignore[index]

    code, stdout, _ = run(capsys, "switch", "--repository", repo, "--off")
    assert code == 0, stdout
    assert "new vector serving" in stdout and "classifier not reloaded" in stdout
    assert f"vector {vector_id} -> off" in stdout and "confirmed and journaled" in stdout
    assert confirmed_version(repo) == 2
    restored = accuracy("--protocol", "grpc")
    assert restored["forgotten"] == [] and restored["vector_ids"] == ["off"]
    assert restored["per_class"][FORGOTTEN]["accuracy"] > 80.0  # type: ignore[index]
    bypass = accuracy("--model", CLASSIFIER_MODEL)  # the bare classifier answers like forgetting off
    assert bypass["per_class"] == restored["per_class"] and bypass["vector_ids"] == []  # and names no vector
    fused = accuracy("--model", FUSED_MODEL)  # the fused model keeps the vector it was built with
    assert fused["forgotten"] == [FORGOTTEN] and fused["per_class"] == unlearned["per_class"]
    assert fused["vector_ids"] == [vector_id]

    code, stdout, _ = run(capsys, "switch", "--run-dir", detached, "--vector", class_vector[1])
    assert code == 0
    assert confirmed_version(repo) == 3
    assert accuracy()["per_class"] == unlearned["per_class"]
    code, stdout, _ = run(capsys, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", 200)
    assert "<- forgotten" in stdout and "accuracy" in stdout and f"answered by vector {vector_id}" in stdout

    # The journal tells both switches; `fv status --history` shows it.
    events = journal.read(repo)[logged:]
    assert [(e["event"], e["to"].get("vector_id")) for e in events] == [
        ("begin", "off"),
        ("confirmed", "off"),
        ("begin", vector_id),
        ("confirmed", vector_id),
    ]
    code, stdout, _ = run(capsys, "status", "--repository", repo, "--history", 4)
    history = [line for line in stdout.splitlines() if line.startswith("journal")]
    assert code == 0 and len(history) == 4
    assert "confirmed" in history[1] and f"{vector_id} (v1) -> off (v2)" in history[1]
    assert "confirmed" in history[3] and f"off (v2) -> {vector_id} (v3)" in history[3]


@requires_triton
@pytest.mark.triton
def test_switch_refuses_bad_vectors_with_one_line_errors(
    detached: Path,
    repo: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    vector = class_vector[0]
    nan = ForgetVector(classifier=vector.classifier, delta=vector.delta.copy())
    nan.delta[0, 0, 0] = np.inf
    bad = save_vector(nan, tmp_path / "inf.safetensors")
    huge = save_vector(
        ForgetVector(classifier=vector.classifier, delta=vector.delta * 100), tmp_path / "huge.safetensors"
    )
    zero = save_vector(
        ForgetVector(classifier=vector.classifier, delta=0 * vector.delta), tmp_path / "zero.safetensors"
    )
    versions, logged = list_forget_step_versions(repo), len(journal.read(repo))
    for argv, message in [
        (("--vector", bad), "non-finite"),
        (("--vector", tmp_path / "missing.safetensors"), "not found"),
        (("--bank", bad, "--classes", "Trouser"), "holds a 'vector'"),
        (("--vector", huge), "beyond the bound 4"),
        (("--vector", class_vector[1], "--max-abs", "1e-3"), "beyond the bound 0.001"),  # the flag counts
        (("--vector", zero), "would forget nothing"),
    ]:
        code, _, stderr = run(capsys, "switch", "--repository", repo, *argv)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list_forget_step_versions(repo) == versions and len(journal.read(repo)) == logged
    assert load_vector(huge).delta.max() > 4.0  # the file itself is valid: admission refused it


@requires_triton
@pytest.mark.triton
def test_status_fails_on_an_interrupted_switch_and_the_next_switch_recovers(
    detached: Path, repo: Path, class_vector: tuple[ForgetVector, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # What a `fv switch` killed between Triton's load and the confirmation leaves: a newer folder served live.
    confirmed = confirmed_version(repo)
    step = repo / FORGET_STEP_MODEL / str(confirmed)
    # The same graph again (a switch to the vector already served): its metadata must name the id it outputs.
    served_id = read_forget_step_metadata(repo, confirmed)["vector_id"]
    version = publish_forget_step_version(repo, (step / "model.onnx").read_bytes(), {"vector_id": served_id})
    journal.append(repo, "begin", switch="killed-switch", to={"vector_id": served_id})
    with operator_client(detached) as client:
        client.load_model(FORGET_STEP_MODEL, config=forget_step_config(repo, version))
    code, stdout, _ = run(capsys, "status", "--repository", repo)
    assert code == 1, stdout
    assert f"PROBLEM  forget_step version {version} is served but version {confirmed} is the confirmed one" in stdout
    assert f"WARNING: version {confirmed} is the confirmed one; this one was never confirmed" in stdout

    code, stdout, stderr = run(capsys, "switch", "--repository", repo, "--vector", class_vector[1])
    assert code == 0, stdout + stderr
    assert f"recovered: set aside unconfirmed version {version}" in stdout
    assert "recovered: interrupted switch killed-switch closed" in stdout
    assert f"switched forget_step v{confirmed} -> v{version + 1}" in stdout
    code, stdout, _ = run(capsys, "status", "--repository", repo, "--history", 3)
    assert code == 0 and "PROBLEM" not in stdout, stdout
    assert "recovered" in stdout and "switch killed-switch" in stdout


@requires_triton
@pytest.mark.triton
def test_serve_and_build_refuse_to_clobber_a_served_repository(
    detached: Path, repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, stderr = run(capsys, "serve", "--repository", repo, "--detach")
    assert code == 2 and "already running" in stderr
    build = ("triton", "build", "--classifier-onnx", repo / CLASSIFIER_MODEL / "1" / "model.onnx", "--off")
    code, _, stderr = run(capsys, *build, "--out", repo)
    assert code == 2 and "pass --overwrite" in stderr
    code, _, stderr = run(capsys, *build, "--out", repo, "--overwrite")
    assert code == 2 and "a server is serving" in stderr
    assert state_is_running(read_run_state(detached).server)


def test_stop_without_a_server_is_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, stdout, _ = run(capsys, "stop", "--run-dir", tmp_path)
    assert code == 0 and "no server running" in stdout
    code, _, stderr = run(capsys, "switch", "--run-dir", tmp_path, "--off")
    assert code == 2 and "no server state" in stderr


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_foreground_serve_stops_cleanly_on_signal(repo: Path, tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "fg"
    process = subprocess.Popen(
        [sys.executable, "-m", "fv_serving.cli.main", "serve", "--repository", str(repo), "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if " ready at http://" in line or not line:
                break
        assert " ready at http://" in lines[-1], "".join(lines)
        deadline = time.monotonic() + 30  # the state file is written right after the ready line
        while not (run_dir / STATE_FILENAME).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        state = read_run_state(run_dir)
        assert state.supervisor_pid == process.pid and state_is_running(state.server)
        assert state.server.http_url in lines[-1]
        process.send_signal(sig)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            if (run_dir / STATE_FILENAME).exists():  # the failed run's server would outlive the test
                stop_deployment(run_dir)
    assert process.returncode == 0, rest
    assert "stop signal received" in rest and "stopped" in rest
    assert not (run_dir / STATE_FILENAME).exists()
    assert (run_dir / "server.log").exists() and (run_dir / "admin.key").exists()
    assert not state_is_running(state.server) and shm_regions(state.server.shm_prefix) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(state.server.pid, 0)  # nothing of the server's process group is left
