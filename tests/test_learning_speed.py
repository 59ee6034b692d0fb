"""The fast preset: drawn batches, cheap checks confirmed on the whole hold-out, fewer samples for the same rule."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FORGET_CLASS

from fv_serving.config import VectorConfig
from fv_serving.data import ForgetSpec, iterate_batches
from fv_serving.distributed import SINGLE
from fv_serving.errors import InvalidInputError
from fv_serving.fingerprint import weights_digest
from fv_serving.metrics import predict
from fv_serving.models import (
    PerturbedClassifier,
    channels_last,
    fold_batchnorm,
    learning_copy,
    load_classifier,
    save_classifier,
)
from fv_serving.pipeline import Workspace, learn_vector, open_workspace
from fv_serving.sampling import AT_RISK_POOL, AT_RISK_QUANTILE, BatchPlan
from fv_serving.unlearn import at_risk_images, learn_forget_vector, logit_margin
from fv_serving.vectors import load_vector


def test_presets_keep_the_previous_defaults_and_the_authors_protocol() -> None:
    epochs = VectorConfig.preset("epochs")
    assert (epochs.optimizer, epochs.lr, epochs.momentum, epochs.batch_size) == ("sgd", 0.2, 0.9, 256)
    assert epochs.steps_per_epoch is None and epochs.forget_fraction is None and epochs.holdout_size is None
    assert (epochs.max_epochs, epochs.checks_per_epoch, epochs.monitor_size) == (10, 2, 2000)
    parity = VectorConfig.preset("parity")
    assert parity == replace(epochs, max_epochs=200, stopping=False)
    assert VectorConfig.preset("fast") == VectorConfig()
    with pytest.raises(InvalidInputError, match="forget_fraction must be in"):
        VectorConfig(forget_fraction=1.0)
    with pytest.raises(InvalidInputError, match="unknown preset 'slow'"):
        VectorConfig.preset("slow")


def test_drawn_batches_hold_the_forget_share(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    config = VectorConfig(batch_size=64, steps_per_epoch=7, forget_fraction=0.25)
    plan = BatchPlan(tiny_workspace.data, split, config, torch.Generator().manual_seed(0), None, "cpu")
    batches = list(plan.epoch())
    assert len(batches) == plan.steps == 7
    forget = set(split.forget.tolist())
    for x, y, idx in batches:
        assert x.shape == (64, 1, 28, 28)
        assert sum(i in forget for i in idx.tolist()) == 16
        assert (y == FORGET_CLASS).sum() == 16
    # Passes (the authors' batches): one epoch is every sample of D_f + D_r exactly once.
    passes = BatchPlan(
        tiny_workspace.data,
        split,
        replace(config, steps_per_epoch=None),
        torch.Generator().manual_seed(0),
        None,
        "cpu",
    )
    seen = torch.cat([idx for _, _, idx in passes.epoch()]).sort().values
    assert torch.equal(seen, torch.cat([split.forget, split.retain]).sort().values)


def test_at_risk_batches_hold_their_share_of_the_images_flipped_first(tiny_workspace: Workspace) -> None:
    """The at-risk set is the right answers with the lowest fifth of margins; each batch holds its share of it."""
    ws = tiny_workspace
    split = ws.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    assert len(split.retain) <= AT_RISK_POOL  # the pool is then the whole of D_r
    model = learning_copy(ws.model)
    at_risk = at_risk_images(model, ws.data.train, split.retain, torch.Generator().manual_seed(0), SINGLE, "cpu")
    with torch.no_grad():
        x, y, _ = next(iterate_batches(ws.data.train, split.retain, len(split.retain)))
        margins = logit_margin(model(x), y)
    right = margins > 0
    expected = split.retain[right & (margins <= margins[right].quantile(AT_RISK_QUANTILE))]
    assert torch.equal(at_risk.sort().values, expected.sort().values)
    assert abs(len(at_risk) - AT_RISK_QUANTILE * int(right.sum())) <= 1

    config = VectorConfig(batch_size=64, steps_per_epoch=5, at_risk_share=0.25)
    plan = BatchPlan(ws.data, split, config, torch.Generator().manual_seed(0), None, "cpu", at_risk)
    risky = set(at_risk.tolist())
    for _, _, idx in plan.epoch():
        assert len(idx) == 64 and all(i in risky for i in idx[:16].tolist())
    with pytest.raises(InvalidInputError, match="needs a non-empty at-risk set"):
        BatchPlan(ws.data, split, config, torch.Generator(), None, "cpu")
    with pytest.raises(InvalidInputError, match="drawn batches"):
        VectorConfig(at_risk_share=0.25, steps_per_epoch=None)
    with pytest.raises(InvalidInputError, match="leave no room"):
        VectorConfig(at_risk_share=0.75, forget_fraction=0.25)


def test_subset_checks_are_confirmed_on_the_whole_holdout(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    # A loose retain margin: the tiny classifier (75% validation accuracy) is fragile, and what
    # is under test is where the checks look, not how good the vector is.
    config = VectorConfig(holdout_size=200, monitor_size=300, retain_margin=50.0)
    result = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, config)
    assert result.chosen.rule_met
    assert result.chosen.holdout_images == len(split.val)  # the stop was confirmed on all of it
    assert result.chosen is result.checks[-1]
    assert all(c.holdout_images == 200 for c in result.checks if not c.rule_met)
    assert result.holdout_acc_original == result.chosen.holdout_original
    # The subset and the rest add up to the whole hold-out: the confirmed accuracy is the
    # vector's accuracy on all of it (within one image: learning runs on the folded model).
    g = PerturbedClassifier(tiny_workspace.model, torch.from_numpy(result.delta))
    whole = predict(g, tiny_workspace.data.train, split.val).accuracy
    assert abs(result.chosen.holdout_acc - whole) <= 100 / len(split.val)


def test_learning_runs_on_the_classifier_with_batchnorm_folded(tiny_workspace: Workspace) -> None:
    model = tiny_workspace.model
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the classifier is untouched
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    x, _, _ = next(iterate_batches(tiny_workspace.data.train, torch.arange(64), 64))
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)

    assert fold_batchnorm(folded) is folded  # frozen, nothing left to fold: not copied again

    class Branching(torch.nn.Module):  # control flow on a tensor: torch.fx cannot trace it
        def __init__(self) -> None:
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn(x)
            return x if x.sum() > 0 else -x

    untraceable = Branching().eval()
    assert fold_batchnorm(untraceable) is untraceable


def test_channels_last_weights_are_the_same_classifier(tiny_classifier_path: Path, tmp_path: Path) -> None:
    standard = load_classifier(tiny_classifier_path).model
    assert all(p.is_contiguous() for p in standard.parameters())  # checkpoints load in the standard order
    nhwc = channels_last(copy.deepcopy(standard))
    convs = [p for p in nhwc.parameters() if p.dim() == 4 and p.shape[1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    assert open_workspace(tiny_classifier_path).model.body[3].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(nhwc(x), standard(x), atol=1e-5)
    assert weights_digest(nhwc) == weights_digest(standard)  # vectors keep matching the checkpoint
    save_classifier(nhwc, tmp_path / "again.safetensors", {})
    reloaded = load_classifier(tmp_path / "again.safetensors").model
    assert all(p.is_contiguous() for p in reloaded.parameters())
    assert weights_digest(reloaded) == weights_digest(standard)


def test_fast_preset_meets_the_rule_on_far_fewer_samples(tiny_workspace: Workspace) -> None:
    split = tiny_workspace.forget_split(ForgetSpec(classes=(FORGET_CLASS,)))
    fast = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, VectorConfig(monitor_size=300))
    epochs = learn_forget_vector(
        tiny_workspace.model, tiny_workspace.data, split, replace(VectorConfig.epochs(), monitor_size=300)
    )
    assert fast.chosen.rule_met and epochs.chosen.rule_met
    fast_samples = fast.steps_run * VectorConfig().batch_size
    epochs_samples = epochs.steps_run * VectorConfig.epochs().batch_size
    assert fast_samples * 3 <= epochs_samples, (fast.steps_run, epochs.steps_run)


def test_learn_vector_without_settings_uses_the_tasks_default(tiny_workspace: Workspace, tmp_path: Path) -> None:
    """The Python API's default is the CLI's without --preset: the fast preset for a class, written in the file."""
    out = tmp_path / "default.safetensors"
    vector, metrics = learn_vector(tiny_workspace, ForgetSpec(classes=(FORGET_CLASS,)), out, evaluate=False)
    assert vector.hparams == VectorConfig.default_for("class").to_json() == load_vector(out).hparams
    assert metrics["stopping"]["rule_met"]
