"""The serving side installs and runs without the [learn] extra (torch, torchvision, scikit-learn, matplotlib).

Files are made beforehand with the full install (a classifier exported to ONNX, two
vector files); then every serving module is imported, and the serving verbs build,
serve, switch, infer, inspect, fuse, stop, in fresh interpreters in which those
packages cannot be imported (tests/no_learning_extra/sitecustomize.py) — the
detached supervisor and Triton's python-backend stubs included. Any attempt to
import them fails the command and is logged; the log must stay empty.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from triton_testing import requires_triton

import fv_serving
from fv_serving.cli.main import main
from fv_serving.vectors import ForgetVector

BLOCKER = Path(__file__).parent / "no_learning_extra"
#: The serving side: these packages whole (but the PyTorch exporter), and these top-level modules.
SERVING_PACKAGES = ("fv_serving.onnx", "fv_serving.triton", "fv_serving.gateway", "fv_serving.cli")
SERVING_MODULES = (
    "admission",
    "arithmetic",
    "atomic",
    "config",
    "datasets",
    "errors",
    "fingerprint",
    "net",
    "perturbation",
    "procfs",
    "provenance",
    "stopping",
    "vector_choice",
    "vectors",
)
NEEDS_TORCH = ("fv_serving.onnx.export",)


def serving_modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(fv_serving.__path__, "fv_serving.")]
    packaged = [n for n in names if n.startswith(SERVING_PACKAGES) and n not in NEEDS_TORCH]
    return sorted({*packaged, *(f"fv_serving.{m}" for m in SERVING_MODULES)})


@pytest.fixture
def blocked_env(tmp_path: Path) -> tuple[dict[str, str], Path]:
    log = tmp_path / "blocked-imports.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(BLOCKER), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FV_BLOCKED_IMPORTS_LOG": str(log),
    }
    return env, log


def fv(env: dict[str, str], *args: object, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "fv_serving.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    if check:
        assert result.returncode == 0, f"fv {args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_the_blocker_blocks(blocked_env: tuple[dict[str, str], Path]) -> None:
    env, log = blocked_env
    result = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert result.returncode != 0 and "blocked" in result.stderr and "torch" in log.read_text()


def test_every_serving_module_imports_without_the_learning_extra(blocked_env: tuple[dict[str, str], Path]) -> None:
    env, log = blocked_env
    modules = serving_modules()
    assert {"fv_serving.triton.switch", "fv_serving.gateway.process", "fv_serving.onnx.checked"} <= set(modules)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert not log.exists(), log.read_text()


def test_a_learning_verb_says_which_extra_it_needs(blocked_env: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, _ = blocked_env
    result = fv(env, "train", "--out", tmp_path / "c.safetensors", check=False)
    assert result.returncode == 2 and "pip install 'fv-serving[learn]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@requires_triton
@pytest.mark.triton
def test_build_serve_switch_infer_without_the_learning_extra(
    blocked_env: tuple[dict[str, str], Path],
    tiny_classifier_path: Path,
    class_vector: tuple[ForgetVector, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx_path, other = tmp_path / "classifier.onnx", tmp_path / "off.npy"
    assert main(["export", "classifier", "--classifier", str(tiny_classifier_path), "--out", str(onnx_path)]) == 0
    capsys.readouterr()
    env, log = blocked_env
    vector = class_vector[1]
    repo = tmp_path / "repo"
    fv(env, "inspect", vector)
    fv(env, "export", "fused", "--onnx", onnx_path, "--vector", vector, "--out", tmp_path / "fused.onnx")
    fv(env, "export", "forget", "--vector", vector, "--out", tmp_path / "step.onnx")
    fv(env, "triton", "build", "--classifier-onnx", onnx_path, "--vector", vector, "--fused", "--out", repo)
    fv(env, "serve", "--repository", repo, "--detach")
    try:
        served = fv(env, "infer", "--repository", repo, "--data", "fashion-mnist", "--count", "200")
        assert "answered by vector" in served.stdout
        fv(env, "switch", "--repository", repo, "--off")
        assert "answered by vector off" in fv(env, "infer", "--repository", repo, "--data", "fashion-mnist").stdout
        status = fv(env, "status", "--repository", repo, "--history")
        assert "confirmed" in status.stdout
    finally:
        fv(env, "stop", "--repository", repo, check=False)
    assert not other.exists()
    assert not log.exists(), f"something imported the learning extra:\n{log.read_text()}"
