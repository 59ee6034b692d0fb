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
    assert vector.metrics["UA"] == again.UA


def test_vector_metadata_is_complete(class_vector) -> None:
    vector, _ = class_vector
    assert vector.forget["kind"] == "class" and vector.forget["classes"] == [FORGET_CLASS]
    assert len(vector.forget["forget_indices_sha256"]) == 64
    assert vector.hparams["beta"] == QUICK_VECTOR.beta and vector.hparams["lr"] == 0.2
    assert {"UA", "RA", "TA", "MIA", "stopping"} <= set(vector.metrics)
    assert vector.describe()["pixel_space"].startswith("raw pixels")


def test_stopping_rule_uses_holdout_and_reports(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    unreachable = VectorConfig(max_epochs=1, checks_per_epoch=2, forget_target=-1.0, monitor_size=300)
    result = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, unreachable)
    assert not result.chosen.rule_met and len(result.checks) == 3  # the starting point + 2 checks
    assert result.chosen.distance == min(c.distance for c in result.checks)
    holdout = predict(tiny_workspace.model, tiny_workspace.data.train, split.val).accuracy
    assert result.holdout_acc_original == holdout
    start = result.checks[0]  # delta = 0 is a candidate: nothing chosen may be worse than doing nothing
    assert start.epoch == 0 and start.holdout_acc == holdout


def test_random_forgetting_goal_is_matching(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(percent=10, seed=0))
    config = VectorConfig(beta=1.0, max_epochs=2, checks_per_epoch=1, monitor_size=300)
    result = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, config)
    for check in result.checks:  # "match" distance: |forget acc - hold-out acc| beyond tolerance
        retain_miss = max(0.0, result.holdout_acc_original - config.retain_margin - check.holdout_acc)
        expected = max(0.0, abs(check.forget_acc - check.holdout_acc) - config.match_tolerance) + retain_miss
        assert check.distance == expected


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
