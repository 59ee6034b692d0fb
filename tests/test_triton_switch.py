"""Live forget-vector switches on a REAL tritonserver serving a classifier trained on real Fashion-MNIST.

One server serves the whole module (repository built by `build_deployment` from the
session's tiny classifier, exported to ONNX as `fv triton build --classifier` does,
and its Trouser vector; model control locked behind the server's key). Each test
first switches to the vector it starts from, so the tests do not depend on their
order. References are computed outside the server: onnxruntime on the deployed
classifier graph after `apply_delta` (the definition of what a forget step adds),
and PyTorch's PerturbedClassifier for the accuracy claims.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from triton_testing import forget_step_onnx, random_delta, requires_triton

from fv_serving.admission import AdmissionPolicy
from fv_serving.data import Dataset, to_numpy_images
from fv_serving.errors import FileFormatError, InvalidInputError, ModelMismatchError, SwitchError
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.models import PerturbedClassifier, load_classifier
from fv_serving.onnx.checked import fuse_vector
from fv_serving.onnx.export import export_classifier
from fv_serving.onnx.fuse import forget_step_graph
from fv_serving.onnx.graph import OFF_ID, load_model
from fv_serving.onnx.runtime import make_session
from fv_serving.perturbation import apply_delta
from fv_serving.pipeline import open_workspace
from fv_serving.triton import journal
from fv_serving.triton import switch as switch_module
from fv_serving.triton.build import build_deployment
from fv_serving.triton.client import InferenceError, TritonClient
from fv_serving.triton.deployment import deployed_classifier
from fv_serving.triton.forget_step import prepare_forget_step
from fv_serving.triton.locking import switch_lock
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    SET_ASIDE_PREFIX,
    confirmed_version,
    forget_step_config,
    list_forget_step_versions,
    publish_forget_step_version,
    read_forget_step_metadata,
)
from fv_serving.triton.server import TritonServer
from fv_serving.triton.status import collect_status
from fv_serving.triton.switch import SwitchResult, ensemble_reference, switch_vector
from fv_serving.vector_choice import VectorChoice
from fv_serving.vectors import ForgetVector, VectorBank, load_vector, save_bank, save_vector

pytestmark = [requires_triton, pytest.mark.triton]

MAX_BATCH = 32
N_IMAGES = 1000  # real test images scored through the server
SHAPE = (1, 28, 28)


# -- fixtures -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Files:
    """Vector files of the tiny classifier (and bad ones), written once for the module."""

    trouser: Path  # learned on real data (conftest.class_vector)
    half: Path  # 0.5 * the Trouser delta: a second valid vector of the same classifier
    bank: Path  # bank [trouser delta, -0.5 * trouser delta] for classes 1 and 3
    nan: Path
    wrong_shape: Path
    other_classifier: Path
    huge: Path  # finite, but entries far beyond the pixel range: admission refuses it
    zero: Path  # changes nothing: admission refuses it unless asked


@pytest.fixture(scope="module")
def files(
    class_vector: tuple[ForgetVector, Path], other_classifier_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Files:
    vector, trouser = class_vector
    out = tmp_path_factory.mktemp("vectors")

    def like(delta: np.ndarray, name: str) -> Path:
        return save_vector(ForgetVector(classifier=vector.classifier, delta=delta, clamp=vector.clamp), out / name)

    bank = VectorBank(
        classifier=vector.classifier,
        vectors=np.stack([vector.delta, -0.5 * vector.delta]),
        classes=[1, 3],
        notes=vector.notes,
    )
    nan = ForgetVector(classifier=vector.classifier, delta=vector.delta.copy())
    nan.delta[0, 3, 4] = np.nan  # after construction: the file is written, loading must refuse it
    huge = vector.delta.copy()
    huge[0, 5, 5] = 50.0
    bigger = ClassifierFingerprint("0" * 64, (1, 32, 32), 10, np.zeros((4, 10), np.float32))
    other = open_workspace(other_classifier_path).fingerprint()
    return Files(
        trouser=trouser,
        half=like(vector.delta * 0.5, "half.safetensors"),
        bank=save_bank(bank, out / "bank.safetensors"),
        nan=save_vector(nan, out / "nan.safetensors"),
        wrong_shape=save_vector(ForgetVector(classifier=bigger, delta=np.zeros((1, 32, 32))), out / "wide.safetensors"),
        other_classifier=save_vector(ForgetVector(classifier=other, delta=vector.delta), out / "other.safetensors"),
        huge=like(huge, "huge.safetensors"),
        zero=like(np.zeros_like(vector.delta), "zero.safetensors"),
    )


@pytest.fixture(scope="module")
def served(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("deployment")
    loaded = load_classifier(tiny_classifier_path)
    export_classifier(loaded.model, root / "classifier.onnx")  # what `fv triton build --classifier` does
    report = build_deployment(
        root / "repo",
        VectorChoice(vector=class_vector[1]),
        load_model(root / "classifier.onnx"),
        classifier_source=str(tiny_classifier_path),
        class_names=loaded.model.spec.class_names,
        fused=True,
        max_batch_size=MAX_BATCH,
    )
    assert report.vector_id == class_vector[0].vector_id
    with TritonServer(report.repository, [ENSEMBLE_MODEL, FUSED_MODEL], run_dir=root / "run") as server:
        yield server


@pytest.fixture(scope="module")
def images(fmnist: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The first N_IMAGES real test images and their labels."""
    return to_numpy_images(fmnist.test, torch.arange(N_IMAGES)), fmnist.test.labels[:N_IMAGES].numpy()


def vector_id_of(path: Path | None) -> str:
    return load_vector(path).vector_id if path is not None else OFF_ID


def step_sha256(repo: Path, version: int) -> str:
    return hashlib.sha256((repo / FORGET_STEP_MODEL / str(version) / "model.onnx").read_bytes()).hexdigest()


def switch(
    server: TritonServer, force: bool = False, policy: AdmissionPolicy | None = None, **choice: Any
) -> SwitchResult:
    """Switch through the library, as `fv switch` does, and check what every switch must leave behind.

    The classifier stays loaded; the new version is confirmed (pinned in config.pbtxt); the
    journal records the switch (begin, then confirmed, with the graph's digest); and the
    ensemble's answers name the new vector.
    """
    repo = Path(server.repository)
    logged = len(journal.read(repo))
    with server.client() as client:
        result = switch_vector(
            repo, client, VectorChoice(**choice), force=force, policy=policy, log_path=server.log_path
        )
        _, ids = client.infer_with_ids(ENSEMBLE_MODEL, np.full((3, *SHAPE), 0.5, np.float32))
    assert not result.classifier.reloaded, result.classifier.describe()
    assert confirmed_version(repo) == result.version == max(list_forget_step_versions(repo))
    assert ids == [result.vector_id] * 3
    events = [e for e in journal.read(repo)[logged:] if e["event"] != "recovered"]
    assert [e["event"] for e in events] == ["begin", "confirmed"]
    begin, confirmed = events
    assert begin["switch"] == confirmed["switch"]
    assert confirmed["from"]["version"] == result.previous_version
    assert confirmed["from"]["vector_id"] == result.previous_vector_id
    assert confirmed["to"] == {
        "version": result.version,
        "vector_id": result.vector_id,
        "sha256": step_sha256(repo, result.version),
    }
    return result


@cache
def _classifier_session(repository: str) -> Any:
    return make_session(deployed_classifier(repository), threads=1)


def reference(server: TritonServer, vector: ForgetVector | None, x: np.ndarray) -> np.ndarray:
    """What the ensemble must answer: the deployed classifier on apply_delta(x) (just sanitize(x) when off)."""
    delta, clamp = (vector.delta, vector.clamp) if vector is not None else (np.float32(0.0), None)
    session = _classifier_session(str(server.repository))
    return np.asarray(session.run(None, {session.get_inputs()[0].name: apply_delta(x, delta, clamp)})[0])


def server_view(server: TritonServer) -> tuple[list[int], int, list[tuple[str, str, str]]]:
    """Version folders on disk, the confirmed version, and the live rows of the server's repository index."""
    with server.client() as client:
        index = [(e.name, e.version, e.state) for e in client.repository_index() if e.state in ("READY", "LOADING")]
    return list_forget_step_versions(server.repository), confirmed_version(server.repository), sorted(index)


def classifier_loads(server: TritonServer) -> int:
    return server.log_path.read_text().count(f"successfully loaded '{CLASSIFIER_MODEL}'")


# -- parity -------------------------------------------------------------------------------------------


def test_ensemble_equals_fused_onnx_on_real_images(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    switch(served, vector=files.trouser)  # the vector the fused model was built with
    x = images[0][:256]
    vector = load_vector(files.trouser)
    fused_graph = fuse_vector(deployed_classifier(served.repository), vector).graph
    session = make_session(fused_graph, threads=1)
    expected = session.run(None, {"image": x})[0]
    with TritonClient(served.http_url) as http, TritonClient(served.grpc_url) as grpc:  # inference needs no key
        ensemble, ensemble_ids = http.infer_with_ids(ENSEMBLE_MODEL, x)
        fused, fused_ids = grpc.infer_with_ids(FUSED_MODEL, x, batch_size=7)
    np.testing.assert_allclose(ensemble, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ensemble, reference(served, vector, x), rtol=0, atol=1e-5)
    # the library's own reference (the published step graph) agrees with the definition
    step = forget_step_graph(vector, SHAPE)
    np.testing.assert_allclose(ensemble_reference(deployed_classifier(served.repository), step, x), expected, atol=1e-5)
    assert ensemble_ids == fused_ids == [vector.vector_id] * len(x)


# -- accuracy through the server, as PyTorch predicts -----------------------------------------------


def per_class(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([100.0 * np.mean(predicted[labels == c] == c) for c in range(10)])


def test_switch_forgets_the_class_as_pytorch_predicts_and_off_restores(
    served: TritonServer,
    files: Files,
    images: tuple[np.ndarray, np.ndarray],
    tiny_classifier_path: Path,
    class_vector: tuple[ForgetVector, Path],
) -> None:
    x, labels = images
    vector = class_vector[0]
    forgotten = vector.forget["classes"][0]
    model = load_classifier(tiny_classifier_path).model
    with torch.no_grad():
        original = model(torch.from_numpy(x)).argmax(1).numpy()
        unlearned = PerturbedClassifier(model, torch.from_numpy(vector.delta), vector.clamp)
        perturbed = unlearned(torch.from_numpy(x)).argmax(1).numpy()
    loads = classifier_loads(served)

    def through_server(vector_id: str) -> np.ndarray:
        with TritonClient(served.http_url) as client:
            logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, x)
        assert set(ids) == {vector_id}
        return logits.argmax(1)

    assert switch(served, off=True).vector_id == OFF_ID
    served_original = through_server(OFF_ID)
    switch(served, vector=files.trouser)
    served_unlearned = through_server(vector.vector_id)
    switch(served, off=True)
    served_restored = through_server(OFF_ID)

    # The server agrees with PyTorch image by image (float noise may flip a near-tie, hence <= 1).
    assert np.sum(served_original != original) <= 1
    assert np.sum(served_unlearned != perturbed) <= 1
    np.testing.assert_array_equal(served_restored, served_original)
    acc_original, acc_unlearned = per_class(served_original, labels), per_class(served_unlearned, labels)
    np.testing.assert_allclose(acc_unlearned, per_class(perturbed, labels), atol=1.0)
    # The forgotten class collapses; the others stay within the retain margin of a quick vector.
    assert acc_original[forgotten] > 80.0
    assert acc_unlearned[forgotten] < 10.0
    assert classifier_loads(served) == loads == 1


def test_bank_compositions_serve_the_combined_delta(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x = images[0][:64]
    trouser = load_vector(files.trouser)
    cases = [
        ({"classes": ("Trouser",), "mode": "sum"}, trouser.delta),
        ({"classes": ("1", "Dress"), "mode": "mean"}, 0.25 * trouser.delta),  # (d - 0.5 d) / 2
    ]
    for choice, delta in cases:
        result = switch(served, bank=files.bank, **choice)
        expected = reference(
            served, ForgetVector(classifier=trouser.classifier, delta=delta), x
        )  # the bank has no clamp
        with TritonClient(served.http_url) as client:
            logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, x)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
        assert ids == [result.vector_id] * len(x)
        meta = read_forget_step_metadata(served.repository, result.version)
        assert meta["source"]["kind"] == "bank" and meta["vector_id"] == result.vector_id
        assert "composed" in meta["forget"]

    # 0.5 d - 0.5 d = 0: a composition that forgets nothing is refused (nothing touched) unless asked for.
    view, logged = server_view(served), len(journal.read(served.repository))
    with served.client() as client, pytest.raises(InvalidInputError, match="would forget nothing"):
        switch_vector(served.repository, client, VectorChoice(bank=files.bank, coefficients=(0.5, 1.0)))
    assert server_view(served) == view and len(journal.read(served.repository)) == logged
    result = switch(served, policy=AdmissionPolicy(allow_noop=True), bank=files.bank, coefficients=(0.5, 1.0))
    assert any("changes nothing" in w and "--allow-noop" in w for w in result.warnings)
    assert read_forget_step_metadata(served.repository, result.version)["warnings"] == list(result.warnings)
    with TritonClient(served.http_url) as client:
        expected = reference(served, None, x)  # a zero delta answers like forgetting off
        np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, x), expected, rtol=0, atol=1e-5)


# -- switching under load -----------------------------------------------------------------------------


def test_switch_under_concurrent_load_never_fails_or_mixes(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    threads_n, min_requests = 8, 1000
    batches = [images[0][4 * i : 4 * i + 4] for i in range(threads_n)]
    plan = [("trouser", files.trouser), ("half", files.half), ("off", None), ("trouser", files.trouser)]
    vectors = {"trouser": load_vector(files.trouser), "half": load_vector(files.half), "off": None}
    ids = {key: (v.vector_id if v is not None else OFF_ID) for key, v in vectors.items()}
    expected = {key: [reference(served, v, b) for b in batches] for key, v in vectors.items()}
    switch(served, vector=files.trouser)
    logged = len(journal.read(served.repository))

    answers: list[list[tuple[float, float, np.ndarray, list[str]]]] = [[] for _ in range(threads_n)]
    failures: list[BaseException] = []
    done = threading.Event()

    def hammer(i: int) -> None:
        url = served.http_url if i % 2 == 0 else served.grpc_url
        with TritonClient(url) as client:  # plain clients: inference is open, model control is not
            while not done.is_set():
                sent = time.monotonic()
                try:
                    out, named = client.infer_with_ids(ENSEMBLE_MODEL, batches[i])
                except BaseException as exc:
                    failures.append(exc)
                    continue
                answers[i].append((sent, time.monotonic(), out, named))

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads_n)]
    for w in workers:
        w.start()
    windows: list[tuple[float, float]] = []  # (start, end) of switch k, which made plan[k] active
    try:
        time.sleep(0.3)
        for _, path in plan[1:]:
            started = time.monotonic()
            switch(served, **({"vector": path} if path else {"off": True}))
            windows.append((started, time.monotonic()))
            time.sleep(0.3)
        deadline = time.monotonic() + 120
        while sum(map(len, answers)) < min_requests and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        done.set()
        for w in workers:
            w.join(timeout=60)

    assert not failures, failures[:3]
    total = sum(map(len, answers))
    assert total >= min_requests
    # plan[k] may serve from the start of the switch that made it active to the end of the next switch.
    starts = [-np.inf] + [s for s, _ in windows]
    ends = [e for _, e in windows] + [np.inf]
    matched = {key: 0 for key in vectors}
    for i, rows in enumerate(answers):
        for sent, received, out, named in rows:
            allowed = {plan[k][0] for k in range(len(plan)) if starts[k] <= received and sent <= ends[k]}
            hits = {key for key in vectors if np.allclose(out, expected[key][i], rtol=0, atol=1e-5)}
            assert hits & allowed, f"thread {i}: answer matches {hits or 'no vector'}, allowed {allowed}"
            key = min(hits & allowed)
            assert named == [ids[key]] * len(out), f"thread {i}: logits of {key} named {set(named)}"
            matched[key] += 1
    assert all(matched.values()), matched  # every vector of the plan was actually served
    seconds = ", ".join(f"{e - s:.2f}" for s, e in windows)
    print(f"\n{total} requests from {threads_n} threads, 0 failed; answers per vector {matched}; switches {seconds} s")
    assert classifier_loads(served) == 1
    confirmed = [e["to"]["vector_id"] for e in journal.read(served.repository)[logged:] if e["event"] == "confirmed"]
    assert confirmed == [ids[key] for key, _ in plan[1:]]  # the journal tells the switches in order


# -- failures and refusals ----------------------------------------------------------------------------


def corrupt_model_file(version_dir: Path) -> None:
    (version_dir / "model.onnx").write_bytes(b"\x08\x07 definitely not a protobuf graph")


def other_graph(version_dir: Path) -> None:
    """A valid graph, but not the one that was validated: it loads, and computes something else."""
    (version_dir / "model.onnx").write_bytes(forget_step_onnx(random_delta(3)).SerializeToString())


def wrong_vector_id(version_dir: Path) -> None:
    """The validated graph, but naming another vector: right logits, wrong id."""
    graph = onnx.load(str(version_dir / "model.onnx"))
    strings = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.STRING]
    assert len(strings) == 1
    strings[0].string_data[:] = [b"not-the-vector"]
    (version_dir / "model.onnx").write_bytes(graph.SerializeToString())


@pytest.mark.parametrize(
    "fault",
    [corrupt_model_file, other_graph, wrong_vector_id],
    ids=["corrupt-onnx", "serves-wrong-output", "names-wrong-vector"],
)
def test_failed_switch_is_rolled_back_and_old_vector_keeps_serving(
    served: TritonServer,
    files: Files,
    images: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    fault: Any,
) -> None:
    switch(served, vector=files.trouser)
    x = images[0][:32]
    repo = Path(served.repository)
    view_before = server_view(served)
    trouser = load_vector(files.trouser)
    old = reference(served, trouser, x)
    real_publish = switch_module.publish_forget_step_version
    published: list[int] = []

    def faulty_publish(repo: Path, graph: Any, metadata: Any, **kwargs: Any) -> int:
        version = real_publish(repo, graph, metadata, **kwargs)
        fault(Path(repo) / FORGET_STEP_MODEL / str(version))
        published.append(version)
        return version

    monkeypatch.setattr(switch_module, "publish_forget_step_version", faulty_publish)
    logged = len(journal.read(repo))
    with served.client() as client, pytest.raises(SwitchError, match="keeps serving") as info:
        switch_vector(repo, client, VectorChoice(vector=files.half), timeout_s=6)
    monkeypatch.undo()
    (failed,) = published
    assert f"version {failed} set aside as {SET_ASIDE_PREFIX}{failed}-" in str(info.value)
    assert [p.name for p in (repo / FORGET_STEP_MODEL).iterdir() if p.name.startswith(f"{SET_ASIDE_PREFIX}{failed}-")]

    assert server_view(served) == view_before  # same folders, same confirmed version, same live models
    events = journal.read(repo)[logged:]
    assert [e["event"] for e in events] == ["begin", "rolled_back"]
    assert events[1]["version"] == failed and events[1]["reason"] and events[1]["switch"] == events[0]["switch"]
    with TritonClient(served.http_url) as client:
        logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, x)
    np.testing.assert_allclose(logits, old, rtol=0, atol=1e-5)
    assert ids == [trouser.vector_id] * len(x)
    # The next switch works normally, with a number never used before.
    result = switch(served, vector=files.half)
    assert result.version == failed + 1 and result.previous_version == view_before[1]
    with TritonClient(served.http_url) as client:
        new = reference(served, load_vector(files.half), x)
        np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, x), new, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("nan", FileFormatError, "non-finite"),
        ("wrong_shape", ModelMismatchError, r"shape \[1, 32, 32\]"),
        ("other_classifier", ModelMismatchError, "was made for classifier .* but the graph records classifier"),
        ("huge", InvalidInputError, "beyond the bound 4"),
        ("zero", InvalidInputError, "would forget nothing"),
    ],
)
def test_bad_vectors_are_refused_with_the_server_untouched(
    served: TritonServer,
    files: Files,
    images: tuple[np.ndarray, np.ndarray],
    bad: str,
    error: type[Exception],
    message: str,
) -> None:
    switch(served, vector=files.trouser)
    x = images[0][:32]
    repo = served.repository
    with served.client() as client:
        before_out = client.infer(ENSEMBLE_MODEL, x)
        before_stats = {s.name: s.inference_count for s in client.model_statistics(FORGET_STEP_MODEL)}
    view, logged = server_view(served), len(journal.read(repo))
    with served.client() as client, pytest.raises(error, match=message):
        switch_vector(repo, client, VectorChoice(vector=getattr(files, bad)))
    assert server_view(served) == view
    assert len(journal.read(repo)) == logged  # refused before the switch began
    with served.client() as client:
        # The refusal sent nothing to the server: the forget step saw no request in between.
        assert {s.name: s.inference_count for s in client.model_statistics(FORGET_STEP_MODEL)} == before_stats
        np.testing.assert_array_equal(client.infer(ENSEMBLE_MODEL, x), before_out)


def test_force_serves_a_foreign_vector_and_records_it(served: TritonServer, files: Files) -> None:
    result = switch(served, vector=files.other_classifier, force=True)
    forced = read_forget_step_metadata(served.repository, result.version)["forced"]
    assert result.forced and forced["skipped"].startswith("classifier check")
    assert any("SKIPPED" in check for check in result.checks)
    assert result.vector_id == vector_id_of(files.other_classifier)
    switch(served, vector=files.trouser)


def test_switch_refuses_a_repository_the_server_does_not_serve(
    served: TritonServer, files: Files, tmp_path: Path
) -> None:
    switch(served, vector=files.trouser)
    copy = Path(shutil.copytree(served.repository, tmp_path / "copy"))
    confirmed = confirmed_version(copy)
    versions, logged = list_forget_step_versions(copy), len(journal.read(copy))
    step = forget_step_graph(load_vector(files.half), SHAPE).SerializeToString()
    (copy / FORGET_STEP_MODEL / str(confirmed) / "model.onnx").write_bytes(step)
    with served.client() as client, pytest.raises(SwitchError, match="wrong --url / --repository"):
        switch_vector(copy, client, VectorChoice(off=True))
    assert list_forget_step_versions(copy) == versions and confirmed_version(copy) == confirmed
    assert len(journal.read(copy)) == logged  # refused before anything was journaled


def test_switch_gives_up_on_a_held_lock_and_names_the_holder(
    served: TritonServer, files: Files, capsys: pytest.CaptureFixture[str]
) -> None:
    switch(served, vector=files.trouser)
    repo = served.repository
    view, logged = server_view(served), len(journal.read(repo))
    with (
        switch_lock(repo, 1, "a test holding the lock"),
        served.client() as client,
        pytest.raises(SwitchError, match=r"holds its switch lock \(a test holding the lock by .*gave up after 1 s"),
    ):
        switch_vector(repo, client, VectorChoice(vector=files.half), timeout_s=1)
    assert "waiting up to 1 s for the switch lock" in capsys.readouterr().out
    assert server_view(served) == view and len(journal.read(repo)) == logged
    switch(served, vector=files.half)  # released: the next switch goes through


def test_next_switch_recovers_an_interrupted_one(served: TritonServer, files: Files) -> None:
    switch(served, vector=files.trouser)
    repo = served.repository
    confirmed = confirmed_version(repo)
    # What a switch killed between its load and its confirmation leaves: a "begin" without outcome, a
    # published folder, and a server serving that folder although config.pbtxt still pins the old one.
    step = prepare_forget_step(VectorChoice(vector=files.half), deployed_classifier(repo), SHAPE)
    journal.append(repo, "begin", switch="killed-switch", to={"vector_id": step.vector_id})
    version = publish_forget_step_version(repo, step.graph, step.metadata)
    with served.client() as client:
        client.load_model(FORGET_STEP_MODEL, config=forget_step_config(repo, version))
    status = collect_status(served.http_url, repo, served.state, served.admin_key)
    assert status["active"]["version"] == version and status["active"]["confirmed_version"] == confirmed
    assert any(
        f"version {version} is served but version {confirmed} is the confirmed one" in p for p in status["problems"]
    )

    result = switch(served, vector=files.trouser)
    assert any(f"reloaded the confirmed version {confirmed}" in note for note in result.recovered)
    assert any(f"set aside unconfirmed version {version}" in note for note in result.recovered)
    assert any("interrupted switch killed-switch closed" in note for note in result.recovered)
    assert result.previous_version == confirmed and result.version == version + 1
    recovered = [e for e in journal.read(repo) if e["event"] == "recovered"]
    assert recovered[-1]["switch"] == "killed-switch" and recovered[-1]["confirmed"]["version"] == confirmed
    assert journal.unfinished(repo) == []
    assert collect_status(served.http_url, repo, served.state, served.admin_key)["problems"] == []


# -- malformed requests -------------------------------------------------------------------------------


def test_malformed_requests_to_every_model_get_errors_and_serving_continues(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    # tests/test_triton_server.py covers shape/dtype/batch/name on the ensemble; here: the fused model and
    # the bare classifier too, and requests with no, extra or zero-sized inputs, from a client without the key.
    switch(served, vector=files.trouser)
    good = images[0][:2]
    bad_requests = {
        "wrong shape": {"image": np.zeros((2, 1, 28, 27), np.float32)},
        "wrong dtype": {"image": good.astype(np.float64)},
        "batch above max": {"image": images[0][: MAX_BATCH + 1]},
        "wrong tensor name": {"pixels": good},
        "no input": {},
        "extra input": {"image": good, "mask": good},
        "empty batch": {"image": np.zeros((0, *SHAPE), np.float32)},
    }
    with TritonClient(served.http_url) as client:
        for model in (ENSEMBLE_MODEL, FUSED_MODEL, CLASSIFIER_MODEL):
            for problem, inputs in bad_requests.items():
                with pytest.raises(InferenceError, match=model):
                    client.infer_raw(model, inputs)
                assert client.is_model_ready(model), f"{model} after {problem}"
        expected = reference(served, load_vector(files.trouser), good)
        np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, good), expected, rtol=0, atol=1e-5)
    switch(served, vector=files.half)  # and the deployment still switches
