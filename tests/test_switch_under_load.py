"""Ten live switches under load from six clients (HTTP and gRPC): no request fails, and every answer's
vector id agrees with its logits (the logits are exactly those the named vector gives)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from triton_testing import requires_triton

from fv_serving.cli.main import main
from fv_serving.fingerprint import logits_match
from fv_serving.triton.client import TritonClient
from fv_serving.triton.deployment import deployed_classifier
from fv_serving.triton.repository import ENSEMBLE_MODEL
from fv_serving.triton.supervisor import read_run_state
from fv_serving.triton.switch import ensemble_reference
from fv_serving.vectors import ForgetVector, load_vector, save_vector

pytestmark = [requires_triton, pytest.mark.triton]

SWITCHES = 10
CLIENTS = 6


def test_switches_under_load_fail_nothing_and_answers_name_their_vector(
    tiny_classifier_path: Path, class_vector: tuple[ForgetVector, Path], tmp_path: Path
) -> None:
    from fv_serving.onnx.fuse import forget_step_graph

    base = class_vector[0]
    files = [class_vector[1], save_vector(ForgetVector(classifier=base.classifier, delta=-base.delta), tmp_path / "b")]
    repo = tmp_path / "repo"
    build = ["triton", "build", "--classifier", str(tiny_classifier_path), "--vector", str(files[0])]
    assert main([*build, "--max-batch-size", "16", "--out", str(repo)]) == 0
    images = np.random.default_rng(1).random((4, 1, 28, 28), dtype=np.float32)
    classifier = deployed_classifier(repo)
    references = {
        v.vector_id: ensemble_reference(classifier, forget_step_graph(v), images) for v in map(load_vector, files)
    }
    assert not logits_match(*references.values())  # the two vectors give visibly different answers
    assert main(["serve", "--repository", str(repo), "--detach"]) == 0
    try:
        state = read_run_state(repo.parent / "repo.server").server
        stop = threading.Event()
        answers: Counter[str] = Counter()
        failures: list[str] = []
        mismatches: list[str] = []
        lock = threading.Lock()

        def client_loop(url: str) -> None:
            with TritonClient(url) as client:
                while not stop.is_set():
                    try:
                        logits, ids = client.infer_with_ids(ENSEMBLE_MODEL, images)
                    except Exception as exc:  # every failure counts, whatever its type
                        with lock:
                            failures.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        for row, vector_id in enumerate(ids):
                            answers[vector_id] += 1
                            if vector_id not in references or not logits_match(
                                logits[row : row + 1], references[vector_id][row : row + 1]
                            ):
                                mismatches.append(vector_id)

        urls = [state.http_url if i % 2 == 0 else state.grpc_url for i in range(CLIENTS)]
        threads = [threading.Thread(target=client_loop, args=(u,), daemon=True) for u in urls]
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        for k in range(SWITCHES):
            assert main(["switch", "--repository", str(repo), "--vector", str(files[(k + 1) % 2])]) == 0
        time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    finally:
        main(["stop", "--repository", str(repo)])
    assert failures == [], failures[:5]
    assert mismatches == [], f"{len(mismatches)} answers whose logits are not those of the vector they name"
    assert set(answers) == set(references) and sum(answers.values()) >= 1000, answers
