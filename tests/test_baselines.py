"""Model-based baselines, output masking and the gated forget vector, on a real Fashion-MNIST subset.

Each test states a property that a wrong implementation would break: frozen means
bit-identical, SalUn's mask is a hard limit, GA/RL really move forget predictions.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from fv_serving.baselines import (
    BaselineConfig,
    count_changed,
    grid_search,
    random_wrong_labels,
    saliency_mask,
    unlearn_model,
)
from fv_serving.data import ForgetSpec, ForgetSplit, iterate_batches
from fv_serving.errors import InvalidInputError
from fv_serving.gating import GatedPerturbedClassifier
from fv_serving.masking import OutputMaskedClassifier
from fv_serving.metrics import predict
from fv_serving.pipeline import Workspace
from fv_serving.stopping import StoppingRule

FORGET = 1  # Trouser: learned well by the tiny fixture model


def small_split(ws: Workspace, classes: tuple[int, ...] = (FORGET,), n_forget: int = 200) -> ForgetSplit:
    """The fixture's task, cut down so that one epoch takes a second or two."""
    split = ws.forget_split(ForgetSpec(classes=classes))
    return replace(split, forget=split.forget[:n_forget], retain=split.retain[:600], val=split.val[:300])


def forget_accuracy(model: torch.nn.Module, ws: Workspace, split: ForgetSplit) -> float:
    return predict(model, ws.data.train, split.forget).accuracy


def test_ga_lowers_forget_accuracy_and_leaves_the_original_untouched(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = small_split(ws)
    before = copy.deepcopy(ws.model.state_dict())
    acc0 = forget_accuracy(ws.model, ws, split)
    result = unlearn_model(ws.model, ws.data, split, BaselineConfig("GA", lr=0.01, epochs=2))
    assert acc0 > 80
    assert forget_accuracy(result.model, ws, split) < acc0 - 30
    assert all(torch.equal(before[k], v) for k, v in ws.model.state_dict().items())
    assert result.params_changed > 0 and result.seconds > 0
    assert not any(p.requires_grad for p in result.model.parameters())


def test_ft_keeps_frozen_layers_bit_identical(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    frozen = ("body.0", "body.1")  # first conv and its BatchNorm (weights and running statistics)
    result = unlearn_model(ws.model, ws.data, small_split(ws), BaselineConfig("FT", lr=0.05, epochs=1, freeze=frozen))
    original, tuned = ws.model.state_dict(), result.model.state_dict()
    frozen_keys = [k for k in original if k.startswith(("body.0.", "body.1."))]
    assert frozen_keys and all(torch.equal(original[k], tuned[k]) for k in frozen_keys)
    assert not torch.equal(original["body.3.weight"], tuned["body.3.weight"])
    unfrozen = sum(
        int((p != dict(ws.model.named_parameters())[n]).sum())
        for n, p in result.model.named_parameters()
        if not n.startswith(("body.0.", "body.1."))
    )
    assert result.params_changed == unfrozen > 0
    assert not torch.equal(original["body.10.weight"], tuned["body.10.weight"])  # "body.1" is not "body.10"


def test_freeze_prefix_that_matches_nothing_is_refused(tiny_workspace: Workspace) -> None:
    with pytest.raises(InvalidInputError, match="matches no parameter"):
        unlearn_model(
            tiny_workspace.model,
            tiny_workspace.data,
            small_split(tiny_workspace),
            BaselineConfig("FT", lr=0.01, epochs=1, freeze=("backbone",)),
        )


def test_salun_changes_only_masked_weights(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = small_split(ws)
    fraction = 0.1
    mask = saliency_mask(copy.deepcopy(ws.model), ws.data, split.forget, fraction)
    result = unlearn_model(
        ws.model, ws.data, split, BaselineConfig("SalUn", lr=0.05, epochs=1, saliency_fraction=fraction)
    )
    reference = dict(ws.model.named_parameters())
    outside = sum(int(((p != reference[n]) & ~mask[n]).sum()) for n, p in result.model.named_parameters())
    selected = sum(int(m.sum()) for m in mask.values())
    assert selected == round(fraction * sum(p.numel() for p in ws.model.parameters()))
    assert outside == 0
    assert 0 < result.params_changed <= selected


def test_rl_moves_forget_predictions_away_from_true_labels(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = small_split(ws)
    acc0 = forget_accuracy(ws.model, ws, split)
    result = unlearn_model(ws.model, ws.data, split, BaselineConfig("RL", lr=0.05, epochs=2))
    assert forget_accuracy(result.model, ws, split) < acc0 - 30


def test_random_wrong_labels_avoid_true_and_forgotten_classes() -> None:
    labels = torch.arange(10).repeat(50)
    drawn = random_wrong_labels(labels, 10, (3, 4), torch.Generator().manual_seed(0))
    assert not bool((drawn == labels).any())
    assert not bool(torch.isin(drawn, torch.tensor([3, 4])).any())
    assert len(drawn.unique()) == 8  # every allowed class is drawn
    with pytest.raises(InvalidInputError):
        random_wrong_labels(torch.tensor([0]), 2, (1,), torch.Generator())


def test_count_changed_counts_entries(tiny_workspace: Workspace) -> None:
    model = copy.deepcopy(tiny_workspace.model)
    assert count_changed(model, tiny_workspace.model) == 0
    with torch.no_grad():
        model.body[0].weight.view(-1)[:7] += 1.0
        model.body[-1].bias[:3] -= 1.0
    assert count_changed(model, tiny_workspace.model) == 10
    with pytest.raises(InvalidInputError, match="differs"):
        count_changed(torch.nn.Linear(2, 2), tiny_workspace.model)


def test_config_validation_names_the_parameter() -> None:
    with pytest.raises(InvalidInputError, match="unknown baseline"):
        BaselineConfig("NegGrad", lr=0.1, epochs=1)
    with pytest.raises(InvalidInputError, match="lr"):
        BaselineConfig("FT", lr=0.0, epochs=1)
    with pytest.raises(InvalidInputError, match="saliency_fraction"):
        BaselineConfig("SalUn", lr=0.1, epochs=1, saliency_fraction=1.5)


def test_grid_search_choice_is_reproducible(tiny_workspace: Workspace) -> None:
    """The chosen (lr, epochs) re-run from scratch gives bit-identical weights: the grid reports what it kept."""
    ws = tiny_workspace
    split = small_split(ws)
    base = BaselineConfig("GA", lr=0.001, epochs=1)
    grid = grid_search(ws.model, ws.data, split, base, (0.001, 0.01), 2, StoppingRule("erase"), monitor_size=200)
    assert len(grid.points) == 4 and grid.chosen.epochs in (1, 2) and grid.chosen.lr in (0.001, 0.01)
    best_key = min((p.distance, -p.holdout_acc, p.epochs) for p in grid.points)
    chosen = next(p for p in grid.points if p.lr == grid.chosen.lr and p.epochs == grid.chosen.epochs)
    assert (chosen.distance, -chosen.holdout_acc, chosen.epochs) == best_key
    again = unlearn_model(ws.model, ws.data, split, grid.chosen)
    assert count_changed(again.model, grid.best.model) == 0


def _first_batch(ws: Workspace, n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = next(iterate_batches(ws.data.test, torch.arange(n), n))
    return x, y


def test_output_masking(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = ws.forget_split(ForgetSpec(classes=(FORGET, 3)))
    masked = OutputMaskedClassifier(ws.model, (FORGET, 3), ws.data.num_classes)
    assert predict(masked, ws.data.train, split.forget).accuracy == 0.0
    plain = predict(ws.model, ws.data.train, split.retain).labels
    after = predict(masked, ws.data.train, split.retain).labels
    kept = ~torch.isin(torch.from_numpy(plain), torch.tensor([FORGET, 3])).numpy()
    assert kept.mean() > 0.9 and (plain[kept] == after[kept]).all()
    assert not torch.isin(torch.from_numpy(after), torch.tensor([FORGET, 3])).any()
    with pytest.raises(InvalidInputError):
        OutputMaskedClassifier(ws.model, (), 10)


def test_gated_vector_routes_by_the_plain_prediction(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    x, _ = _first_batch(ws)
    delta = 0.5 * torch.randn(1, 28, 28, generator=torch.Generator().manual_seed(0))
    gated = GatedPerturbedClassifier(ws.model, delta, (FORGET,))
    with torch.no_grad():
        plain, perturbed, out = ws.model(x), ws.model(x + delta), gated(x)
    gate = plain.argmax(1) == FORGET
    assert 0 < int(gate.sum()) < len(x)
    assert torch.equal(out[~gate], plain[~gate])
    assert torch.equal(out[gate], perturbed[gate])
    assert not torch.equal(perturbed[~gate], plain[~gate])  # the delta does matter where it is not applied
    with pytest.raises(InvalidInputError, match="class-wise"):
        GatedPerturbedClassifier(ws.model, delta, ())
