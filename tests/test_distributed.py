"""torch.distributed learning with 2 real gloo processes on CPU (torchrun, through `fv ... --nproc 2`).

Data-parallel `fv learn` must give the vector one process gives (same global batches,
gradients summed over ranks); class-parallel `fv bank` must give the bank one process
gives, written once by rank 0 with the classifier's fingerprint.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fv_serving.cli.common import torchrun_argv
from fv_serving.cli.main import build_parser
from fv_serving.config import VectorConfig
from fv_serving.distributed import Dist
from fv_serving.pipeline import Workspace, compose_vector, learn_bank
from fv_serving.vectors import load_bank, load_vector

# A short run: the equivalence, not the quality, is under test.
SHORT = ["--max-epochs", "2", "--steps-per-epoch", "6", "--batch-size", "64", "--checks-per-epoch", "2"]
SHORT_CONFIG = VectorConfig(max_epochs=2, steps_per_epoch=6, batch_size=64, checks_per_epoch=2)
# Summing two ranks' gradients instead of one batch's changes only the order of float
# additions (and the convolution kernels' batch split): ~1e-7 relative per step, which
# Adam's division by sqrt(v) magnifies where gradients are small. Measured over this
# 12-step run: below 1e-4 of delta's largest entry on one machine build, 7e-4 on another.
# A rank that skipped the all-reduce would learn on half the batch: tens of percent.
TOLERANCE = 5e-3


def run_fv(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fv_serving.cli.main", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_batch_slices_and_shards_partition_the_work() -> None:
    ranks = [Dist(rank, 3) for rank in range(3)]
    covered = [i for d in ranks for i in range(100)[d.batch_slice(100)]]
    assert covered == list(range(100))
    shards = torch.cat([d.shard(torch.arange(10)) for d in ranks]).sort().values
    assert shards.tolist() == list(range(10))


def test_torchrun_argv_parses_back_to_the_same_command() -> None:
    parser = build_parser()
    argv = ["learn", "--classifier", "c.safetensors", "--forget-class", "1", "Bag", "--beta", "3", "--no-eval"]
    argv += ["--preset", "epochs", "--out", "v.safetensors", "--nproc", "2"]
    args = parser.parse_args(argv)
    again = parser.parse_args(torchrun_argv(args))
    keep = {k: v for k, v in vars(args).items() if k != "nproc"}
    assert {k: v for k, v in vars(again).items() if k != "nproc"} == keep
    assert again.nproc == 1


@pytest.mark.slow
def test_two_processes_learn_the_same_vector_as_one(tiny_classifier_path: Path, tmp_path: Path) -> None:
    """With a share of at-risk images too: each rank scores a shard of their pool, and all hold the same set."""
    common = ["learn", "--classifier", str(tiny_classifier_path), "--forget-class", "1", "--no-eval", *SHORT]
    common += ["--at-risk-share", "0.25"]
    one = run_fv(*common, "--out", str(tmp_path / "one.safetensors"))
    two = run_fv(*common, "--nproc", "2", "--out", str(tmp_path / "two.safetensors"))
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "on 2 processes" in two.stdout and two.stdout.count("wrote ") == 1
    a, b = load_vector(tmp_path / "one.safetensors"), load_vector(tmp_path / "two.safetensors")
    assert a.metrics["stopping"]["steps_run"] == b.metrics["stopping"]["steps_run"] > 0
    assert a.metrics["stopping"]["chosen_epoch"] == b.metrics["stopping"]["chosen_epoch"]
    assert np.abs(a.delta).max() > 0.01  # something was learned
    assert np.abs(a.delta - b.delta).max() <= TOLERANCE * np.abs(a.delta).max()


@pytest.mark.slow
def test_two_processes_learn_a_bank_written_once(
    tiny_workspace: Workspace, tiny_classifier_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bank.safetensors"
    result = run_fv(
        "bank", "--classifier", str(tiny_classifier_path), "--classes", "0", "1", "2", "3", *SHORT, "--nproc", "2",
        "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote ") == 1 and "on 2 processes" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank.png", "bank.safetensors"]  # no leftovers
    bank = load_bank(out)
    assert bank.classes == [0, 1, 2, 3] and bank.vectors.shape == (4, 1, 28, 28)
    assert bank.classifier.weights_sha256 == tiny_workspace.fingerprint().weights_sha256
    bank.classifier.check_weights(tiny_workspace.model, "the bank")
    assert bank.metrics["processes"] == 2
    # Each class is learned whole by one rank: the same vectors as one process learning them in turn.
    alone = learn_bank(tiny_workspace, SHORT_CONFIG, tmp_path / "alone" / "bank.safetensors", classes=[0, 1, 2, 3])
    assert np.abs(bank.vectors - alone.vectors).max() <= TOLERANCE * np.abs(alone.vectors).max()
    composed, _ = compose_vector(bank, [1, 2], "sum", tmp_path / "composed.safetensors", evaluate=False)
    assert np.allclose(composed.delta, bank.vectors[1] + bank.vectors[2], atol=1e-6)
