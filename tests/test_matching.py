"""Random-subset vectors: the distribution-matching objective, the hold-out halves, and how `fv learn` picks them."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fv_serving.cli.common import add_forget_target, add_vector_config, vector_config
from fv_serving.config import OBJECTIVES, VectorConfig
from fv_serving.data import ForgetSpec, iterate_batches
from fv_serving.errors import InvalidInputError
from fv_serving.matching import SCORES, DistributionMatching, check_objective, holdout_halves
from fv_serving.pipeline import Workspace
from fv_serving.unlearn import DirectDelta, learn_forget_vector, learn_perturbation

SMALL_MATCH = replace(VectorConfig.match(), max_epochs=2, checks_per_epoch=2, monitor_size=300)


def _objective(ws: Workspace, reference: torch.Tensor) -> DistributionMatching:
    zero = torch.zeros(1, *ws.data.input_shape)
    return DistributionMatching(
        "confidence", ws.model, lambda: zero, ws.data.train, reference, alpha=1.0, beta=2.0, clamp=None, seed=0
    )


def test_the_forget_term_is_the_distance_between_sorted_confidences(tiny_workspace: Workspace) -> None:
    """One forget image against one reference image: W1 is |confidence difference|; against itself it is 0."""
    ws = tiny_workspace
    images = torch.tensor([3, 10, 20])  # a forget image, then two retain images of the batch
    x, y, _ = next(iterate_batches(ws.data.train, images, 3))
    with torch.no_grad():
        logits = ws.model(x)
    is_forget = torch.tensor([True, False, False])
    retain = F.cross_entropy(logits[1:], y[1:], reduction="sum") / 3
    same = _objective(ws, images[:1])(logits, y, is_forget, batch_size=3)
    assert torch.allclose(same, retain)  # the forget image's own confidence: nothing to move
    confidence = torch.softmax(logits, dim=1).gather(1, y.view(-1, 1)).squeeze(1)
    other = _objective(ws, torch.tensor([50]))(logits, y, is_forget, batch_size=3)
    with torch.no_grad():
        ref_logits = ws.model(next(iterate_batches(ws.data.train, torch.tensor([50]), 1))[0])
    ref_conf = torch.softmax(ref_logits, dim=1)[0, int(ws.data.train.labels[50])]
    assert torch.allclose(other, retain + 2.0 * (confidence[0] - ref_conf).abs())
    assert not torch.allclose(other, same)


def test_the_halves_split_the_holdout_in_two_disjoint_seeded_parts() -> None:
    val = torch.arange(100, 201)
    reference, rule = holdout_halves(val, seed=0)
    assert len(reference) == 50 and len(rule) == 51
    assert set(reference.tolist()).isdisjoint(rule.tolist())
    assert sorted(reference.tolist() + rule.tolist()) == val.tolist()
    again, _ = holdout_halves(val, seed=0)
    other, _ = holdout_halves(val, seed=1)
    assert torch.equal(reference, again) and not torch.equal(reference, other)


def test_a_random_task_learns_with_matching_and_is_judged_on_the_other_half(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = ws.forget_split(ForgetSpec(percent=10, seed=0))
    _, rule_half = holdout_halves(split.val, SMALL_MATCH.seed)
    # No tolerance: the tiny classifier barely memorises, so its start can already be within
    # 1 point of "unseen" and end learning before the objective is ever used.
    config = replace(SMALL_MATCH, match_tolerance=0.0)
    result = learn_forget_vector(ws.model, ws.data, split, config)
    assert {c.holdout_images for c in result.checks} == {len(rule_half)}  # never the objective's half
    assert result.steps_run > 0 and float(abs(result.delta).max()) > 0  # the objective moved delta
    margin = learn_forget_vector(ws.model, ws.data, split, replace(config, objective="margin"))
    assert result.checks[0] == margin.checks[0]  # the same start and the same rule half for both objectives


def test_matching_is_refused_where_it_does_not_apply(tiny_workspace: Workspace) -> None:
    ws = tiny_workspace
    split = ws.forget_split(ForgetSpec(classes=(1,)))
    with pytest.raises(InvalidInputError, match="'confidence' objective is for random-subset vectors"):
        learn_forget_vector(ws.model, ws.data, split, SMALL_MATCH)
    with pytest.raises(InvalidInputError, match="needs its data term"):  # e.g. fv compose --preset match
        learn_perturbation(ws.model, ws.data, split, DirectDelta(ws.data.input_shape), SMALL_MATCH, goal="erase")
    with pytest.raises(InvalidInputError, match="one process only"):
        check_objective("loss", "random", world=2)
    with pytest.raises(InvalidInputError, match="drop --augment"):
        learn_forget_vector(
            ws.model, ws.data, ws.forget_split(ForgetSpec(percent=10)), replace(SMALL_MATCH, augment=True)
        )
    check_objective("margin", "class", world=2, augment=True)  # the authors' term: a per-image sum, any batches
    check_objective("confidence", "random")


def test_every_matching_objective_has_a_score() -> None:
    assert set(OBJECTIVES) == {"margin", *SCORES}


@pytest.mark.parametrize(
    ("argv", "objective", "beta"),
    [
        (["--forget-percent", "10"], "confidence", VectorConfig.match().beta),
        (["--forget-class", "1"], "margin", VectorConfig().beta),
        (["--forget-percent", "10", "--preset", "fast"], "margin", VectorConfig().beta),
        (["--forget-percent", "10", "--objective", "loss", "--beta", "0.5"], "loss", 0.5),
    ],
)
def test_fv_learn_picks_the_match_preset_for_random_subsets(argv: list[str], objective: str, beta: float) -> None:
    parser = argparse.ArgumentParser()
    add_forget_target(parser, required=True)
    add_vector_config(parser)
    config = vector_config(parser.parse_args(argv))
    assert (config.objective, config.beta) == (objective, beta)


def test_fv_learn_says_when_there_is_nothing_to_forget(tiny_classifier_path, tmp_path, capsys) -> None:
    """A rule the unperturbed model already meets (here: any gap tolerated) gives the zero vector, said plainly."""
    from fv_serving.cli.main import main
    from fv_serving.vectors import load_vector

    out = tmp_path / "v.safetensors"
    argv = ["learn", "--classifier", str(tiny_classifier_path), "--forget-percent", "10", "--match-tolerance", "100"]
    assert main([*argv, "--no-eval", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "already meets the stopping rule" in printed and "nothing to forget" in printed
    assert float(abs(load_vector(out).delta).max()) == 0.0
