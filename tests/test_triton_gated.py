"""The gated forget step on a REAL tritonserver: switched like any vector, under load, after a restart, and rolled back.

The deployment serves the session's tiny classifier (trained on real Fashion-MNIST)
with its Trouser vector. References are computed outside the server: the gated fused
graph and the plain forget step in local onnxruntime, both checked elsewhere against
PyTorch (tests/test_gated.py, tests/test_onnx_fuse.py).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from triton_testing import requires_triton

from fv_serving.cli.main import main
from fv_serving.data import Dataset, to_numpy_images
from fv_serving.errors import InvalidInputError, SwitchError
from fv_serving.fingerprint import logits_match
from fv_serving.models import load_classifier
from fv_serving.onnx.checked import fuse_gated_vector
from fv_serving.onnx.export import export_classifier
from fv_serving.onnx.fuse import forget_step_graph
from fv_serving.onnx.gated import gated_vector_id
from fv_serving.onnx.graph import load_model
from fv_serving.triton import journal
from fv_serving.triton import switch as switch_module
from fv_serving.triton.build import build_deployment
from fv_serving.triton.client import TritonClient
from fv_serving.triton.repository import (
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    GATED_STEP_MODEL,
    SET_ASIDE_PREFIX,
    confirmed_version,
)
from fv_serving.triton.server import TritonServer
from fv_serving.triton.switch import SwitchResult, ensemble_reference, switch_vector
from fv_serving.triton.topology import GATED, PLAIN, serving_mode
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import ForgetVector, load_vector, save_vector

pytestmark = [requires_triton, pytest.mark.triton]

MAX_BATCH = 32


@pytest.fixture(scope="module")
def classifier_onnx(tiny_classifier_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gated") / "classifier.onnx"
    export_classifier(load_classifier(tiny_classifier_path).model, path)
    return path


@pytest.fixture(scope="module")
def vectors(class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Trouser (learned), its negation gating on two classes, and a random-subset vector."""
    vector, path = class_vector
    out = tmp_path_factory.mktemp("gated-vectors")
    two = ForgetVector(classifier=vector.classifier, delta=-vector.delta, forget={"kind": "class", "classes": [1, 8]})
    rand = ForgetVector(classifier=vector.classifier, delta=vector.delta, forget={"kind": "random", "percent": 10})
    return {
        "trouser": path,
        "two": save_vector(two, out / "two.safetensors"),
        "random": save_vector(rand, out / "random.safetensors"),
    }


@pytest.fixture(scope="module")
def served(
    classifier_onnx: Path, vectors: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("gated-deployment") / "repo"
    build_deployment(
        repo, VectorChoice(vector=vectors["trouser"]), load_model(classifier_onnx), max_batch_size=MAX_BATCH
    )
    with TritonServer(repo, [ENSEMBLE_MODEL]) as server:
        yield server


@pytest.fixture(scope="module")
def images(fmnist: Dataset) -> np.ndarray:
    return to_numpy_images(fmnist.test, torch.arange(0, 640, 10))  # 64 real test images, every class


def references(classifier: Path, vectors: dict[str, Path], x: np.ndarray) -> dict[str, np.ndarray]:
    """Answer id -> logits of every vector plain and gated (class-wise ones), in local onnxruntime."""
    clf = load_model(classifier)
    out = {}
    for name in ("trouser", "two"):
        vector = load_vector(vectors[name])
        out[vector.vector_id] = ensemble_reference(clf, forget_step_graph(vector), x)
        gated = fuse_gated_vector(clf, vector, id_output=True).graph
        out[gated_vector_id(vector)] = ensemble_reference_of_fused(gated, x)
    return out


def ensemble_reference_of_fused(graph: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from fv_serving.onnx.runtime import make_session

    session = make_session(graph, threads=1)
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def switch(server: TritonServer, path: Path, gated: bool) -> SwitchResult:
    """A switch through the library; what it must leave: journal begin + confirmed, the topology on disk, the id."""
    repo = server.repository
    logged = len(journal.read(repo))
    with server.client() as client:
        result = switch_vector(repo, client, VectorChoice(vector=path), gated=gated, log_path=server.log_path)
        _, ids = client.infer_with_ids(ENSEMBLE_MODEL, np.full((2, 1, 28, 28), 0.5, np.float32))
    assert ids == [result.vector_id] * 2
    assert serving_mode(repo) == (GATED if gated else PLAIN) == result.topology
    model = GATED_STEP_MODEL if gated else FORGET_STEP_MODEL
    assert confirmed_version(repo, model=model) == result.version
    events = [e["event"] for e in journal.read(repo)[logged:] if e["event"] != "recovered"]
    assert events == ["begin", "confirmed"]
    if result.classifier is not None:  # a reload after the gated topology (classifier idle) is Triton's, and harmless
        assert not result.classifier.disturbed, result.classifier.describe()
    return result


def test_gated_and_plain_switches_under_load(
    served: TritonServer, classifier_onnx: Path, vectors: dict[str, Path], images: np.ndarray
) -> None:
    """plain -> gated -> gated -> plain -> gated -> plain under four clients: nothing fails, every answer is exact."""
    switch(served, vectors["trouser"], gated=False)
    expected = references(classifier_onnx, vectors, images)
    stop, failures, mismatches, seen = threading.Event(), [], [], set()

    def loop(url: str) -> None:
        with TritonClient(url) as client:
            while not stop.is_set():
                try:
                    logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
                except Exception as exc:  # every failure counts, whatever its type
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                seen.update(ids)  # a call of 64 images is two requests of 32: a switch may come between them
                for row, vector_id in enumerate(ids):
                    if vector_id not in expected or not logits_match(logits[row], expected[vector_id][row]):
                        mismatches.append(vector_id)

    threads = [threading.Thread(target=loop, args=(u,), daemon=True) for u in [served.http_url, served.grpc_url] * 2]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    plan = [("trouser", True), ("two", True), ("two", False), ("trouser", True), ("trouser", False)]
    results = [switch(served, vectors[name], gated) for name, gated in plan]
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == [] and mismatches == []
    assert [r.topology_changed for r in results] == [True, False, True, True, True]
    assert seen == set(expected)  # every vector, plain and gated, was served
    trouser = load_vector(vectors["trouser"])
    gated, plain = expected[gated_vector_id(trouser)], expected[trouser.vector_id]
    original = ensemble_reference_of_fused(load_model(classifier_onnx), images)
    kept = original.argmax(1) != 1  # images the classifier puts in a retained class keep its answers when gated
    assert 0 < kept.sum() < len(images) and np.allclose(gated[kept], original[kept], atol=1e-5)
    assert not np.allclose(plain[kept], original[kept], atol=1e-2)  # which the universal delta does not


def test_a_failed_topology_change_leaves_the_old_vector_serving(
    served: TritonServer, vectors: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = Path(served.repository)
    switch(served, vectors["trouser"], gated=True)  # both step models exist and have a confirmed pin
    for start, target in ((False, True), (True, False)):
        switch(served, vectors["trouser"], gated=start)
        pins = {m: confirmed_version(repo, model=m) for m in (FORGET_STEP_MODEL, GATED_STEP_MODEL)}
        with served.client() as client:
            before = client.infer_with_ids(ENSEMBLE_MODEL, np.full((2, 1, 28, 28), 0.3, np.float32))

        def fail_at_topology(name: str) -> None:
            if name == "switch:before-confirm":
                raise SwitchError("injected failure after the topology change")

        monkeypatch.setattr(switch_module, "failpoint", fail_at_topology)
        with served.client() as client, pytest.raises(SwitchError, match="keeps serving"):
            switch_vector(repo, client, VectorChoice(vector=vectors["two"]), gated=target)
        monkeypatch.undo()
        with served.client() as client:
            after = client.infer_with_ids(ENSEMBLE_MODEL, np.full((2, 1, 28, 28), 0.3, np.float32))
        assert after[1] == before[1] and logits_match(after[0], before[0])  # the old vector, in the old topology
        assert serving_mode(repo) == (GATED if start else PLAIN)
        assert {m: confirmed_version(repo, model=m) for m in pins} == pins  # the new step's pin restored
        assert journal.read(repo)[-1]["event"] == "rolled_back"
        new_step = repo / (GATED_STEP_MODEL if target else FORGET_STEP_MODEL)
        assert any(p.name.startswith(SET_ASIDE_PREFIX) for p in new_step.iterdir())  # the new version set aside


def test_refusals_change_nothing(served: TritonServer, vectors: dict[str, Path]) -> None:
    repo = Path(served.repository)
    logged = len(journal.read(repo))
    with served.client() as client:
        with pytest.raises(InvalidInputError, match="class-wise"):
            switch_vector(repo, client, VectorChoice(vector=vectors["random"]), gated=True)
        with pytest.raises(InvalidInputError, match="nothing to gate"):
            switch_vector(repo, client, VectorChoice(off=True), gated=True)
    assert len(journal.read(repo)) == logged


def test_gated_build_serves_gated_after_restart_and_switches(
    tiny_classifier_path: Path, vectors: dict[str, Path], tmp_path: Path, images: np.ndarray, classifier_onnx: Path
) -> None:
    repo = tmp_path / "repo"
    build = ["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(vectors["trouser"])]
    assert main([*build, "--gated", "--fused", "--max-batch-size", "16", "--out", str(repo)]) == 0
    deployment = json.loads((repo / "deployment.json").read_text())
    assert deployment["topology"] == GATED and serving_mode(repo) == GATED
    assert deployment["initial_vector"]["gate"]["forgotten_classes"] == [1]
    expected = references(classifier_onnx, vectors, images)
    trouser = load_vector(vectors["trouser"])
    for _ in range(2):  # a start, then a restart: the gated topology is what the disk says
        with TritonServer(repo, [ENSEMBLE_MODEL, "fused"]) as server, server.client() as client:
            logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
            assert set(ids) == {gated_vector_id(trouser)} and logits_match(logits, expected[ids[0]])
            fused_logits, fused_ids = client.infer_with_ids("fused", images)
            assert set(fused_ids) == {gated_vector_id(trouser)} and logits_match(fused_logits, expected[ids[0]])
    with TritonServer(repo, [ENSEMBLE_MODEL]) as server:
        result = switch(server, vectors["two"], gated=False)  # plain, right after a start in the gated topology
        assert result.topology_changed and any("does not load at a start" in note for note in result.recovered)
