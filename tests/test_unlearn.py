"""Learning on real images: a short run forgets, composition works, the stopping rule reports honestly."""

from __future__ import annotations

import numpy as np
import torch
from conftest import FORGET_CLASS, QUICK_VECTOR

from fv_serving.config import VectorConfig
from fv_serving.data import ForgetSpec
from fv_serving.metrics import evaluate_unlearning, predict
from fv_serving.models import PerturbedClassifier
from fv_serving.pipeline import Workspace, compose_vector, learn_bank
from fv_serving.unlearn import learn_forget_vector
from fv_serving.vectors import ForgetVector, load_vector


def test_short_run_raises_ua_well_above_original(tiny_workspace: Workspace, class_vector) -> None:
    vector, path = class_vector
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    original, _ = evaluate_unlearning(tiny_workspace.model, tiny_workspace.data, split)
    assert original.UA < 30  # the tiny model does know trousers
    assert vector.metrics["UA"] > original.UA + 60
    assert vector.metrics["UA"] >= 90
    assert vector.metrics["RA"] > original.RA - 10  # retained classes still mostly right
    # the file holds what was measured, and the metrics are reproducible from it
    again, _ = evaluate_unlearning(
        PerturbedClassifier(tiny_workspace.model, torch.from_numpy(load_vector(path).delta)), tiny_workspace.data, split
    )
    assert vector.metrics["UA"] == round(again.UA, 4)  # files store metrics to 4 decimals


def test_vector_metadata_is_complete(class_vector) -> None:
    vector, _ = class_vector
    assert vector.forget["kind"] == "class" and vector.forget["classes"] == [FORGET_CLASS]
    assert len(vector.forget["forget_indices_sha256"]) == 64
    assert vector.hparams["beta"] == QUICK_VECTOR.beta and vector.hparams["lr"] == QUICK_VECTOR.lr
    assert vector.hparams["optimizer"] == QUICK_VECTOR.optimizer
    assert {"UA", "RA", "TA", "MIA", "stopping"} <= set(vector.metrics)
    assert vector.describe()["pixel_space"].startswith("raw pixels")


def test_stopping_rule_uses_holdout_and_reports(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    unreachable = VectorConfig(
        max_epochs=1, checks_per_epoch=2, forget_target=-1.0, monitor_size=300, holdout_size=None
    )
    result = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, unreachable)
    assert not result.chosen.rule_met and len(result.checks) == 3  # the starting point + 2 checks
    assert result.chosen.distance == min(c.distance for c in result.checks)
    holdout = predict(tiny_workspace.model, tiny_workspace.data.train, split.val).accuracy
    assert result.holdout_acc_original == holdout
    start = result.checks[0]  # delta = 0 is a candidate: nothing chosen may be worse than doing nothing
    assert start.epoch == 0 and start.holdout_acc == holdout


def test_bank_and_composition(tiny_workspace: Workspace, tmp_path) -> None:
    config = VectorConfig(max_epochs=2, checks_per_epoch=1, monitor_size=300)
    bank = learn_bank(tiny_workspace, config, tmp_path / "bank.safetensors", classes=[1, 8])
    assert bank.vectors.shape == (2, 1, 28, 28)
    summed, metrics = compose_vector(bank, [1, 8], "sum", tmp_path / "sum.safetensors", ws=tiny_workspace)
    assert np.allclose(summed.delta, bank.vectors[0] + bank.vectors[1], atol=1e-6)
    assert summed.forget["composed"]["coefficients"] == [1.0, 1.0]
    assert min(metrics["per_forgotten_class_UA"].values()) > 50
    mean, _ = compose_vector(bank, [1, 8], "mean", tmp_path / "mean.safetensors", evaluate=False)
    assert np.allclose(mean.delta, summed.delta / 2, atol=1e-6)
    learned, learned_metrics = compose_vector(
        bank,
        [1, 8],
        "learned",
        tmp_path / "learned.safetensors",
        ws=tiny_workspace,
        config=VectorConfig(max_epochs=1, checks_per_epoch=2, lr=0.01, monitor_size=300),
    )
    assert learned.forget["composed"]["mode"] == "learned"
    assert isinstance(load_vector(tmp_path / "learned.safetensors"), ForgetVector)
    assert "stopping" in learned_metrics


MEMORY_PROBE = """
import resource, sys, torch
from torch import nn
from fv_serving.config import VectorConfig
from fv_serving.data import Dataset, ForgetSpec, ForgetSplit, ImageSet
from fv_serving.unlearn import BankCombination, learn_perturbation
torch.manual_seed(0)
checks, k = int(sys.argv[1]), int(sys.argv[2])
images = ImageSet(torch.randint(0, 256, (400, 1, 28, 28), dtype=torch.uint8), torch.arange(400) % 10)
data = Dataset("random", images, images, tuple(str(c) for c in range(10)), (0.5,), (0.25,))
forget, retain = torch.arange(0, 400, 10), torch.tensor([i for i in range(400) if i % 10])
split = ForgetSplit(ForgetSpec(classes=(0,)), forget, retain, retain[:50], forget[:5], retain[:50], forget[:5])
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).eval()
bank = torch.randn(k, 1, 28, 28) * 1e-3
config = VectorConfig(
    batch_size=8, max_epochs=1, steps_per_epoch=None, checks_per_epoch=checks, stopping=False, monitor_size=20
)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = learn_perturbation(model, data, split, BankCombination(bank, torch.zeros(k)), config, goal="erase")
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(len(result.checks), grown * 1024, bank.numel() * 4)
"""


def test_learning_keeps_one_best_state_whatever_the_number_of_checks() -> None:
    """A 63 MB bank buffer and 40 checks: memory must not grow by a copy per check (that was 2.5 GB)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, "40", "20000"], capture_output=True, text=True, check=True, timeout=300
    ).stdout.split()
    checks, grown, bank_bytes = (int(v) for v in out)
    assert checks == 41  # the start + 40
    assert grown < 4 * bank_bytes, f"peak memory grew by {grown / 1e6:.0f} MB with a {bank_bytes / 1e6:.0f} MB bank"
