"""`fv triton build | serve | stop | switch | status | infer` end to end, against a REAL tritonserver.

The commands run in-process through `fv_serving.cli.main.main` (the detached server
is a real separate process); the foreground `fv serve` runs as a subprocess so that
it can be signalled like an operator would.
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
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    list_forget_step_versions,
)
from fv_serving.triton.server import read_state, shm_regions, state_is_running, stop_from_state
from fv_serving.vectors import ForgetVector, save_vector

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


# -- build --------------------------------------------------------------------------------------------


def test_build_from_checkpoint_writes_a_checked_repository(repo: Path, tiny_classifier_path: Path) -> None:
    for model in (CLASSIFIER_MODEL, FORGET_STEP_MODEL, ENSEMBLE_MODEL, FUSED_MODEL):
        config = mcfg.read_config(repo / model)  # parsed by Triton's own protobuf schema
        assert config.max_batch_size == 16
    assert (repo / FUSED_MODEL / "1" / "model.onnx").is_file()
    deployment = json.loads((repo / "deployment.json").read_text())
    assert deployment["classifier"]["class_names"][FORGOTTEN] == "Trouser"
    assert deployment["classifier"]["source"] == str(tiny_classifier_path.absolute())
    assert deployment["initial_vector"]["forget"]["classes"] == [FORGOTTEN]


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
    assert code == 2 and stderr.startswith("fv triton: error:") and "probe images differ" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


# -- serve, status, infer, switch, stop ---------------------------------------------------------------


@requires_triton
@pytest.mark.triton
def test_status_shows_the_active_vector_and_models(
    detached: Path, repo: Path, class_vector: tuple[ForgetVector, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, _ = run(capsys, "status", "--repository", repo)
    assert code == 0
    assert "live and ready" in stdout and "forgets Trouser" in stdout
    assert f"vector   {class_vector[0].vector_id} = forget_step version 1 (served)" in stdout
    assert "<- the classifier" in stdout
    code, stdout, _ = run(capsys, "status", "--run-dir", detached, "--json")
    status = json.loads(stdout)
    assert status["active"]["vector_id"] == class_vector[0].vector_id
    assert {(m["name"], m["state"]) for m in status["models"]} >= {(CLASSIFIER_MODEL, "READY"), (FUSED_MODEL, "READY")}


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

    def accuracy(*extra: object) -> dict[str, object]:
        code, stdout, _ = run(
            capsys, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", 500, "--json", *extra
        )
        assert code == 0
        return dict(json.loads(stdout))

    unlearned = accuracy()
    assert unlearned["forgotten"] == [FORGOTTEN]
    assert unlearned["per_class"][FORGOTTEN]["accuracy"] < 10.0  # type: ignore[index]

    code, stdout, _ = run(capsys, "switch", "--repository", repo, "--off")
    assert code == 0, stdout
    assert "new vector serving" in stdout and "classifier not reloaded" in stdout
    restored = accuracy("--protocol", "grpc")
    assert restored["forgotten"] == []
    assert restored["per_class"][FORGOTTEN]["accuracy"] > 80.0  # type: ignore[index]
    bypass = accuracy("--model", CLASSIFIER_MODEL)  # the bare classifier answers like forgetting off
    assert bypass["per_class"] == restored["per_class"]
    fused = accuracy("--model", FUSED_MODEL)  # the fused model keeps the vector it was built with
    assert fused["forgotten"] == [FORGOTTEN] and fused["per_class"] == unlearned["per_class"]

    code, stdout, _ = run(capsys, "switch", "--run-dir", detached, "--vector", class_vector[1])
    assert code == 0
    assert accuracy()["per_class"] == unlearned["per_class"]
    code, stdout, _ = run(capsys, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", 200)
    assert "<- forgotten" in stdout and "accuracy" in stdout


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
    versions = list_forget_step_versions(repo)
    for argv, message in [
        (("--vector", bad), "non-finite"),
        (("--vector", tmp_path / "missing.safetensors"), "not found"),
        (("--bank", bad, "--classes", "Trouser"), "holds a 'vector'"),
    ]:
        code, _, stderr = run(capsys, "switch", "--repository", repo, *argv)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert list_forget_step_versions(repo) == versions


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
            if "serving in the foreground" in line or not line:
                break
        assert "serving in the foreground" in lines[-1], "".join(lines)
        assert any("HTTP    http://" in line for line in lines)
        state = read_state(run_dir)
        assert state_is_running(state)
        process.send_signal(sig)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            if (run_dir / "server.json").exists():  # the failed run's server would outlive the test
                stop_from_state(run_dir)
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert not (run_dir / "server.json").exists()
    assert (run_dir / "server.log").exists()
    assert not state_is_running(state) and shm_regions(state.shm_prefix) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(state.pid, 0)  # nothing of the server's process group is left
