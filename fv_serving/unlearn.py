"""Learning forget vectors (docs/method.md section 2) and their bank combinations (section 5).

The frozen classifier f never changes. What is learned is a perturbation module
whose output delta is added to every input:
  * `DirectDelta`      delta itself (one vector, initialised at zero);
  * `BankCombination`  delta(w) = sum_k w_k delta_k over a bank of class vectors.
Both are trained by the same loop with the authors' objective,

  loss = beta * sum_forget max(z_y - max_{k!=y} z_k, -tau) / B
       + alpha * sum_retain CE(z, y) / B + regulariser,

SGD with momentum and an exponential learning-rate decay per epoch, over shuffled
batches that mix forget and retain samples in their natural proportion.

Stopping rule (the authors chose epochs by looking at evaluation metrics; a
product needs a rule): a few times per epoch, measure forget accuracy on a fixed
subset of D_f and accuracy on the validation hold-out (never the test set).
  * goal "erase" (class-wise): stop once forget accuracy <= `forget_target` and
    hold-out accuracy has not dropped more than `retain_margin` points below the
    original model's.
  * goal "match" (random subsets): the forget set should look like unseen data, not
    be misclassified: stop once |forget acc - hold-out acc| <= `match_tolerance`
    with the same retain margin.
If no check meets the rule, the check closest to it is returned and the result says so.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fv_serving.config import VectorConfig
from fv_serving.data import Dataset, ForgetSplit, default_augmentation, iterate_batches, num_batches
from fv_serving.metrics import predict
from fv_serving.models import PerturbedClassifier
from fv_serving.perturbation import apply_delta

GOALS = ("erase", "match")


def forget_vector_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_forget: torch.Tensor,
    config: VectorConfig,
) -> torch.Tensor:
    """Data part of the objective (regulariser excluded); both sums divided by the whole batch size."""
    batch = logits.shape[0]
    true_logit = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    margin = torch.clamp(true_logit - others.amax(dim=1), min=-config.tau)
    ce = F.cross_entropy(logits, labels, reduction="none")
    forget_term = margin[is_forget].sum() / batch
    retain_term = ce[~is_forget].sum() / batch
    return config.beta * forget_term + config.alpha * retain_term


class DirectDelta(nn.Module):
    """delta itself is the parameter; regulariser lam * ||delta||_2 / B."""

    def __init__(self, shape: tuple[int, int, int], init: torch.Tensor | None = None) -> None:
        super().__init__()
        start = torch.zeros(1, *shape) if init is None else init.detach().reshape(1, *shape).clone()
        self.delta = nn.Parameter(start)

    def forward(self) -> torch.Tensor:
        return self.delta

    def regulariser(self, batch_size: int) -> torch.Tensor:
        return self.delta.norm() / batch_size


class BankCombination(nn.Module):
    """delta(w) = sum_k w_k delta_k with the bank frozen; regulariser lam * ||w||_2 (not divided by B)."""

    bank: torch.Tensor

    def __init__(self, bank: torch.Tensor, init_weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", bank.detach().float())
        self.weights = nn.Parameter(init_weights.detach().float().clone())

    def forward(self) -> torch.Tensor:
        return torch.einsum("k,kchw->chw", self.weights, self.bank).unsqueeze(0)

    def regulariser(self, batch_size: int) -> torch.Tensor:
        return self.weights.norm()


@dataclass
class Check:
    """One evaluation of the stopping rule."""

    epoch: float
    forget_acc: float
    holdout_acc: float
    rule_met: bool
    distance: float  # how far from meeting the rule (points); 0 when met


@dataclass
class LearnResult:
    delta: np.ndarray  # [C,H,W] float32
    weights: np.ndarray | None  # combination weights, for BankCombination
    checks: list[Check]
    chosen: Check
    holdout_acc_original: float
    seconds: float
    epochs_run: float
    extra: dict[str, Any] = field(default_factory=dict)

    def stopping_report(self) -> dict[str, Any]:
        return {
            "rule_met": self.chosen.rule_met,
            "chosen_epoch": self.chosen.epoch,
            "forget_acc_monitor": round(self.chosen.forget_acc, 3),
            "holdout_acc": round(self.chosen.holdout_acc, 3),
            "holdout_acc_original": round(self.holdout_acc_original, 3),
            "epochs_run": self.epochs_run,
            "seconds": round(self.seconds, 2),
        }


def rule_distance(
    goal: str,
    forget_acc: float,
    holdout_acc: float,
    holdout0: float,
    *,
    forget_target: float,
    match_tolerance: float,
    retain_margin: float,
) -> float:
    """0 when the stopping rule holds, else the number of points by which it is missed.

    Shared by the forget vectors' stopping rule and the baselines' hyper-parameter
    selection, so that both kinds of method are judged by one criterion.
    """
    retain_miss = max(0.0, (holdout0 - retain_margin) - holdout_acc)
    if goal == "erase":
        return max(0.0, forget_acc - forget_target) + retain_miss
    return max(0.0, abs(forget_acc - holdout_acc) - match_tolerance) + retain_miss


def learn_perturbation(
    classifier: nn.Module,
    data: Dataset,
    split: ForgetSplit,
    perturbation: DirectDelta | BankCombination,
    config: VectorConfig,
    *,
    goal: str,
    device: str = "cpu",
    desc: str = "forget vector",
) -> LearnResult:
    """Train `perturbation` against the frozen `classifier` for one forget/retain split."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    torch.manual_seed(config.seed)
    classifier.eval()
    perturbation.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    union = torch.cat([split.forget, split.retain]).sort().values
    is_forget_lookup = torch.zeros(len(data.train), dtype=torch.bool)
    is_forget_lookup[split.forget] = True
    monitor = split.forget[torch.randperm(len(split.forget), generator=generator)[: config.monitor_size]]
    holdout = split.val

    def measure() -> tuple[float, float]:
        with torch.no_grad():
            g = PerturbedClassifier(classifier, perturbation(), config.clamp)
            return (
                predict(g, data.train, monitor, device=device).accuracy,
                predict(g, data.train, holdout, device=device).accuracy,
            )

    with torch.no_grad():
        holdout0 = predict(classifier, data.train, holdout, device=device).accuracy
    optimizer = torch.optim.SGD(
        perturbation.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    augmentation = default_augmentation(data) if config.augment else None
    steps = num_batches(len(union), config.batch_size)
    check_at = {round(steps * (i + 1) / config.checks_per_epoch) for i in range(config.checks_per_epoch)}

    checks: list[Check] = []
    states: list[dict[str, torch.Tensor]] = []

    def record(epoch: float) -> bool:
        """Evaluate the rule on the current perturbation, keep a copy of it; True when the rule holds."""
        forget_acc, holdout_acc = measure()
        distance = rule_distance(
            goal,
            forget_acc,
            holdout_acc,
            holdout0,
            forget_target=config.forget_target,
            match_tolerance=config.match_tolerance,
            retain_margin=config.retain_margin,
        )
        checks.append(Check(round(epoch, 3), forget_acc, holdout_acc, distance == 0, distance))
        states.append(copy.deepcopy(perturbation.state_dict()))
        return distance == 0

    start = time.perf_counter()
    # The starting point is a candidate too: no perturbation for a new vector (nothing may
    # beat doing nothing, e.g. for random subsets), the zero-shot weights for a combination.
    stop = record(0.0) and config.stopping
    bar = tqdm(total=steps * config.max_epochs, desc=desc, leave=False, mininterval=1.0)
    for epoch in range(0 if stop else config.max_epochs):
        batches = iterate_batches(
            data.train,
            union,
            config.batch_size,
            shuffle=True,
            generator=generator,
            augmentation=augmentation,
            device=device,
        )
        for step, (x, y, idx) in enumerate(batches, start=1):
            delta = perturbation()
            logits = classifier(apply_delta(x, delta, config.clamp))
            loss = forget_vector_loss(logits, y, is_forget_lookup[idx].to(device), config)
            loss = loss + config.lam * perturbation.regulariser(len(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step in check_at:
                met = record(epoch + step / steps)
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    forget=f"{checks[-1].forget_acc:.1f}",
                    holdout=f"{checks[-1].holdout_acc:.1f}",
                )
                if config.stopping and met:
                    stop = True
                    break
        scheduler.step()
        if stop:
            break
    bar.close()
    # Met: the first check that meets the rule. Else the closest one (later wins ties),
    # which may be the starting point. Without a stopping rule (parity): the last one.
    closest = min(range(len(checks)), key=lambda i: (checks[i].distance, -i))
    pick = closest if config.stopping else len(checks) - 1
    perturbation.load_state_dict(states[pick])
    with torch.no_grad():
        final = perturbation().detach().cpu()[0].numpy().astype(np.float32)
    weights = perturbation.weights.detach().cpu().numpy() if isinstance(perturbation, BankCombination) else None
    return LearnResult(
        delta=final,
        weights=weights,
        checks=checks,
        chosen=checks[pick],
        holdout_acc_original=holdout0,
        seconds=time.perf_counter() - start,
        epochs_run=checks[-1].epoch,
    )


def goal_for(split: ForgetSplit) -> str:
    """Class-wise tasks erase; random-subset tasks match unseen data."""
    return "erase" if split.spec.kind == "class" else "match"


def learn_forget_vector(
    classifier: nn.Module, data: Dataset, split: ForgetSplit, config: VectorConfig, *, device: str = "cpu"
) -> LearnResult:
    return learn_perturbation(
        classifier,
        data,
        split,
        DirectDelta(data.input_shape),
        config,
        goal=goal_for(split),
        device=device,
        desc=f"forget vector ({split.spec.kind})",
    )
