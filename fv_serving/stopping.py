"""The stopping rule: when has an unlearning run done its job, judged only on data a user has.

The authors of the method picked epochs by looking at evaluation metrics; a product
needs a rule instead. The same rule stops a forget vector's learning run and picks
the hyper-parameters of the model-based baselines (their grid search), so both kinds
of method are judged by one criterion:

  * goal "erase" (class-wise tasks): forget-set accuracy <= `forget_target` percent;
  * goal "match" (random subsets): the forget set should look like unseen data, not be
    misclassified: |forget-set accuracy - hold-out accuracy| <= `match_tolerance` points;

both with hold-out accuracy at most `retain_margin` points below the original model's.
Hold-out means the validation images no model trains on, never the test set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fv_serving.errors import InvalidInputError

GOALS = ("erase", "match")


def goal_for(task_kind: str) -> str:
    """Class-wise tasks erase; random-subset tasks match unseen data."""
    return "erase" if task_kind == "class" else "match"


@dataclass(frozen=True)
class StoppingRule:
    """One goal and its three thresholds (percent / points of accuracy)."""

    goal: str
    forget_target: float = 0.5
    match_tolerance: float = 1.0
    # 1 point: with 2 the class-wise vectors of the quality benchmark stopped sooner but
    # cost 1.9-2.7 points of retain accuracy (benchmarks/results/quality-margin2/).
    retain_margin: float = 1.0

    def __post_init__(self) -> None:
        if self.goal not in GOALS:
            raise InvalidInputError(f"stopping goal must be one of {GOALS}, got {self.goal!r}")
        if self.match_tolerance < 0 or self.retain_margin < 0:
            raise InvalidInputError(
                f"match_tolerance and retain_margin must be >= 0, got {self.match_tolerance} / {self.retain_margin}"
            )

    def distance(self, forget_acc: float, holdout_acc: float, holdout_original: float) -> float:
        """0 when the rule holds, else the number of points by which it is missed."""
        retain_miss = max(0.0, (holdout_original - self.retain_margin) - holdout_acc)
        if self.goal == "erase":
            return max(0.0, forget_acc - self.forget_target) + retain_miss
        return max(0.0, abs(forget_acc - holdout_acc) - self.match_tolerance) + retain_miss

    def describe(self) -> str:
        target = (
            f"forget-set accuracy <= {self.forget_target}%"
            if self.goal == "erase"
            else f"|forget-set accuracy - validation accuracy| <= {self.match_tolerance} points"
        )
        return f"{target} and validation accuracy >= original's - {self.retain_margin} points"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
