"""Shared fixtures: small REAL data (a Fashion-MNIST subset) and a classifier/vector trained on it.

Everything is built once per test session (a few seconds on 2 cores) and written
with the same functions users call, so tests exercise the real file formats.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fv_serving.config import TrainConfig, VectorConfig
from fv_serving.data import Dataset, ForgetSpec, SplitSpec, load_dataset
from fv_serving.pipeline import Workspace, learn_vector, open_workspace, train_model
from fv_serving.procfs import cmdline
from fv_serving.vectors import ForgetVector

TINY_SPLIT = SplitSpec(seed=0, val_size=1000, train_size=4000)
TINY_TRAIN = TrainConfig(epochs=3, batch_size=128, lr=0.1, seed=0)
FORGET_CLASS = 1  # Trouser: distinctive, learned early even by a tiny model
QUICK_VECTOR = VectorConfig(max_epochs=3, checks_per_epoch=2, monitor_size=500)


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers, supervisors and gateways started by a test die with the session, even if a test's own
    clean-up failed: a leftover would hold ports and cores on a CI machine. Their names are printed."""
    yield
    base = str(tmp_path_factory.getbasetemp())
    leftovers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and base in cmdline(int(p.name))]
    for pid in leftovers:
        print(f"\nkilling a process a test left running: {pid} {cmdline(pid)[:160]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # The tests share 2 cores with Triton server processes: with 2 OpenMP threads every barrier
    # waits for a descheduled thread (a small forward pass measured 200 ms vs 4 ms with 1 thread).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def tiny_classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clf") / "classifier.safetensors"
    train_model("fashion-mnist", out, config=TINY_TRAIN, split=TINY_SPLIT)
    return out


@pytest.fixture(scope="session")
def tiny_workspace(tiny_classifier_path: Path) -> Workspace:
    return open_workspace(tiny_classifier_path)


@pytest.fixture(scope="session")
def other_classifier_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and data, different seed: a different classifier."""
    out = tmp_path_factory.mktemp("clf2") / "other.safetensors"
    train_model("fashion-mnist", out, config=TrainConfig(epochs=1, seed=1), split=TINY_SPLIT)
    return out


@pytest.fixture(scope="session")
def class_vector(tiny_workspace: Workspace, tmp_path_factory: pytest.TempPathFactory) -> tuple[ForgetVector, Path]:
    out = tmp_path_factory.mktemp("vec") / "trouser.safetensors"
    vector, _ = learn_vector(tiny_workspace, ForgetSpec(classes=(FORGET_CLASS,)), out, config=QUICK_VECTOR)
    return vector, out
