"""Live forget-vector switches on a REAL tritonserver serving a classifier trained on real Fashion-MNIST.

One server serves the whole module (repository built by `build_deployment` from the
session's tiny classifier and Trouser vector). Each test first switches to the
vector it starts from, so the tests do not depend on their order. References are
computed outside the server: onnxruntime on the repository's own graphs, and
PyTorch's PerturbedClassifier for the accuracy claims.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fv_serving.triton.deploy import VectorChoice, build_deployment, deployed_classifier
from triton_testing import forget_step_onnx, random_delta, requires_triton

from fv_serving.data import Dataset, to_numpy_images
from fv_serving.errors import FileFormatError, ModelMismatchError, SwitchError
from fv_serving.fingerprint import ClassifierFingerprint
from fv_serving.models import PerturbedClassifier, load_classifier
from fv_serving.onnx.fuse import forget_step_graph, fuse_vector
from fv_serving.onnx.runtime import make_session
from fv_serving.pipeline import open_workspace
from fv_serving.triton import switch as switch_module
from fv_serving.triton.client import InferenceError, TritonClient
from fv_serving.triton.repository import (
    CLASSIFIER_MODEL,
    ENSEMBLE_MODEL,
    FORGET_STEP_MODEL,
    FUSED_MODEL,
    list_forget_step_versions,
    read_forget_step_metadata,
)
from fv_serving.triton.server import TritonServer
from fv_serving.triton.switch import SwitchResult, ensemble_reference, switch_vector
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


@pytest.fixture(scope="module")
def files(
    class_vector: tuple[ForgetVector, Path], other_classifier_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Files:
    vector, trouser = class_vector
    out = tmp_path_factory.mktemp("vectors")
    half = save_vector(ForgetVector(classifier=vector.classifier, delta=vector.delta * 0.5), out / "half.safetensors")
    bank = VectorBank(
        classifier=vector.classifier,
        vectors=np.stack([vector.delta, -0.5 * vector.delta]),
        classes=[1, 3],
        notes=vector.notes,
    )
    nan = ForgetVector(classifier=vector.classifier, delta=vector.delta.copy())
    nan.delta[0, 3, 4] = np.nan  # after construction: the file is written, loading must refuse it
    bigger = ClassifierFingerprint("0" * 64, (1, 32, 32), 10, np.zeros((4, 10), np.float32))
    other = open_workspace(other_classifier_path).fingerprint()
    return Files(
        trouser=trouser,
        half=half,
        bank=save_bank(bank, out / "bank.safetensors"),
        nan=save_vector(nan, out / "nan.safetensors"),
        wrong_shape=save_vector(ForgetVector(classifier=bigger, delta=np.zeros((1, 32, 32))), out / "wide.safetensors"),
        other_classifier=save_vector(ForgetVector(classifier=other, delta=vector.delta), out / "other.safetensors"),
    )


@pytest.fixture(scope="module")
def served(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    root = tmp_path_factory.mktemp("deployment")
    report = build_deployment(
        root / "repo",
        VectorChoice(vector=class_vector[1]),
        classifier=tiny_classifier_path,
        fused=True,
        max_batch_size=MAX_BATCH,
    )
    with TritonServer(report.repository, [ENSEMBLE_MODEL, FUSED_MODEL], run_dir=root / "run") as server:
        yield server


@pytest.fixture(scope="module")
def images(fmnist: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """The first N_IMAGES real test images and their labels."""
    return to_numpy_images(fmnist.test, torch.arange(N_IMAGES)), fmnist.test.labels[:N_IMAGES].numpy()


def switch(server: TritonServer, force: bool = False, **choice: object) -> SwitchResult:
    """Switch through the library, as `fv switch` does; every switch must leave the classifier loaded."""
    result = switch_vector(
        server.repository,
        server.http_url,
        VectorChoice(**choice),  # type: ignore[arg-type]
        force=force,
        log_path=server.log_path,
    )
    assert not result.classifier.reloaded, result.classifier.describe()
    return result


def reference(server: TritonServer, vector: ForgetVector | None, x: np.ndarray) -> np.ndarray:
    """What the ensemble must answer: the repository's classifier after the vector's step, in onnxruntime."""
    return ensemble_reference(deployed_classifier(server.repository), forget_step_graph(vector, SHAPE), x)


def server_view(server: TritonServer) -> tuple[list[int], list[tuple[str, str, str]]]:
    """Version folders on disk and the live rows of the server's repository index."""
    with TritonClient(server.http_url) as client:
        index = [(e.name, e.version, e.state) for e in client.repository_index() if e.state in ("READY", "LOADING")]
    return list_forget_step_versions(server.repository), sorted(index)


def classifier_loads(server: TritonServer) -> int:
    return server.log_path.read_text().count(f"successfully loaded '{CLASSIFIER_MODEL}'")


# -- parity -------------------------------------------------------------------------------------------


def test_ensemble_equals_fused_onnx_on_real_images(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    switch(served, vector=files.trouser)  # the vector the fused model was built with
    x = images[0][:256]
    fused_graph = fuse_vector(deployed_classifier(served.repository), load_vector(files.trouser)).graph
    session = make_session(fused_graph, threads=1)
    expected = session.run(None, {"image": x})[0]
    with TritonClient(served.http_url) as http, TritonClient(served.grpc_url) as grpc:
        ensemble = http.infer(ENSEMBLE_MODEL, x)
        fused = grpc.infer(FUSED_MODEL, x, batch_size=7)
    np.testing.assert_allclose(ensemble, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fused, expected, rtol=0, atol=1e-5)


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

    def through_server() -> np.ndarray:
        with TritonClient(served.http_url) as client:
            return client.infer(ENSEMBLE_MODEL, x).argmax(1)

    switch(served, off=True)
    served_original = through_server()
    switch(served, vector=files.trouser)
    served_unlearned = through_server()
    switch(served, off=True)
    served_restored = through_server()

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
        ({"coefficients": (0.5, 1.0)}, 0.0 * trouser.delta),  # 0.5 d - 0.5 d
    ]
    for choice, delta in cases:
        result = switch(served, bank=files.bank, **choice)
        expected = reference(served, ForgetVector(classifier=trouser.classifier, delta=delta), x)
        with TritonClient(served.http_url) as client:
            np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, x), expected, rtol=0, atol=1e-5)
        meta = read_forget_step_metadata(served.repository, result.version)
        assert meta["source"]["kind"] == "bank" and meta["vector_id"] == result.vector_id
        assert "composed" in meta["forget"]


# -- switching under load -----------------------------------------------------------------------------


def test_switch_under_concurrent_load_never_fails_or_mixes(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    threads_n, min_requests = 8, 1000
    batches = [images[0][4 * i : 4 * i + 4] for i in range(threads_n)]
    plan = [("trouser", files.trouser), ("half", files.half), ("off", None), ("trouser", files.trouser)]
    vectors = {"trouser": load_vector(files.trouser), "half": load_vector(files.half), "off": None}
    expected = {key: [reference(served, v, b) for b in batches] for key, v in vectors.items()}
    switch(served, vector=files.trouser)

    answers: list[list[tuple[float, float, np.ndarray]]] = [[] for _ in range(threads_n)]
    failures: list[BaseException] = []
    done = threading.Event()

    def hammer(i: int) -> None:
        url = served.http_url if i % 2 == 0 else served.grpc_url
        with TritonClient(url) as client:
            while not done.is_set():
                sent = time.monotonic()
                try:
                    out = client.infer(ENSEMBLE_MODEL, batches[i])
                except BaseException as exc:
                    failures.append(exc)
                    continue
                answers[i].append((sent, time.monotonic(), out))

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
        for sent, received, out in rows:
            allowed = {plan[k][0] for k in range(len(plan)) if starts[k] <= received and sent <= ends[k]}
            hits = {key for key in vectors if np.allclose(out, expected[key][i], rtol=0, atol=1e-5)}
            assert hits & allowed, f"thread {i}: answer matches {hits or 'no vector'}, allowed {allowed}"
            matched[min(hits & allowed)] += 1
    assert all(matched.values()), matched  # every vector of the plan was actually served
    seconds = ", ".join(f"{e - s:.2f}" for s, e in windows)
    print(f"\n{total} requests from {threads_n} threads, 0 failed; answers per vector {matched}; switches {seconds} s")
    assert classifier_loads(served) == 1


# -- failures and refusals ----------------------------------------------------------------------------


def corrupt_model_file(version_dir: Path) -> None:
    (version_dir / "model.onnx").write_bytes(b"\x08\x07 definitely not a protobuf graph")


def other_graph(version_dir: Path) -> None:
    """A valid graph, but not the one that was validated: it loads, and computes something else."""
    (version_dir / "model.onnx").write_bytes(forget_step_onnx(random_delta(3)).SerializeToString())


@pytest.mark.parametrize("fault", [corrupt_model_file, other_graph], ids=["corrupt-onnx", "serves-wrong-output"])
def test_failed_switch_is_rolled_back_and_old_vector_keeps_serving(
    served: TritonServer,
    files: Files,
    images: tuple[np.ndarray, np.ndarray],
    monkeypatch: pytest.MonkeyPatch,
    fault: object,
) -> None:
    switch(served, vector=files.trouser)
    x = images[0][:32]
    versions_before, index_before = server_view(served)
    old = reference(served, load_vector(files.trouser), x)
    real_publish = switch_module.publish_forget_step_version

    def faulty_publish(repo: Path, graph: object, metadata: object) -> int:
        version = real_publish(repo, graph, metadata)  # type: ignore[arg-type]
        fault(Path(repo) / FORGET_STEP_MODEL / str(version))  # type: ignore[operator]
        return version

    monkeypatch.setattr(switch_module, "publish_forget_step_version", faulty_publish)
    with pytest.raises(SwitchError, match="keeps serving") as info:
        switch_vector(served.repository, served.http_url, VectorChoice(vector=files.half), timeout_s=6)
    assert "removed" in str(info.value)
    monkeypatch.undo()

    assert server_view(served) == (versions_before, index_before)
    with TritonClient(served.http_url) as client:
        np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, x), old, rtol=0, atol=1e-5)
    # The next switch works normally.
    switch(served, vector=files.half)
    with TritonClient(served.http_url) as client:
        new = reference(served, load_vector(files.half), x)
        np.testing.assert_allclose(client.infer(ENSEMBLE_MODEL, x), new, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        ("nan", FileFormatError, "non-finite"),
        ("wrong_shape", ModelMismatchError, r"shape \[1, 32, 32\]"),
        ("other_classifier", ModelMismatchError, "probe images differ"),
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
    with TritonClient(served.http_url) as client:
        before_out = client.infer(ENSEMBLE_MODEL, x)
        before_stats = {s.name: s.inference_count for s in client.model_statistics(FORGET_STEP_MODEL)}
    view = server_view(served)
    with pytest.raises(error, match=message):
        switch_vector(served.repository, served.http_url, VectorChoice(vector=getattr(files, bad)))
    assert server_view(served) == view
    with TritonClient(served.http_url) as client:
        # The refusal sent nothing to the server: the forget step saw no request in between.
        assert {s.name: s.inference_count for s in client.model_statistics(FORGET_STEP_MODEL)} == before_stats
        np.testing.assert_array_equal(client.infer(ENSEMBLE_MODEL, x), before_out)


def test_force_serves_a_foreign_vector_and_records_it(served: TritonServer, files: Files) -> None:
    result = switch(served, vector=files.other_classifier, force=True)
    forced = read_forget_step_metadata(served.repository, result.version)["forced"]
    assert result.forced and forced["skipped"].startswith("classifier check")
    assert any("SKIPPED" in check for check in result.checks)
    switch(served, vector=files.trouser)


def test_switch_refuses_a_repository_the_server_does_not_serve(
    served: TritonServer, files: Files, tmp_path: Path
) -> None:
    switch(served, vector=files.trouser)
    copy = Path(shutil.copytree(served.repository, tmp_path / "copy"))
    served_version = list_forget_step_versions(copy)[-1]
    step = forget_step_graph(load_vector(files.half), SHAPE).SerializeToString()
    (copy / FORGET_STEP_MODEL / str(served_version) / "model.onnx").write_bytes(step)
    with pytest.raises(SwitchError, match="wrong --url / --repository"):
        switch_vector(copy, served.http_url, VectorChoice(off=True))
    assert list_forget_step_versions(copy)[-1] == served_version


# -- malformed requests -------------------------------------------------------------------------------


def test_malformed_requests_to_every_model_get_errors_and_serving_continues(
    served: TritonServer, files: Files, images: tuple[np.ndarray, np.ndarray]
) -> None:
    # tests/test_triton_server.py covers shape/dtype/batch/name on the ensemble; here: the fused model and
    # the bare classifier too, and requests with no, extra or zero-sized inputs.
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
