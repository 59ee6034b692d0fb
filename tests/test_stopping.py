"""The stopping rule: known distances, and the goal each kind of task is judged by."""

from __future__ import annotations

import pytest
from conftest import QUICK_VECTOR

from fv_serving.data import ForgetSpec
from fv_serving.errors import InvalidInputError
from fv_serving.pipeline import Workspace
from fv_serving.stopping import StoppingRule, goal_for
from fv_serving.unlearn import learn_forget_vector


def test_erase_distances() -> None:
    erase = StoppingRule("erase", forget_target=0.5, retain_margin=2.0)
    assert erase.distance(0.0, 89.0, 90.0) == 0.0
    assert erase.distance(10.5, 85.0, 90.0) == pytest.approx(10.0 + 3.0)  # forget miss + retain miss


def test_match_distances() -> None:
    match = StoppingRule("match", match_tolerance=1.0, retain_margin=2.0)
    assert match.distance(88.5, 88.0, 89.0) == 0.0  # the forget set looks unseen: met
    assert match.distance(100.0, 88.0, 89.0) == pytest.approx(11.0)
    assert match.distance(70.0, 70.5, 89.0) == pytest.approx(16.5)  # matched, but the retain floor is broken


def test_unknown_goal_and_negative_margins_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="goal"):
        StoppingRule("forget")
    with pytest.raises(InvalidInputError, match="retain_margin"):
        StoppingRule("erase", retain_margin=-1.0)


def test_tasks_choose_their_goal() -> None:
    assert goal_for("class") == "erase" and goal_for("random") == "match"


def test_a_random_task_is_judged_by_matching(tiny_workspace: Workspace) -> None:
    """Each check of a random-subset run is scored by the match goal: the same accuracies under "erase"
    would score the forget set's (high) accuracy as a miss of dozens of points."""
    split = tiny_workspace.forget_split(ForgetSpec(percent=10, seed=0))
    result = learn_forget_vector(tiny_workspace.model, tiny_workspace.data, split, QUICK_VECTOR)
    start = result.checks[0]
    match = QUICK_VECTOR.rule("match").distance(start.forget_acc, start.holdout_acc, result.holdout_acc_original)
    erase = QUICK_VECTOR.rule("erase").distance(start.forget_acc, start.holdout_acc, result.holdout_acc_original)
    assert start.distance == match and erase > match + 50
