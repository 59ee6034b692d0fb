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

A few times per epoch the stopping rule (`fv_serving.stopping`) is checked on a fixed
subset of D_f and on the validation hold-out; the best check so far is the only state
kept (memory does not grow with the number of checks). If no check meets the rule,
the closest one is returned and the result says so.
"""

from __future__ import annotations

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
from fv_serving.stopping import goal_for


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
    """Train `perturbation` against the frozen `classifier` for one forget/retain split.

    Returned: the best check's perturbation. With the stopping rule that is the first
    check meeting it, else the closest one (later wins ties), which may be the
    unperturbed start; without it (the authors' protocol) the last one.
    """
    rule = config.rule(goal)
    torch.manual_seed(config.seed)
    classifier.eval()
    perturbation.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    union = torch.cat([split.forget, split.retain]).sort().values
    is_forget = torch.zeros(len(data.train), dtype=torch.bool)
    is_forget[split.forget] = True
    monitor = split.forget[torch.randperm(len(split.forget), generator=generator)[: config.monitor_size]]
    with torch.no_grad():
        holdout0 = predict(classifier, data.train, split.val, device=device).accuracy
    optimizer = torch.optim.SGD(
        perturbation.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    augmentation = default_augmentation(data) if config.augment else None
    steps = num_batches(len(union), config.batch_size)
    check_at = {round(steps * (i + 1) / config.checks_per_epoch) for i in range(config.checks_per_epoch)}
    checks: list[Check] = []
    best: tuple[Check, dict[str, torch.Tensor]] | None = None

    def check(epoch: float) -> bool:
        """Measure the rule on the current perturbation; keep it if it is the best so far."""
        nonlocal best
        with torch.no_grad():
            g = PerturbedClassifier(classifier, perturbation(), config.clamp)
            forget_acc = predict(g, data.train, monitor, device=device).accuracy
            holdout_acc = predict(g, data.train, split.val, device=device).accuracy
        distance = rule.distance(forget_acc, holdout_acc, holdout0)
        checks.append(Check(round(epoch, 3), forget_acc, holdout_acc, distance == 0, distance))
        if best is None or not config.stopping or distance <= best[0].distance:
            # Parameters only: a BankCombination's bank is a frozen buffer and never changes.
            best = (checks[-1], {n: p.detach().clone() for n, p in perturbation.named_parameters()})
        return distance == 0

    start = time.perf_counter()
    # The starting point is a candidate too: no perturbation for a new vector (nothing may
    # beat doing nothing, e.g. for random subsets), the zero-shot weights for a combination.
    stop = check(0.0) and config.stopping
    bar = tqdm(total=steps * config.max_epochs, desc=desc, leave=False, mininterval=1.0)
    for epoch in range(config.max_epochs):
        if stop:
            break
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
            logits = classifier(apply_delta(x, perturbation(), config.clamp))
            loss = forget_vector_loss(logits, y, is_forget[idx].to(device), config)
            loss = loss + config.lam * perturbation.regulariser(len(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step in check_at:
                met = check(epoch + step / steps)
                bar.set_postfix(loss=f"{loss.item():.3f}", forget=f"{checks[-1].forget_acc:.1f}")
                if config.stopping and met:
                    stop = True
                    break
        scheduler.step()
    bar.close()
    assert best is not None  # the starting point is always checked
    chosen, state = best
    with torch.no_grad():
        for name, p in perturbation.named_parameters():
            p.copy_(state[name])
        final = perturbation().detach().cpu()[0].numpy().astype(np.float32)
    weights = perturbation.weights.detach().cpu().numpy() if isinstance(perturbation, BankCombination) else None
    return LearnResult(
        delta=final,
        weights=weights,
        checks=checks,
        chosen=chosen,
        holdout_acc_original=holdout0,
        seconds=time.perf_counter() - start,
        epochs_run=checks[-1].epoch,
    )


def learn_forget_vector(
    classifier: nn.Module, data: Dataset, split: ForgetSplit, config: VectorConfig, *, device: str = "cpu"
) -> LearnResult:
    return learn_perturbation(
        classifier,
        data,
        split,
        DirectDelta(data.input_shape),
        config,
        goal=goal_for(split.spec.kind),
        device=device,
        desc=f"forget vector ({split.spec.kind})",
    )
