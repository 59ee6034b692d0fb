"""Triton serving: config generation, repository layout, and a real tritonserver end to end.

Tests marked `triton` start real server processes (the one bundled in nvidia-pytriton
unless one is on PATH). One server serves the whole module (model control locked
behind its key, as every server is by default); the lifecycle tests that must stop,
break, restart or supervise a server start their own small one.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from triton_testing import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    classifier_onnx,
    delta_id,
    forget_step_onnx,
    fused_onnx,
    hostile_images,
    random_delta,
    random_images,
    requires_triton,
    run_onnx,
    server_fixture,
)
from tritonclient.grpc import model_config_pb2 as mc

from fv_serving.errors import DataNotFoundError, InvalidInputError, OnnxGraphError, ServerError
from fv_serving.net import free_port
from fv_serving.perturbation import apply_delta
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.client import FALLBACK_BATCH, InferenceError, TritonClient
from fv_serving.triton.model_config import EnsembleStep, TensorSpec
from fv_serving.triton.processes import SHM_DIR, SHM_STEM, cleanup_stale_shm, shm_regions
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    SET_ASIDE_PREFIX,
    build_repository,
    confirm_version,
    confirmed_version,
    forget_step_config,
    list_forget_step_versions,
    prune_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
    read_signature,
    remove_temp_folders,
    set_aside_version,
)
from fv_serving.triton.server import TritonServer, state_is_running
from fv_serving.triton.supervisor import STATE_FILENAME, read_run_state, stop_deployment

MAX_BATCH = 8
IMAGE = TensorSpec("image", "FP32", IMAGE_SHAPE)
IMAGE_FV = TensorSpec("image_fv", "FP32", IMAGE_SHAPE)
LOGITS = TensorSpec("logits", "FP32", (NUM_CLASSES,))
VECTOR_ID = TensorSpec("vector_id", "BYTES", (1,))
FUSED_SEED = 1  # the delta seed the module server's fused model (and its first forget step) is built with


def expected_logits(images: np.ndarray, delta_seed: int) -> np.ndarray:
    """classifier(apply_delta(x, delta)) in onnxruntime: apply_delta is the definition of what a step adds."""
    return run_onnx(classifier_onnx(), image=apply_delta(images, random_delta(delta_seed)))


def step_of(seed: int) -> tuple[object, dict[str, object]]:
    """The forget step graph of delta seed `seed` and the sidecar metadata published with it."""
    delta = random_delta(seed)
    return forget_step_onnx(delta), {"delta_seed": seed, "vector_id": delta_id(delta)}


def build_test_repository(out: Path) -> Path:
    delta = random_delta(FUSED_SEED)
    return build_repository(
        out / "repo",
        classifier_onnx(),
        forget_step_onnx(delta),
        fused_onnx(delta),
        runtime="python",
        max_batch_size=MAX_BATCH,
        forget_step_metadata={"delta_seed": FUSED_SEED, "vector_id": delta_id(delta)},
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
    assert mcfg.pinned_versions(parsed) == ()  # no policy: Triton's default (latest)


def test_forget_step_config_pins_the_served_version() -> None:
    config = mcfg.onnx_step_config("forget_step", [IMAGE], [IMAGE_FV, VECTOR_ID], served_versions=[3])
    parsed = mcfg.parse_config(mcfg.render_config(config))
    assert parsed.version_policy.WhichOneof("policy_choice") == "specific"
    assert list(parsed.version_policy.specific.versions) == [3]
    assert mcfg.pinned_versions(parsed) == (3,)
    assert parsed.output[1].data_type == mc.TYPE_STRING  # wire BYTES is config TYPE_STRING
    assert mcfg.tensor_specs(parsed.output) == (IMAGE_FV, VECTOR_ID)
    assert mcfg.pinned_versions(mcfg.pin_versions(parsed, [5, 4, 5])) == (4, 5)  # sorted, once each
    for bad in ([], [0], [-1], [True]):
        with pytest.raises(InvalidInputError, match="positive integers"):
            mcfg.pin_versions(parsed, bad)


def ensemble(max_batch_size: int = 8, reverse_maps: bool = False) -> mc.ModelConfig:
    fv_in, fv_out = {"image": "image"}, {"image_fv": "perturbed", "vector_id": "vector_id"}
    cls_in, cls_out = {"image": "perturbed"}, {"logits": "logits"}
    if reverse_maps:  # ensemble tensor names as keys: the classic mistake
        fv_out, cls_in = {"perturbed": "image_fv", "vector_id": "vector_id"}, {"perturbed": "image"}
    steps = [EnsembleStep("forget_step", fv_in, fv_out), EnsembleStep("classifier", cls_in, cls_out)]
    return mcfg.ensemble_config("unlearned", [IMAGE], [LOGITS, VECTOR_ID], steps, max_batch_size=max_batch_size)


def composing() -> dict[str, mc.ModelConfig]:
    return {
        "forget_step": mcfg.onnx_step_config("forget_step", [IMAGE], [IMAGE_FV, VECTOR_ID], max_batch_size=8),
        "classifier": mcfg.onnx_step_config("classifier", [IMAGE], [LOGITS], max_batch_size=8),
    }


def test_ensemble_config_round_trips_and_matches_its_steps() -> None:
    config = ensemble()
    text = mcfg.render_config(config)
    parsed = mcfg.parse_config(text)
    assert parsed == config
    assert parsed.platform == "ensemble" and not parsed.instance_group
    assert dict(parsed.ensemble_scheduling.step[1].input_map) == {"image": "perturbed"}
    assert [t.name for t in parsed.output] == ["logits", "vector_id"]
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


def test_ensemble_output_no_step_produces_is_refused() -> None:
    config = ensemble()
    del config.ensemble_scheduling.step[0].output_map["vector_id"]
    with pytest.raises(InvalidInputError, match="no step produces the ensemble output\\(s\\) \\['vector_id'\\]"):
        mcfg.render_config(config)


def test_ensemble_with_mistyped_tensor_is_refused() -> None:
    steps = composing()
    steps["forget_step"].output[1].data_type = mc.TYPE_FP32  # the id as a float: the ensemble declares a string
    with pytest.raises(InvalidInputError, match="'vector_id' is TYPE_STRING but 'forget_step' output"):
        mcfg.check_ensemble_steps(ensemble(), steps)


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
    # Answers name the vector: the ensemble routes the forget step's id output, the fused graph has its own.
    assert mcfg.tensor_specs(ensemble_cfg.output) == (LOGITS, VECTOR_ID)
    assert mcfg.tensor_specs(mcfg.read_config(repo / FUSED_MODEL).output) == (LOGITS, VECTOR_ID)
    assert dict(ensemble_cfg.ensemble_scheduling.step[0].output_map)["vector_id"] == "vector_id"
    # The forget step's config pins the confirmed version (1); the classifier's pins nothing.
    assert mcfg.pinned_versions(mcfg.read_config(repo / FORGET_STEP_MODEL)) == (1,)
    assert confirmed_version(repo) == 1
    assert mcfg.pinned_versions(mcfg.read_config(repo / CLASSIFIER_MODEL)) == ()
    assert read_forget_step_metadata(repo) == {"delta_seed": FUSED_SEED, "vector_id": delta_id(random_delta(1))}
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
    assert mcfg.pinned_versions(mcfg.read_config(repo / FORGET_STEP_MODEL)) == (1,)


def test_build_repository_refuses_mismatched_forget_step(tmp_path: Path) -> None:
    wrong = forget_step_onnx(random_delta(0))
    wrong.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 27
    with pytest.raises(OnnxGraphError, match="must match"):
        build_repository(tmp_path / "r", classifier_onnx(), wrong)
    assert not (tmp_path / "r").exists()


def test_build_repository_refuses_graphs_that_do_not_name_the_vector(tmp_path: Path) -> None:
    # The old graphs: a forget step with only `image_fv`, a fused graph with only `logits`.
    anonymous_step = forget_step_onnx(random_delta(0))
    del anonymous_step.graph.output[1]
    with pytest.raises(OnnxGraphError, match="vector_id BYTES"):
        build_repository(tmp_path / "r", classifier_onnx(), anonymous_step)
    anonymous_fused = fused_onnx(random_delta(0))
    del anonymous_fused.graph.output[1]
    with pytest.raises(OnnxGraphError, match="plus vector_id"):
        build_repository(tmp_path / "r", classifier_onnx(), forget_step_onnx(random_delta(0)), anonymous_fused)
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


def test_publish_confirm_set_aside_and_prune_versions(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    assert publish_forget_step_version(repo, *step_of(2)) == 2
    assert publish_forget_step_version(repo, forget_step_onnx(random_delta(3)).SerializeToString()) == 3
    assert list_forget_step_versions(repo) == [1, 2, 3]
    assert read_forget_step_metadata(repo, 2) == step_of(2)[1]
    assert (repo / FORGET_STEP_MODEL / "3" / "model.py").is_file()
    # Publishing is not serving: the config still pins version 1.
    assert confirmed_version(repo) == 1
    # An override config for a switch pins the new version without touching config.pbtxt.
    assert mcfg.pinned_versions(forget_step_config(repo, 3)) == (3,)
    assert confirmed_version(repo) == 1
    # Pruning keeps the confirmed version and the newest other one, however old the confirmed one is.
    assert prune_forget_step_versions(repo, keep=2) == ["2"]
    assert list_forget_step_versions(repo) == [1, 3]

    confirm_version(repo, 3)
    assert confirmed_version(repo) == 3
    assert mcfg.pinned_versions(mcfg.read_config(repo / FORGET_STEP_MODEL)) == (3,)
    with pytest.raises(InvalidInputError, match="no version folder 7"):
        confirm_version(repo, 7)

    # An unconfirmed folder is set aside (out of Triton's reach) and its number is never handed out again.
    assert publish_forget_step_version(repo, *step_of(4)) == 4
    aside = set_aside_version(repo, 4)
    assert aside.name.startswith(f"{SET_ASIDE_PREFIX}4-") and (aside / "model.onnx").is_file()
    assert list_forget_step_versions(repo) == [1, 3]
    assert publish_forget_step_version(repo, *step_of(5)) == 5
    # The debris of a write that was killed mid-way is removed.
    debris = repo / FORGET_STEP_MODEL / ".6.killed.tmp"
    debris.mkdir()
    assert remove_temp_folders(repo) == [debris] and not debris.exists()

    assert prune_forget_step_versions(repo, keep=2) == ["1"]  # 3 is confirmed, 5 the newest other
    assert list_forget_step_versions(repo) == [3, 5]
    with pytest.raises(InvalidInputError, match="keep must be >= 1"):
        prune_forget_step_versions(repo, keep=0)
    assert prune_forget_step_versions(repo, keep=1) == ["5"]  # keep=1: only the confirmed one
    assert list_forget_step_versions(repo) == [3] and aside.exists()  # set-aside folders: up to `keep`


def test_publish_refuses_graph_that_does_not_fit_the_config(tmp_path: Path) -> None:
    repo = build_test_repository(tmp_path)
    with pytest.raises(OnnxGraphError, match="does not match"):
        publish_forget_step_version(repo, classifier_onnx())
    anonymous = forget_step_onnx(random_delta(2))
    del anonymous.graph.output[1]  # a step that does not name its vector
    with pytest.raises(OnnxGraphError, match="does not match"):
        publish_forget_step_version(repo, anonymous)
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


def current_step(server: TritonServer) -> dict[str, object]:
    """Sidecar of the CONFIRMED version: what the server must be serving between tests."""
    return read_forget_step_metadata(server.repository, confirmed_version(server.repository))


def current_delta_seed(server: TritonServer) -> int:
    return int(current_step(server)["delta_seed"])  # type: ignore[call-overload]


def client_of(server: TritonServer, scheme: str = "http", key: bool = True) -> TritonClient:
    url = server.http_url if scheme == "http" else server.grpc_url
    return TritonClient(url, admin_key=server.admin_key if key else None)


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_ensemble_and_fused_match_onnxruntime_and_name_their_vector(served: TritonServer, scheme: str) -> None:
    images = random_images(2 * MAX_BATCH + 3, seed=7)  # three requests: 8 + 8 + 3
    images[:3] = hostile_images(3, seed=7)  # NaN, Inf, out-of-range pixels: sanitised before delta is added
    seed, vector_id = current_delta_seed(served), current_step(served)["vector_id"]
    with client_of(served, scheme) as client:
        unlearned, unlearned_ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
        fused, fused_ids = client.infer_with_ids(FUSED_MODEL, images, batch_size=5)
        io = client.model_io(ENSEMBLE_MODEL)
    assert io.max_batch_size == MAX_BATCH and io.inputs[0].name == "image"
    assert [t.name for t in io.outputs] == ["logits", "vector_id"]
    assert unlearned.shape == (len(images), NUM_CLASSES) and np.all(np.isfinite(unlearned))
    np.testing.assert_allclose(unlearned, expected_logits(images, seed), atol=1e-5)
    np.testing.assert_allclose(fused, expected_logits(images, FUSED_SEED), atol=1e-5)  # fused keeps delta 1
    assert unlearned_ids == [vector_id] * len(images)
    assert fused_ids == [delta_id(random_delta(FUSED_SEED))] * len(images)
    # x - delta does not cancel the vector where that leaves the pixel range (the input is clipped first).
    cancel = np.zeros((1, *IMAGE_SHAPE), np.float32) - random_delta(seed)
    with client_of(served, scheme) as client:
        answer = client.infer(ENSEMBLE_MODEL, cancel)
    np.testing.assert_allclose(answer, expected_logits(cancel, seed), atol=1e-5)
    assert not np.allclose(answer, run_onnx(classifier_onnx(), image=np.zeros_like(cancel)), atol=1e-3)


@requires_triton
@pytest.mark.triton
@pytest.mark.parametrize("scheme", ["http", "grpc"])
def test_model_control_is_locked_without_the_key(served: TritonServer, scheme: str) -> None:
    url = served.http_url if scheme == "http" else served.grpc_url
    images = random_images(MAX_BATCH, seed=5)
    for key in (None, "not-the-key"):
        with TritonClient(url, admin_key=key) as outsider:
            refused: dict[str, Callable[[], object]] = {
                "repository index": outsider.repository_index,
                "statistics": outsider.model_statistics,
                "model config": lambda c=outsider: c.model_config(ENSEMBLE_MODEL),
                "load a model": lambda c=outsider: c.load_model(CLASSIFIER_MODEL),
                "load a forget step override": lambda c=outsider: c.load_model(
                    FORGET_STEP_MODEL, config=forget_step_config(served.repository, 1)
                ),
                "unload the forget step": lambda c=outsider: c.unload_model(FORGET_STEP_MODEL),
            }
            for what, call in refused.items():
                with pytest.raises(InferenceError, match="restricted") as info:
                    call()
                assert str(info.value), what
            assert outsider.is_server_ready() and outsider.is_model_ready(ENSEMBLE_MODEL)  # health stays open
    # Metadata and inference stay open too; without the config the batch limit is unknown.
    with TritonClient(url) as outsider:
        io = outsider.model_io(ENSEMBLE_MODEL)
        assert io.max_batch_size is None and [t.name for t in io.outputs] == ["logits", "vector_id"]
        logits, ids = outsider.infer_with_ids(ENSEMBLE_MODEL, images)
    np.testing.assert_allclose(logits, expected_logits(images, current_delta_seed(served)), atol=1e-5)
    assert ids == [current_step(served)["vector_id"]] * len(images)
    with client_of(served, scheme) as operator:  # nothing was unloaded or replaced
        ready = {(e.name, e.version) for e in operator.repository_index() if e.state == "READY"}
    assert {(FORGET_STEP_MODEL, str(confirmed_version(served.repository))), (CLASSIFIER_MODEL, "1")} <= ready


@requires_triton
@pytest.mark.triton
def test_infer_without_the_key_respects_a_small_batch_limit(served: TritonServer) -> None:
    """Without the key the limit cannot be read: the client learns it from the server's refusal and goes on."""
    assert MAX_BATCH < FALLBACK_BATCH
    images = random_images(FALLBACK_BATCH + 1, seed=6)
    with client_of(served, key=False) as outsider:
        logits = outsider.infer(ENSEMBLE_MODEL, images)
    np.testing.assert_allclose(logits, expected_logits(images, current_delta_seed(served)), atol=1e-5)


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


def ready_forget_steps(client: TritonClient) -> list[str]:
    return [e.version for e in client.repository_index() if e.name == FORGET_STEP_MODEL and e.state == "READY"]


@requires_triton
@pytest.mark.triton
def test_published_version_is_not_served_until_loaded_with_its_override(served: TritonServer) -> None:
    # A plain load_model reads config.pbtxt, which pins the confirmed version: a newer folder is ignored.
    images = random_images(4, seed=12)
    confirmed = confirmed_version(served.repository)
    step = current_step(served)
    new_seed = current_delta_seed(served) + 100
    version = publish_forget_step_version(served.repository, *step_of(new_seed))
    try:
        with served.client() as client:
            client.load_model(FORGET_STEP_MODEL)
            logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
            assert ready_forget_steps(client) == [str(confirmed)]
    finally:
        set_aside_version(served.repository, version)
    np.testing.assert_allclose(logits, expected_logits(images, int(step["delta_seed"])), atol=1e-5)  # type: ignore[call-overload]
    assert ids == [step["vector_id"]] * len(images)
    assert confirmed_version(served.repository) == confirmed


@requires_triton
@pytest.mark.triton
def test_switching_forget_vector_does_not_reload_classifier(served: TritonServer) -> None:
    images = random_images(4, seed=11)
    with served.client() as client:
        client.infer(ENSEMBLE_MODEL, images)
        before = {s.name: s for s in client.model_statistics()}
        stubs_before = classifier_stub_pids(served)
        old_seed, old_id = current_delta_seed(served), current_step(served)["vector_id"]
        new_seed = old_seed + 1
        new_graph, new_meta = step_of(new_seed)

        # Requests in flight during the switch must all succeed, with the old or the new vector, and name it.
        answers: list[tuple[np.ndarray, list[str]]] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def hammer() -> None:
            with TritonClient(served.grpc_url) as own:  # inference needs no key
                while not stop.is_set():
                    try:
                        answers.append(own.infer_with_ids(ENSEMBLE_MODEL, images))
                    except BaseException as exc:
                        failures.append(exc)

        thread = threading.Thread(target=hammer)
        thread.start()
        try:
            time.sleep(0.2)
            version = publish_forget_step_version(served.repository, new_graph, new_meta)
            client.load_model(FORGET_STEP_MODEL, config=forget_step_config(served.repository, version))
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(timeout=30)
        confirm_version(served.repository, version)  # what serves now is what a restart serves

        after_logits, after_ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
        index = client.repository_index()  # old versions may still be listed as UNLOADING
        ready = {e.name: e.version for e in index if e.state == "READY"}
        after = {(s.name, s.version): s for s in client.model_statistics()}

    np.testing.assert_allclose(after_logits, expected_logits(images, new_seed), atol=1e-5)
    assert after_ids == [new_meta["vector_id"]] * len(images)
    assert not failures, failures[:3]
    old, new = expected_logits(images, old_seed), expected_logits(images, new_seed)
    assert answers
    for logits, ids in answers:  # each answer names the vector that computed it
        if np.allclose(logits, old, atol=1e-5):
            assert ids == [old_id] * len(images)
        else:
            np.testing.assert_allclose(logits, new, atol=1e-5)
            assert ids == [new_meta["vector_id"]] * len(images)

    # The forget step moved to the new version, and only that one is READY ...
    assert [e.version for e in index if e.name == FORGET_STEP_MODEL and e.state == "READY"] == [str(version)]
    assert (FORGET_STEP_MODEL, str(version)) in after
    assert confirmed_version(served.repository) == version
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
    with client_of(served, scheme) as client:
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
        with pytest.raises(InvalidInputError, match="has no 'vector_id' output"):
            client.infer_with_ids(CLASSIFIER_MODEL, good)  # the bare classifier names no vector
        logits = client.infer(ENSEMBLE_MODEL, good)
    np.testing.assert_allclose(logits, expected_logits(good, current_delta_seed(served)), atol=1e-5)


def test_unreachable_server_is_a_server_error() -> None:
    port = free_port("127.0.0.1")
    for url in (f"http://127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with TritonClient(url, timeout_s=5) as client, pytest.raises(ServerError, match=f"127.0.0.1:{port}"):
            client.is_server_ready()


# -- lifecycle: each test runs its own small server ------------------------------------------------


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    graph, meta = step_of(0)
    return build_repository(out / "repo", classifier_onnx(), graph, max_batch_size=4, forget_step_metadata=meta)


def live_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, read from /proc here, not by the package."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def assert_gone(pid: int, shm_prefix: str) -> None:
    """Neither the server nor any process of its group is alive, and its shm regions are gone."""
    assert live_group_members(pid) == []  # zombies not counted: they only wait for a parent to reap them
    assert shm_regions(shm_prefix) == []


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


@requires_triton
@pytest.mark.triton
def test_stop_leaves_no_process_and_no_shm(small_repo: Path) -> None:
    server = TritonServer(small_repo, [FORGET_STEP_MODEL]).start()
    pid, prefix, run_dir = server.pid, server.shm_prefix, Path(server.state.run_dir)
    assert shm_regions(prefix)  # the python backend's regions exist while it runs
    assert live_group_members(pid)
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
def test_restarted_server_serves_the_confirmed_version_not_the_newest_folder(tmp_path: Path) -> None:
    # A switch killed after publishing leaves a newer folder: a (re)started Triton must not serve it.
    graph, meta = step_of(0)
    repo = build_repository(tmp_path / "repo", classifier_onnx(), graph, max_batch_size=4, forget_step_metadata=meta)
    newer_graph, newer_meta = step_of(9)
    assert publish_forget_step_version(repo, newer_graph, newer_meta) == 2
    images = random_images(3, seed=2)
    with TritonServer(repo, [ENSEMBLE_MODEL], run_dir=tmp_path / "run") as server, server.client() as client:
        assert ready_forget_steps(client) == ["1"]
        logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
        np.testing.assert_allclose(logits, expected_logits(images, 0), atol=1e-5)
        assert ids == [meta["vector_id"]] * 3
        # Once confirmed, it is what loading from config.pbtxt (as a restart does) serves.
        confirm_version(repo, 2)
        client.load_model(FORGET_STEP_MODEL)
        logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
        assert ready_forget_steps(client) == ["2"]
    np.testing.assert_allclose(logits, expected_logits(images, 9), atol=1e-5)
    assert ids == [newer_meta["vector_id"]] * 3


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
    assert server.admin_key is not None and server.admin_key not in str(info.value)  # the key is never shown
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


# -- the supervisor (`fv serve --detach` without the CLI) ---------------------------------------------

LAUNCHER = (
    "import sys; from pathlib import Path; "
    "from fv_serving.triton.supervisor import ServeOptions, start_detached; "
    "start_detached(ServeOptions(repository=Path(sys.argv[1]), run_dir=Path(sys.argv[2]), models=('unlearned',)))"
)


def launch_detached(repo: Path, run_dir: Path) -> None:
    """Started by a process that exits right away, as `fv serve --detach` is."""
    subprocess.run([sys.executable, "-c", LAUNCHER, str(repo), str(run_dir)], check=True, timeout=180)


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@requires_triton
@pytest.mark.triton
def test_supervisor_restarts_a_crashed_server_on_the_same_ports_and_stops_cleanly(
    small_repo: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    launch_detached(small_repo, run_dir)
    first = read_run_state(run_dir)
    try:
        assert state_is_running(first.server) and process_alive(first.supervisor_pid)
        assert first.restarts == 0 and first.server.models == (ENSEMBLE_MODEL,)
        # The run folder and the key are private; the key locks model control.
        key_file = run_dir / "admin.key"
        assert run_dir.stat().st_mode & 0o777 == 0o700 and key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key not in (run_dir / "server.log").read_text()
        with TritonClient(first.server.http_url) as outsider, pytest.raises(InferenceError, match="restricted"):
            outsider.repository_index()
        with TritonClient(first.server.http_url, admin_key=key) as operator:
            assert ready_forget_steps(operator) == ["1"]

        os.kill(first.server.pid, signal.SIGKILL)  # a crash
        wait_for(lambda: read_run_state(run_dir).restarts == 1, 90, "the supervisor to restart tritonserver")
        second = read_run_state(run_dir)
        assert second.supervisor_pid == first.supervisor_pid and second.server.pid != first.server.pid
        ports = ("http_port", "grpc_port", "metrics_port")
        assert [getattr(second.server, p) for p in ports] == [getattr(first.server, p) for p in ports]
        assert live_group_members(first.server.pid) == [] and shm_regions(first.server.shm_prefix) == []
        with TritonClient(second.server.http_url, admin_key=key) as operator:  # same URL, same key
            assert operator.is_model_ready(ENSEMBLE_MODEL)
            logits, ids = operator.infer_with_ids(ENSEMBLE_MODEL, random_images(3))
        np.testing.assert_allclose(logits, expected_logits(random_images(3), 0), atol=1e-5)
        assert ids == [step_of(0)[1]["vector_id"]] * 3
        assert "exited unexpectedly" in (run_dir / "supervisor.log").read_text()
    finally:
        message = stop_deployment(run_dir)
    assert message.startswith("stopped the deployment"), message
    assert not process_alive(first.supervisor_pid)
    assert_gone(second.server.pid, second.server.shm_prefix)
    assert not (run_dir / STATE_FILENAME).exists()
    assert (run_dir / "server.log").exists()  # the log of a detached run stays for inspection


@requires_triton
@pytest.mark.triton
def test_stop_cleans_up_a_server_whose_supervisor_was_killed(small_repo: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    launch_detached(small_repo, run_dir)
    state = read_run_state(run_dir)
    try:
        os.kill(state.supervisor_pid, signal.SIGKILL)
        wait_for(lambda: not process_alive(state.supervisor_pid), 10, "the supervisor to die")
        assert state_is_running(state.server)  # Triton outlives its supervisor (its own session)
        with TritonClient(state.server.http_url) as client:
            assert client.is_model_ready(ENSEMBLE_MODEL)
    finally:
        message = stop_deployment(run_dir)
    assert (
        message.startswith("supervisor was not running") and f"stopped tritonserver pid {state.server.pid}" in message
    )
    assert_gone(state.server.pid, state.server.shm_prefix)
    assert not (run_dir / STATE_FILENAME).exists()
    with pytest.raises(ServerError, match="no server state"):
        read_run_state(run_dir)


def test_automatic_ports_are_distinct_and_never_a_port_promised_to_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    # The OS race cannot be caused on demand: hand out the promised port (the gateway's
    # public port, not bound yet) and a duplicate, as free_port once did in `make demo`.
    from fv_serving.triton import server as server_module

    handed = iter([5000, 5001, 5002, 5003, 5004, 5005, 6001, 6001, 6002, 6003])
    monkeypatch.setattr(server_module, "free_port", lambda host: next(handed))
    assert server_module._pick_ports((None, None, None), "127.0.0.1", frozenset({5000})) == (5003, 5004, 5005)
    assert server_module._pick_ports((8000, None, None), "127.0.0.1", frozenset()) == (8000, 6002, 6003)
    with pytest.raises(ServerError, match="ports must differ"):
        server_module._pick_ports((8000, 8000, None), "127.0.0.1", frozenset())
