"""Triton serving: config generation, repository layout, and a real tritonserver end to end.

Tests marked `triton` start real server processes (the one bundled in nvidia-pytriton
unless one is on PATH). One server serves the whole module; the lifecycle tests that
must stop or break a server start their own small one.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from triton_testing import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    classifier_onnx,
    forget_step_onnx,
    fused_onnx,
    random_delta,
    random_images,
    requires_triton,
    run_onnx,
    server_fixture,
)
from tritonclient.grpc import model_config_pb2 as mc

from fv_serving.errors import DataNotFoundError, InvalidInputError, OnnxGraphError, ServerError
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import InferenceError, TritonClient
from fv_serving.triton.model_config import EnsembleStep, TensorSpec
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    build_repository,
    list_forget_step_versions,
    prune_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
    read_signature,
)
from fv_serving.triton.server import (
    SHM_DIR,
    SHM_STEM,
    TritonServer,
    cleanup_stale_shm,
    group_members,
    read_state,
    shm_regions,
    state_is_running,
    stop_from_state,
)

MAX_BATCH = 8
IMAGE = TensorSpec("image", "FP32", IMAGE_SHAPE)
LOGITS = TensorSpec("logits", "FP32", (NUM_CLASSES,))


def expected_logits(images: np.ndarray, delta_seed: int) -> np.ndarray:
    return run_onnx(classifier_onnx(), image=images + random_delta(delta_seed))


def build_test_repository(out: Path) -> Path:
    delta = random_delta(1)
    return build_repository(
        out / "repo",
        classifier_onnx(),
        forget_step_onnx(delta),
        fused_onnx(delta),
        runtime="python",
        max_batch_size=MAX_BATCH,
        forget_step_metadata={"delta_seed": 1},
    )


# -- configs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runtime", ["python", "onnxruntime"])
@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_step_config_round_trips_through_parse(runtime: str, device: str) -> None:
    config = mcfg.onnx_step_config(
        "classifier", [IMAGE], [LOGITS], runtime=runtime, device=device, max_batch_size=32, instance_count=2
    )
    parsed = mcfg.parse_config(mcfg.render_config(config))
    assert parsed == config
    assert parsed.backend == runtime
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 0
    assert parsed.instance_group[0].count == 2
    kind = mc.ModelInstanceGroup.KIND_GPU if device == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    assert parsed.instance_group[0].kind == kind
    assert list(parsed.input[0].dims) == [1, 28, 28]
    assert mcfg.tensor_specs(parsed.input) == (IMAGE,)


def test_forget_step_config_keeps_only_latest_version() -> None:
    config = mcfg.onnx_step_config("forget_step", [IMAGE], [IMAGE], keep_latest_versions=1)
    assert mcfg.parse_config(mcfg.render_config(config)).version_policy.latest.num_versions == 1


def ensemble(max_batch_size: int = 8, reverse_maps: bool = False) -> mc.ModelConfig:
    fv_in, fv_out = {"image": "image"}, {"image_fv": "perturbed"}
    cls_in, cls_out = {"image": "perturbed"}, {"logits": "logits"}
    if reverse_maps:  # ensemble tensor names as keys: the classic mistake
        fv_out, cls_in = {"perturbed": "image_fv"}, {"perturbed": "image"}
    steps = [EnsembleStep("forget_step", fv_in, fv_out), EnsembleStep("classifier", cls_in, cls_out)]
    return mcfg.ensemble_config("unlearned", [IMAGE], [LOGITS], steps, max_batch_size=max_batch_size)


def composing() -> dict[str, mc.ModelConfig]:
    return {
        "forget_step": mcfg.onnx_step_config(
            "forget_step", [IMAGE], [TensorSpec("image_fv", "FP32", IMAGE_SHAPE)], max_batch_size=8
        ),
        "classifier": mcfg.onnx_step_config("classifier", [IMAGE], [LOGITS], max_batch_size=8),
    }


def test_ensemble_config_round_trips_and_matches_its_steps() -> None:
    config = ensemble()
    text = mcfg.render_config(config)
    parsed = mcfg.parse_config(text)
    assert parsed == config
    assert parsed.platform == "ensemble" and not parsed.instance_group
    assert dict(parsed.ensemble_scheduling.step[1].input_map) == {"image": "perturbed"}
    mcfg.check_ensemble_steps(parsed, composing())


def test_ensemble_with_reversed_maps_is_refused() -> None:
    # Self-consistent at the ensemble level, so only the composing configs reveal it.
    config = mcfg.parse_config(mcfg.render_config(ensemble(reverse_maps=True)))
    with pytest.raises(InvalidInputError, match="'forget_step' has no output 'perturbed'"):
        mcfg.check_ensemble_steps(config, composing())


def test_ensemble_reading_an_unproduced_tensor_is_refused() -> None:
    config = ensemble()
    config.ensemble_scheduling.step[1].input_map["image"] = "perturbd"
    with pytest.raises(InvalidInputError, match="reads \\['perturbd'\\]"):
        mcfg.render_config(config)


def test_ensemble_batch_above_a_step_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="max_batch_size 16 exceeds"):
        mcfg.check_ensemble_steps(ensemble(max_batch_size=16), composing())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: 'x' backend: 'python' max_batch_size: 1 input {", "does not parse"),
        ("name: 'x' max_batch_size: 1", "exactly one of platform and backend"),
        ("name: 'x' backend: 'python' input { name: 'a' data_type: TYPE_FP32 dims: 1 }", "no outputs"),
        (
            "name: 'e' platform: 'ensemble' instance_group { count: 1 } "
            "input { name: 'a' data_type: TYPE_FP32 dims: 1 } "
            "output { name: 'b' data_type: TYPE_FP32 dims: 1 }",
            "no instance_group",
        ),
        (
            "name: 'x' backend: 'python' input { name: 'a' data_type: TYPE_FP32 dims: 0 } "
            "output { name: 'b' data_type: TYPE_FP32 dims: 1 }",
            "dims must be positive",
        ),
    ],
)
def test_parse_config_rejects_invalid_configs(text: str, problem: str) -> None:
    with pytest.raises(InvalidInputError, match=problem):
        mcfg.parse_config(text)


def test_tensor_spec_rejects_unknown_type() -> None:
    with pytest.raises(InvalidInputError, match="unknown Triton data type"):
        TensorSpec("image", "FLOAT", (1,))


# -- repository --------------------------------------------------------------------------------------


def test_build_repository_writes_standard_layout(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    for name in (CLASSIFIER_MODEL, FORGET_STEP_MODEL, FUSED_MODEL):
        assert (repo / name / "1" / "model.onnx").is_file()
        assert (repo / name / "1" / "model.py").is_file()  # python runtime: the ORT runner
        mcfg.read_config(repo / name)
    assert list((repo / ENSEMBLE_MODEL / "1").iterdir()) == []
    ensemble_cfg = mcfg.read_config(repo / ENSEMBLE_MODEL)
    assert [s.model_name for s in ensemble_cfg.ensemble_scheduling.step] == [
        FORGET_STEP_MODEL,
        CLASSIFIER_MODEL,
    ]
    assert read_forget_step_metadata(repo) == {"delta_seed": 1}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    # readable by a Triton running as another user (e.g. in a container): umask permissions, not mkdtemp's 0700
    umask = os.umask(0)
    os.umask(umask)
    for path in (repo, repo / CLASSIFIER_MODEL / "1", repo / CLASSIFIER_MODEL / "1" / "model.onnx"):
        assert path.stat().st_mode & 0o077 == 0o077 & ~umask & (0o077 if path.is_dir() else 0o066), path


def test_build_repository_onnxruntime_runtime_has_no_runner(tmp_path: Path) -> None:
    repo = build_repository(
        tmp_path / "r",
        classifier_onnx(),
        forget_step_onnx(random_delta(0)),
        runtime="onnxruntime",
        device="gpu",
    )
    config = mcfg.read_config(repo / CLASSIFIER_MODEL)
    assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not (repo / CLASSIFIER_MODEL / "1" / "model.py").exists()


def test_build_repository_refuses_mismatched_forget_step(tmp_path: Path) -> None:
    wrong = forget_step_onnx(random_delta(0))
    wrong.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 27
    with pytest.raises(OnnxGraphError, match="must match"):
        build_repository(tmp_path / "r", classifier_onnx(), wrong)
    assert not (tmp_path / "r").exists()


def test_build_repository_refuses_fixed_batch_dim(tmp_path: Path) -> None:
    fixed = classifier_onnx()
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(OnnxGraphError, match="dynamic batch"):
        read_signature(fixed)


def test_build_repository_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError):
        build_repository(tmp_path / "r", tmp_path / "nope.onnx", forget_step_onnx(random_delta(0)))


def test_build_repository_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    with pytest.raises(InvalidInputError, match="not empty"):
        build_test_repository(tmp_path)
    build_repository(repo, classifier_onnx(), forget_step_onnx(random_delta(5)), overwrite=True)
    assert not (repo / FUSED_MODEL).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]


def test_publish_forget_step_version(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    assert publish_forget_step_version(repo, forget_step_onnx(random_delta(2)), {"delta_seed": 2}) == 2
    assert publish_forget_step_version(repo, forget_step_onnx(random_delta(3)).SerializeToString()) == 3
    assert list_forget_step_versions(repo) == [1, 2, 3]
    assert read_forget_step_metadata(repo, 2) == {"delta_seed": 2}
    assert (repo / FORGET_STEP_MODEL / "3" / "model.py").is_file()
    assert prune_forget_step_versions(repo, keep=2) == [1]
    assert list_forget_step_versions(repo) == [2, 3]


def test_publish_refuses_graph_that_does_not_fit_the_config(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    with pytest.raises(OnnxGraphError, match="does not match"):
        publish_forget_step_version(repo, classifier_onnx())
    with pytest.raises(InvalidInputError, match="JSON"):
        publish_forget_step_version(repo, forget_step_onnx(random_delta(2)), {"bad": object()})
    assert list_forget_step_versions(repo) == [1]


# -- shared-memory hygiene (no server needed) --------------------------------------------------------


def test_cleanup_stale_shm_removes_only_unused_regions() -> None:
    stale = SHM_DIR / f"{SHM_STEM}test{os.getpid()}_stale"
    live = SHM_DIR / f"{SHM_STEM}test{os.getpid()}_live"
    stale.write_bytes(b"\0" * 4096)
    live.write_bytes(b"\0" * 4096)
    with open(live, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        removed = cleanup_stale_shm()
        assert stale in removed and not stale.exists()
        assert live.exists()
    live.unlink()


# -- a real server -----------------------------------------------------------------------------------

served = server_fixture(build_test_repository, load_models=[ENSEMBLE_MODEL, FUSED_MODEL])


def current_delta_seed(server: TritonServer) -> int:
    return int(read_forget_step_metadata(server.repository)["delta_seed"])


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_ensemble_and_fused_match_onnxruntime(served: TritonServer, scheme: str) -> None:
    images = random_images(2 * MAX_BATCH + 3, seed=7)  # three requests: 8 + 8 + 3
    url = served.http_url if scheme == "http" else served.grpc_url
    with TritonClient(url) as client:
        unlearned = client.infer(ENSEMBLE_MODEL, images)
        fused = client.infer(FUSED_MODEL, images, batch_size=5)
        io = client.model_io(ENSEMBLE_MODEL)
    assert io.max_batch_size == MAX_BATCH and io.inputs[0].name == "image"
    assert unlearned.shape == (len(images), NUM_CLASSES)
    np.testing.assert_allclose(unlearned, expected_logits(images, current_delta_seed(served)), atol=1e-5)
    np.testing.assert_allclose(fused, expected_logits(images, 1), atol=1e-5)  # fused keeps delta 1


def classifier_stub_pids(server: TritonServer) -> set[int]:
    """Pids of the python-backend stub processes serving the classifier (server-side evidence)."""
    pids = set()
    marker = f"/{CLASSIFIER_MODEL}/1/model.py".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes() and os.getpgid(int(entry.name)) == server.pid:
                    pids.add(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


@requires_triton
@pytest.mark.triton
def test_switching_forget_vector_does_not_reload_classifier(served: TritonServer) -> None:
    images = random_images(4, seed=11)
    with TritonClient(served.grpc_url) as client:
        client.infer(ENSEMBLE_MODEL, images)
        before = {s.name: s for s in client.model_statistics()}
        stubs_before = classifier_stub_pids(served)
        old_seed = current_delta_seed(served)
        new_seed = old_seed + 1

        # Requests in flight during the switch must all succeed, with the old or the new vector.
        answers: list[np.ndarray] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def hammer() -> None:
            with TritonClient(served.grpc_url) as own:
                while not stop.is_set():
                    try:
                        answers.append(own.infer(ENSEMBLE_MODEL, images))
                    except BaseException as exc:
                        failures.append(exc)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            time.sleep(0.2)
            version = publish_forget_step_version(
                served.repository, forget_step_onnx(random_delta(new_seed)), {"delta_seed": new_seed}
            )
            client.load_model(FORGET_STEP_MODEL)
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(timeout=30)

        after_logits = client.infer(ENSEMBLE_MODEL, images)
        index = client.repository_index()  # old versions may still be listed as UNLOADING
        ready = {e.name: e.version for e in index if e.state == "READY"}
        after = {(s.name, s.version): s for s in client.model_statistics()}

    np.testing.assert_allclose(after_logits, expected_logits(images, new_seed), atol=1e-5)
    assert not failures
    old, new = expected_logits(images, old_seed), expected_logits(images, new_seed)
    assert answers and all(np.allclose(a, old, atol=1e-5) or np.allclose(a, new, atol=1e-5) for a in answers)

    # The forget step moved to the new version, and only that one is READY ...
    assert [e.version for e in index if e.name == FORGET_STEP_MODEL and e.state == "READY"] == [str(version)]
    assert (FORGET_STEP_MODEL, str(version)) in after
    # ... and the classifier was not reloaded: same version, statistics not reset (a reloaded model
    # starts from zero), same python-backend stub process, and the server logged its load once.
    assert ready[CLASSIFIER_MODEL] == "1" and ready[ENSEMBLE_MODEL] == "1"
    classifier_after = after[(CLASSIFIER_MODEL, "1")]
    assert classifier_after.inference_count >= before[CLASSIFIER_MODEL].inference_count + len(images)
    assert classifier_stub_pids(served) == stubs_before != set()
    assert served.log_path.read_text().count(f"successfully loaded '{CLASSIFIER_MODEL}'") == 1


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_malformed_requests_get_errors_and_server_keeps_serving(served: TritonServer, scheme: str) -> None:
    good = random_images(2, seed=3)
    bad_requests = {
        "wrong shape": {"image": np.zeros((2, 1, 28, 27), np.float32)},
        "wrong dtype": {"image": good.astype(np.float64)},
        "batch above max": {"image": random_images(MAX_BATCH + 1)},
        "wrong tensor name": {"pixels": good},
    }
    url = served.http_url if scheme == "http" else served.grpc_url
    with TritonClient(url) as client:
        for problem, inputs in bad_requests.items():
            with pytest.raises(InferenceError, match=ENSEMBLE_MODEL) as info:
                client.infer_raw(ENSEMBLE_MODEL, inputs)
            assert str(info.value), problem
        with pytest.raises(InferenceError, match="no_such_model"):
            client.infer_raw("no_such_model", {"image": good})
        # The high-level call refuses the same mistakes before sending anything.
        with pytest.raises(InvalidInputError, match=r"shape \[N, 1, 28, 28\]"):
            client.infer(ENSEMBLE_MODEL, good[:, 0])
        with pytest.raises(InvalidInputError, match="float32"):
            client.infer(ENSEMBLE_MODEL, good.astype(np.float64))
        with pytest.raises(InvalidInputError, match=r"batch_size must be in 1\.\.8"):
            client.infer(ENSEMBLE_MODEL, good, batch_size=MAX_BATCH + 1)
        logits = client.infer(ENSEMBLE_MODEL, good)
    np.testing.assert_allclose(logits, expected_logits(good, current_delta_seed(served)), atol=1e-5)


# -- lifecycle: each test runs its own small server ------------------------------------------------


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    return build_repository(out / "repo", classifier_onnx(), forget_step_onnx(random_delta(0)), max_batch_size=4)


def assert_gone(pid: int, shm_prefix: str) -> None:
    """Neither the server nor any process of its group is alive, and its shm regions are gone."""
    assert group_members(pid) == []  # zombies not counted: they only wait for a parent to reap them
    assert shm_regions(shm_prefix) == []


@requires_triton
@pytest.mark.triton
def test_stop_leaves_no_process_and_no_shm(small_repo: Path) -> None:
    server = TritonServer(small_repo, [FORGET_STEP_MODEL]).start()
    pid, prefix, run_dir = server.pid, server.shm_prefix, Path(server.state.run_dir)
    assert shm_regions(prefix)  # the python backend's regions exist while it runs
    server.stop()
    server.stop()  # idempotent
    assert_gone(pid, prefix)
    assert not run_dir.exists()


@requires_triton
@pytest.mark.triton
def test_killed_server_is_cleaned_up(small_repo: Path) -> None:
    server = TritonServer(small_repo, [FORGET_STEP_MODEL]).start()
    pid, prefix = server.pid, server.shm_prefix
    os.kill(pid, signal.SIGKILL)  # a crash: Triton gets no chance to clean up
    time.sleep(0.5)
    server.stop()
    assert_gone(pid, prefix)


@requires_triton
@pytest.mark.triton
def test_model_that_fails_to_load_raises_with_log_tail(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", classifier_onnx(), forget_step_onnx(random_delta(0)))
    (repo / CLASSIFIER_MODEL / "1" / "model.onnx").write_bytes(b"not an onnx graph")
    started = time.monotonic()
    server = TritonServer(repo, [ENSEMBLE_MODEL], ready_timeout_s=30, run_dir=tmp_path / "run")
    with pytest.raises(ServerError, match="classifier") as info:
        server.start()
    assert time.monotonic() - started < 30
    assert "log:" in str(info.value) and "\n" in str(info.value)  # the tail of the server log
    assert_gone(server.state.pid, server.shm_prefix)


@requires_triton
@pytest.mark.triton
def test_model_that_hangs_hits_ready_timeout(tmp_path: Path) -> None:
    repo = build_repository(tmp_path / "repo", classifier_onnx(), forget_step_onnx(random_delta(0)))
    runner = repo / FORGET_STEP_MODEL / "1" / "model.py"
    signature = "    def initialize(self, args: dict[str, str]) -> None:\n"
    source = runner.read_text()
    assert signature in source
    hang = f"{signature}        time.sleep(600)  # a load that never finishes\n"
    runner.write_text(source.replace(signature, hang) + "\nimport time  # noqa: E402\n")
    started = time.monotonic()
    server = TritonServer(repo, [FORGET_STEP_MODEL], ready_timeout_s=4, grace_s=2, run_dir=tmp_path / "run")
    with pytest.raises(ServerError, match="not ready within 4 s"):
        server.start()
    assert time.monotonic() - started < 20
    assert_gone(server.state.pid, server.shm_prefix)


@requires_triton
@pytest.mark.triton
def test_detached_server_is_found_and_stopped_from_its_state_file(small_repo: Path, tmp_path: Path) -> None:
    # Started by a process that exits right away, as `fv serve --detach` would.
    run_dir = tmp_path / "run"
    launcher = (
        "import sys; from fv_serving.triton.server import start_detached; "
        "start_detached(sys.argv[1], sys.argv[2], ['unlearned'])"
    )
    subprocess.run([sys.executable, "-c", launcher, str(small_repo), str(run_dir)], check=True, timeout=120)
    state = read_state(run_dir)
    assert state_is_running(state)
    with TritonClient(state.http_url) as client:
        assert client.is_model_ready(ENSEMBLE_MODEL)
        assert client.infer(ENSEMBLE_MODEL, random_images(3)).shape == (3, NUM_CLASSES)
    assert stop_from_state(run_dir) is True
    assert_gone(state.pid, state.shm_prefix)
    assert not (run_dir / "server.json").exists()
    assert (run_dir / "server.log").exists()  # the log of a detached run stays for inspection
