"""Bad CLI input: one line on stderr, non-zero exit, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def run_fv(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fv_serving.cli.main", *args], capture_output=True, text=True, env=env, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--forget-class", "Hat"], ["unknown class 'Hat'", "T-shirt/top"]),
        (["--forget-class", "12"], ["unknown class 12"]),
        (["--forget-percent", "0"], ["percentage must be in (0, 100)"]),
        (["--forget-percent", "140"], ["percentage must be in (0, 100)"]),
        ([], ["say what to forget"]),
        (["--forget-percent", "10", "--nproc", "2"], ["'confidence' objective", "one process only"]),
        (["--forget-class", "1", "--objective", "loss"], ["'loss' objective is for random-subset vectors"]),
        (["--forget-percent", "10", "--augment"], ["unaugmented hold-out images", "drop --augment"]),
    ],
)
def test_learn_bad_forget_set(tiny_classifier_path: Path, tmp_path: Path, args: list[str], fragments: list[str]):
    out = tmp_path / "v.safetensors"
    result = run_fv("learn", "--classifier", str(tiny_classifier_path), *args, "--out", str(out))
    assert_one_line_error(result, *fragments)
    assert not out.exists()


def test_missing_data_package(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "FV_FASHION_MNIST_DIR": str(tmp_path / "no-such-dir")}
    result = run_fv("train", "--epochs", "1", "--out", str(tmp_path / "c.safetensors"), env=env)
    assert_one_line_error(result, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist")


def test_wrong_files(tiny_classifier_path: Path, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 64)
    assert_one_line_error(run_fv("inspect", str(tmp_path / "missing.safetensors")), "not found")
    assert_one_line_error(
        run_fv("learn", "--classifier", str(bogus), "--forget-class", "1", "--out", str(tmp_path / "v")),
        "not a readable safetensors",
    )
    assert_one_line_error(
        run_fv(
            "evaluate",
            "--classifier",
            str(tiny_classifier_path),
            "--vector",
            str(tiny_classifier_path),
            "--out-dir",
            str(tmp_path / "e"),
        ),
        "no fv-serving metadata",
    )


def test_vector_for_another_classifier(class_vector, other_classifier_path: Path, tmp_path: Path) -> None:
    _, vector_path = class_vector
    result = run_fv(
        "evaluate",
        "--classifier",
        str(other_classifier_path),
        "--vector",
        str(vector_path),
        "--out-dir",
        str(tmp_path / "e"),
    )
    assert_one_line_error(result, "was made for classifier", "different weights")


def test_usage_error_is_one_line() -> None:
    assert_one_line_error(run_fv("learn", "--bogus"), "the following arguments are required")
    assert_one_line_error(run_fv("inspect", "x", "--bogus"), "unrecognized arguments")
