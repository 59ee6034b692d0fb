"""Learning forget vectors (docs/method.md section 2) and their bank combinations (section 5).

The frozen classifier f never changes. What is learned is a perturbation module
whose output delta is added to every input:
  * `DirectDelta`      delta itself (one vector, initialised at zero);
  * `BankCombination`  delta(w) = sum_k w_k delta_k over a bank of class vectors.
Both are trained by the same loop with the authors' objective (random subsets may
replace its forget term by a distribution match, `fv_serving.matching`),

  loss = beta * sum_forget max(z_y - max_{k!=y} z_k, -tau) / B
       + alpha * sum_retain CE(z, y) / B + regulariser,

Adam (default) or the authors' SGD with momentum, an exponential learning-rate decay
per epoch, over batches from `fv_serving.sampling` (passes over D_f + D_r, or draws).

A few times per epoch the stopping rule (`fv_serving.stopping`) is checked on a fixed
subset of D_f and on the validation hold-out (or a fixed subset of it, completed by the
rest of the hold-out before the run stops); the best check so far is the only state kept
(memory does not grow with the number of checks). If no check meets the rule, the
closest one is returned and the result says so. Steps and checks run on a copy of the
classifier with its BatchNorm layers folded and its weights in channels-last order
(`models.learning_copy`): the same function, cheaper to run.

The same loop runs data-parallel under torch.distributed (`fv_serving.distributed`):
every rank draws the same global batch, computes its slice's share of the loss (sums
divided by the GLOBAL batch size, the regulariser on one rank only), and the ranks'
gradients of the perturbation are summed, which is exactly one process's gradient.
Checks are sharded the same way and their counts summed, so every rank takes the same
decision and ends with the same perturbation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fv_serving.config import VectorConfig
from fv_serving.data import Dataset, ForgetSplit, ImageSet, default_augmentation, iterate_batches
from fv_serving.distributed import SINGLE, Dist
from fv_serving.errors import InvalidInputError
from fv_serving.matching import DistributionMatching, check_objective, holdout_halves
from fv_serving.metrics import predict
from fv_serving.models import PerturbedClassifier, learning_copy
from fv_serving.perturbation import apply_delta
from fv_serving.sampling import AT_RISK_POOL, AT_RISK_QUANTILE, BatchPlan
from fv_serving.stopping import goal_for


class Objective(Protocol):
    """The data term of a run's loss, from the logits of (this rank's slice of) a batch."""

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, is_forget: torch.Tensor, *, batch_size: int
    ) -> torch.Tensor: ...


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The true class's logit minus the best other one, per sample: > 0 where the prediction is right."""
    true_logit = logits.gather(1, labels.view(-1, 1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return true_logit - others.amax(dim=1)


def forget_vector_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    is_forget: torch.Tensor,
    config: VectorConfig,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Data part of the objective (regulariser excluded); both sums divided by the whole batch size.

    `batch_size` is the global batch's size when `logits` are one rank's slice of it.
    """
    batch = logits.shape[0] if batch_size is None else batch_size
    margin = torch.clamp(logit_margin(logits, labels), min=-config.tau)
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


@dataclass(frozen=True)
class Counts:
    """Correct predictions out of a number of images."""

    correct: float
    total: float

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.correct + other.correct, self.total + other.total)

    @property
    def percent(self) -> float:
        return 100.0 * self.correct / self.total if self.total else 0.0


@dataclass
class Check:
    """One evaluation of the stopping rule."""

    epoch: float
    forget_acc: float
    holdout_acc: float
    holdout_original: float  # the unperturbed model's accuracy on the same hold-out images
    holdout_images: int  # a subset's size, or the whole hold-out's
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
    steps_run: int
    extra: dict[str, Any] = field(default_factory=dict)

    def stopping_report(self) -> dict[str, Any]:
        return {
            "rule_met": self.chosen.rule_met,
            "chosen_epoch": self.chosen.epoch,
            "forget_acc_monitor": round(self.chosen.forget_acc, 3),
            "holdout_acc": round(self.chosen.holdout_acc, 3),
            "holdout_acc_original": round(self.chosen.holdout_original, 3),
            "holdout_images": self.chosen.holdout_images,
            "epochs_run": self.epochs_run,
            "steps_run": self.steps_run,
            "seconds": round(self.seconds, 2),
        }


def sharded_counts(model: nn.Module, images: ImageSet, indices: torch.Tensor, dist: Dist, device: str) -> Counts:
    """Correct predictions and images on `indices`, each rank predicting its shard; the same sums on every rank.

    Counts, not percentages, so that the parts of a hold-out add up to the whole without
    predicting any image twice.
    """
    mine = predict(model, images, dist.shard(indices), device=device)
    counts = torch.tensor([float(np.sum(mine.labels == mine.targets)), float(len(mine.targets))], dtype=torch.float64)
    correct, total = dist.all_reduce_sum(counts).tolist()
    return Counts(correct, total)


def at_risk_images(
    model: nn.Module, images: ImageSet, retain: torch.Tensor, generator: torch.Generator, dist: Dist, device: str
) -> torch.Tensor:
    """The D_r images of a random pool that `model` gets right by the smallest margins (`fv_serving.sampling`).

    Each rank scores its shard of the pool; the margins are summed into one tensor, so
    every rank holds the same set.
    """
    pool = retain[torch.randperm(len(retain), generator=generator)[:AT_RISK_POOL]]
    mine = dist.shard(torch.arange(len(pool)))
    margins = torch.zeros(len(pool))
    with torch.no_grad():
        batches = iterate_batches(images, pool[mine], 1000, device=device)
        margins[mine] = torch.cat([logit_margin(model(x), y).cpu() for x, y, _ in batches])
    dist.all_reduce_sum(margins)
    right = margins > 0
    return pool[right & (margins <= margins[right].quantile(AT_RISK_QUANTILE))]


def make_optimizer(perturbation: nn.Module, config: VectorConfig) -> torch.optim.Optimizer:
    """SGD with momentum (the authors'), or Adam: per-pixel step sizes meet the stopping rule in fewer steps."""
    params, lr, decay = perturbation.parameters(), config.lr, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=decay)


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
    dist: Dist = SINGLE,
    objective: Objective | None = None,
) -> LearnResult:
    """Train `perturbation` against the frozen `classifier` for one forget/retain split.

    Returned: the best check's perturbation. With the stopping rule that is the first
    check meeting it, else the closest one (later wins ties), which may be the
    unperturbed start; without it (the authors' protocol) the last one. Under
    torch.distributed (`dist`) every rank returns the same result.

    `objective` replaces the data term of the loss (default: the authors',
    `forget_vector_loss` with `config`), e.g. for an experiment on random subsets.
    Data-parallel runs need the default: it is a sum over samples, so the ranks'
    slices add up to the global batch's loss, which an arbitrary objective need not.
    """
    if objective is not None and dist.world > 1:
        raise InvalidInputError("a custom objective runs in one process only (data-parallel needs a per-sample sum)")
    if objective is None and config.objective != "margin":
        raise InvalidInputError(
            f"the {config.objective!r} objective needs its data term (`learn_forget_vector` builds it for "
            "random subsets); class vectors, banks and bank combinations use 'margin'"
        )
    start = time.perf_counter()
    data_term = objective or partial(forget_vector_loss, config=config)
    rule = config.rule(goal)
    torch.manual_seed(config.seed)
    classifier.eval()
    learner = learning_copy(classifier)
    perturbation.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    is_forget = torch.zeros(len(data.train), dtype=torch.bool)
    is_forget[split.forget] = True
    monitor = split.forget[torch.randperm(len(split.forget), generator=generator)[: config.monitor_size]]

    def counts(model: nn.Module, indices: torch.Tensor) -> Counts:
        return sharded_counts(model, data.train, indices, dist, device)

    # The rule's hold-out in parts, each with the unperturbed model's counts: a fixed subset
    # checked every time, then (only when the rule holds there) the rest, which completes
    # the whole hold-out. Every image is predicted once per check.
    holdout_parts = [split.val]
    if config.holdout_size is not None and config.holdout_size < len(split.val):
        order = split.val[torch.randperm(len(split.val), generator=generator)]
        holdout_parts = [order[: config.holdout_size], order[config.holdout_size :]]
    with torch.no_grad():
        originals = [counts(learner, part) for part in holdout_parts]
    optimizer = make_optimizer(perturbation, config)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.gamma)
    augmentation = default_augmentation(data) if config.augment else None
    at_risk = (
        None
        if config.at_risk_share is None
        else at_risk_images(learner, data.train, split.retain, generator, dist, device)
    )
    batches = BatchPlan(data, split, config, generator, augmentation, device, at_risk)
    steps = batches.steps
    check_at = {round(steps * (i + 1) / config.checks_per_epoch) for i in range(config.checks_per_epoch)}
    checks: list[Check] = []
    best: tuple[Check, dict[str, torch.Tensor]] | None = None

    def check(epoch: float) -> bool:
        """Measure the rule on the current perturbation; keep it if it is the best so far."""
        nonlocal best
        with torch.no_grad():
            g = PerturbedClassifier(learner, perturbation(), config.clamp)
            forget_acc = counts(g, monitor).percent
            seen, seen_original = Counts(0, 0), Counts(0, 0)
            for part, original in zip(holdout_parts, originals, strict=True):
                seen, seen_original = seen + counts(g, part), seen_original + original
                distance = rule.distance(forget_acc, seen.percent, seen_original.percent)
                if distance > 0:
                    break
        met = distance == 0
        checks.append(
            Check(
                epoch=round(epoch, 3),
                forget_acc=forget_acc,
                holdout_acc=seen.percent,
                holdout_original=seen_original.percent,
                holdout_images=int(seen.total),
                rule_met=met,
                distance=distance,
            )
        )
        if best is None or not config.stopping or distance <= best[0].distance:
            # Parameters only: a BankCombination's bank is a frozen buffer and never changes.
            best = (checks[-1], {n: p.detach().clone() for n, p in perturbation.named_parameters()})
        return met

    # The starting point is a candidate too: no perturbation for a new vector (nothing may
    # beat doing nothing, e.g. for random subsets), the zero-shot weights for a combination.
    stop = check(0.0) and config.stopping
    steps_run = 0
    bar = tqdm(total=steps * config.max_epochs, desc=desc, leave=False, mininterval=1.0, disable=not dist.is_main)
    for epoch in range(config.max_epochs):
        if stop:
            break
        for step, (x, y, idx) in enumerate(batches.epoch(), start=1):
            part = dist.batch_slice(len(y))  # this rank's share of the global batch (all of it alone)
            logits = learner(apply_delta(x[part], perturbation(), config.clamp))
            loss = data_term(logits, y[part], is_forget[idx[part]].to(device), batch_size=len(y))
            if dist.is_main:  # the regulariser counts once, however many ranks share the batch
                loss = loss + config.lam * perturbation.regulariser(len(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_gradients(perturbation)
            optimizer.step()
            steps_run += 1
            bar.update(1)
            if step in check_at:
                met = check(epoch + step / steps)
                bar.set_postfix(forget=f"{checks[-1].forget_acc:.1f}", holdout=f"{checks[-1].holdout_acc:.1f}")
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
        holdout_acc_original=sum(originals, Counts(0, 0)).percent,
        seconds=time.perf_counter() - start,
        epochs_run=checks[-1].epoch,
        steps_run=steps_run,
    )


def learn_forget_vector(
    classifier: nn.Module,
    data: Dataset,
    split: ForgetSplit,
    config: VectorConfig,
    *,
    device: str = "cpu",
    dist: Dist = SINGLE,
) -> LearnResult:
    """One vector for a class-wise ("erase") or random-subset ("match") task, with `config.objective`.

    A random-subset task cuts the hold-out in two (`matching.holdout_halves`): the
    stopping rule judges on one half, a matching objective aims at the other.
    """
    check_objective(config.objective, split.spec.kind, world=dist.world, augment=config.augment)
    goal = goal_for(split.spec.kind)
    delta = DirectDelta(data.input_shape)
    objective: Objective | None = None
    # The copy the loop runs (given to it, it is used as it is), made here so that a matching
    # objective scores its reference images with the same function as the batch.
    classifier = learning_copy(classifier)
    if goal == "match":
        reference, rule_half = holdout_halves(split.val, config.seed)
        split = replace(split, val=rule_half)
        if config.objective != "margin":
            objective = DistributionMatching(
                config.objective,
                classifier,
                delta,
                data.train,
                reference,
                alpha=config.alpha,
                beta=config.beta,
                clamp=config.clamp,
                seed=config.seed,
                device=device,
            )
    return learn_perturbation(
        classifier,
        data,
        split,
        delta,
        config,
        goal=goal,
        device=device,
        desc=f"forget vector ({split.spec.kind})",
        dist=dist,
        objective=objective,
    )
