"""Model-based unlearning baselines (docs/method.md section 7): what users would otherwise pick.

Every method starts from a COPY of the same original weights and changes them with
the one SGD loop of `train.sgd_epochs`. The methods differ only in three things,
which `_plan` spells out in one table:

  method     data it iterates     loss per batch                     weights it may change
  FT         D_r                  CE                                 all (or all but frozen prefixes)
  l1-sparse  D_r                  CE + a_t * ||theta||_1, a_t -> 0   all
  GA         D_f                  -CE (gradient ascent)              all
  RL         D_f + D_r            CE, D_f relabelled at random       all
  SalUn      D_f + D_r            as RL                              top fraction of |grad forget loss|

Retrain (a model trained from scratch on D_r with the original recipe) is the gold
standard the others are compared to; it is `retrain` below.

Each run returns the unlearned model, its wall time and the number of weight
entries that differ from the original, so a table can show what each method costs
and how much of the model it touches. Hyper-parameters are chosen by
`grid_search` on the validation hold-out (`split.val`) and the forget set itself,
with the same stopping rule the forget vectors use (`fv_serving.stopping`), never on
the test set.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fv_serving.config import TrainConfig
from fv_serving.data import Augmentation, Dataset, ForgetSplit, iterate_batches
from fv_serving.errors import InvalidInputError
from fv_serving.metrics import predict
from fv_serving.models import Classifier, freeze
from fv_serving.stopping import StoppingRule
from fv_serving.train import BatchLoss, sgd_epochs, train_classifier

METHODS = ("FT", "GA", "RL", "l1-sparse", "SalUn")


@dataclass(frozen=True)
class BaselineConfig:
    """One model-based unlearning run: plain SGD (momentum, weight decay) at a constant learning rate.

    The learning rate is constant so that the model after e epochs of an E-epoch run
    is exactly the model of an e-epoch run: a grid over epochs then costs one run per
    learning rate. The l1 penalty is the exception (it decays over a horizon); its
    horizon is therefore a field of its own, recorded with the chosen setting.
    """

    method: str
    lr: float
    epochs: int
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    l1_alpha: float = 1e-4  # l1-sparse: initial penalty weight (decays linearly to 0)
    l1_decay_epochs: int | None = None  # l1-sparse: horizon of that decay (None: `epochs`)
    saliency_fraction: float = 0.5  # SalUn: fraction of weight entries it may update
    freeze: tuple[str, ...] = ()  # parameter-name prefixes kept frozen (e.g. "body.0" for the first conv)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InvalidInputError(f"unknown baseline {self.method!r}; expected one of {METHODS}")
        if not self.lr > 0:
            raise InvalidInputError(f"{self.method}: lr must be positive, got {self.lr}")
        if self.epochs < 1:
            raise InvalidInputError(f"{self.method}: epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InvalidInputError(f"{self.method}: batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.saliency_fraction <= 1:
            raise InvalidInputError(f"SalUn: saliency_fraction must be in (0, 1], got {self.saliency_fraction}")
        if self.l1_alpha < 0:
            raise InvalidInputError(f"l1-sparse: l1_alpha must be >= 0, got {self.l1_alpha}")
        if self.l1_decay_epochs is not None and self.l1_decay_epochs < self.epochs:
            raise InvalidInputError(
                f"l1-sparse: l1_decay_epochs ({self.l1_decay_epochs}) must be >= epochs ({self.epochs})"
            )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["freeze"] = list(self.freeze)
        return out


@dataclass
class UnlearnedModel:
    """An unlearned model (frozen, eval mode) and what it cost."""

    method: str
    model: nn.Module
    seconds: float
    params_changed: int  # weight entries that differ from the original's
    params_total: int
    config: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seconds": round(self.seconds, 3),
            "params_changed": self.params_changed,
            "params_total": self.params_total,
            "config": self.config,
        }


# ------------------------------------------------------------------ weights


def count_changed(model: nn.Module, reference: nn.Module) -> int:
    """Number of parameter entries of `model` that differ from `reference` (same architecture).

    Only nn.Parameters count; BatchNorm running statistics are buffers (every method
    that trains in train mode moves them, as the authors' code does).
    """
    ref = dict(reference.named_parameters())
    total = 0
    for name, p in model.named_parameters():
        if name not in ref or ref[name].shape != p.shape:
            raise InvalidInputError(f"cannot compare weights: parameter {name!r} differs in name or shape")
        total += int((p.detach().cpu() != ref[name].detach().cpu()).sum())
    return total


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _frozen_names(model: nn.Module, prefixes: tuple[str, ...]) -> set[str]:
    names = [n for n, _ in model.named_parameters()]
    frozen: set[str] = set()
    for prefix in prefixes:
        hits = {n for n in names if n == prefix or n.startswith(prefix + ".")}
        if not hits:
            tops = sorted({n.rsplit(".", 1)[0] for n in names})
            raise InvalidInputError(f"freeze prefix {prefix!r} matches no parameter; modules with weights: {tops}")
        frozen |= hits
    return frozen


class _PartlyFrozen(nn.Module):
    """Keeps frozen sub-modules in eval mode while the rest trains.

    Without this, `model.train()` would let BatchNorm layers of a frozen block update
    their running statistics, so a 'frozen' layer would still change what it computes.
    """

    def __init__(self, model: nn.Module, frozen_modules: list[nn.Module]) -> None:
        super().__init__()
        self.model = model
        self._frozen = frozen_modules

    def train(self, mode: bool = True) -> _PartlyFrozen:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _modules_under(model: nn.Module, prefixes: tuple[str, ...]) -> list[nn.Module]:
    return [m for n, m in model.named_modules() if any(n == p or n.startswith(p + ".") for p in prefixes)]


# ------------------------------------------------------------------ SalUn saliency


def saliency_mask(
    model: nn.Module,
    data: Dataset,
    indices: torch.Tensor,
    fraction: float,
    *,
    exclude: set[str] | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """SalUn's weight saliency: True for the `fraction` of entries with the largest |grad of the forget loss|.

    The gradient is accumulated over the forget set with the model in eval mode.
    Exactly round(fraction * n) entries are selected (top-k, not a threshold, so ties
    cannot change the count); parameters named in `exclude` are never selected.
    """
    exclude = exclude or set()
    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if n not in exclude]
    for _, p in named:
        p.requires_grad_(True)
        p.grad = None
    for x, y, _ in iterate_batches(data.train, indices, batch_size, device=device):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    scores = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).abs().flatten() for _, p in named])
    for _, p in named:
        p.grad = None
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    k = round(fraction * scores.numel())
    flat[torch.topk(scores, k).indices] = True
    masks, start = {}, 0
    for name, p in named:
        masks[name] = flat[start : start + p.numel()].view_as(p)
        start += p.numel()
    return masks


# ------------------------------------------------------------------ one loop, five methods


def random_wrong_labels(
    labels: torch.Tensor, num_classes: int, excluded: tuple[int, ...], gen: torch.Generator
) -> torch.Tensor:
    """A uniformly random label per sample, never its true one and never one of `excluded` (forgotten) classes."""
    allowed = torch.ones(len(labels), num_classes, dtype=torch.bool)
    if excluded:
        allowed[:, list(excluded)] = False
    allowed[torch.arange(len(labels)), labels.cpu()] = False
    if not bool(allowed.any(dim=1).all()):
        raise InvalidInputError("relabelling needs at least two classes outside the forgotten ones")
    return torch.multinomial(allowed.float(), 1, generator=gen).squeeze(1).to(labels.device)


@dataclass
class _Plan:
    indices: torch.Tensor
    loss: BatchLoss


def _plan(model: nn.Module, data: Dataset, split: ForgetSplit, config: BaselineConfig, epoch: list[int]) -> _Plan:
    """The table of the module docstring: which data each method iterates and which loss it minimises."""
    method = config.method
    if method in ("FT", "l1-sparse"):
        horizon = config.l1_decay_epochs or config.epochs
        alpha = config.l1_alpha if method == "l1-sparse" else 0.0
        trainable = [p for p in model.parameters() if p.requires_grad]

        def fine_tune(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            loss = F.cross_entropy(m(x), y)
            weight = alpha * (1.0 - epoch[0] / horizon)
            if weight > 0:
                loss = loss + weight * torch.cat([p.flatten() for p in trainable]).abs().sum()
            return loss

        return _Plan(split.retain, fine_tune)
    if method == "GA":

        def ascent(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return -F.cross_entropy(m(x), y)

        return _Plan(split.forget, ascent)
    # RL and SalUn: D_f with random wrong labels mixed into D_r, in natural proportion.
    is_forget = torch.zeros(len(data.train), dtype=torch.bool)
    is_forget[split.forget] = True
    gen = torch.Generator().manual_seed(config.seed + 7919)
    excluded = split.spec.classes

    def relabel(m: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        forget = is_forget[idx].to(y.device)
        if bool(forget.any()):
            y = y.clone()
            y[forget] = random_wrong_labels(y[forget], data.num_classes, excluded, gen)
        return F.cross_entropy(m(x), y)

    return _Plan(torch.cat([split.forget, split.retain]).sort().values, relabel)


EpochCallback = Callable[[int, nn.Module, float], None]


def unlearn_model(
    original: nn.Module,
    data: Dataset,
    split: ForgetSplit,
    config: BaselineConfig,
    *,
    device: str = "cpu",
    on_epoch: EpochCallback | None = None,
) -> UnlearnedModel:
    """Run one baseline from a copy of `original` (left untouched).

    `on_epoch(epoch, model, seconds_so_far)` is called after every epoch (its own time
    is not counted): the grid search uses it to read every epoch count from one run.
    """
    if len(split.forget) == 0 or len(split.retain) == 0:
        raise InvalidInputError("the forget and retain sets must both be non-empty")
    start = time.perf_counter()
    model = copy.deepcopy(original).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    frozen = _frozen_names(model, config.freeze)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    mask: dict[str, torch.Tensor] = {}
    if config.method == "SalUn":
        mask = saliency_mask(
            model, data, split.forget, config.saliency_fraction, exclude=frozen, batch_size=256, device=device
        )
    reference = {n: p.detach().clone() for n, p in model.named_parameters() if n in mask}

    def project() -> None:
        """Put every entry outside the saliency mask back to its original value after each step.

        SGD updates each entry from its own gradient and optimiser state, so this leaves
        the masked entries exactly where training only them would, and the rest bit-identical.
        """
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in mask:
                    p.copy_(torch.where(mask[name], p, reference[name]))

    epoch = [0]
    plan = _plan(model, data, split, config, epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    runner = _PartlyFrozen(model, _modules_under(model, config.freeze))
    torch.manual_seed(config.seed)
    seconds = time.perf_counter() - start
    for e in range(config.epochs):
        epoch[0] = e
        t0 = time.perf_counter()
        sgd_epochs(
            runner,
            data.train,
            plan.indices,
            epochs=1,
            batch_size=config.batch_size,
            optimizer=optimizer,
            scheduler=None,
            loss_fn=plan.loss,
            augmentation=None,
            seed=config.seed * 1009 + e,
            device=device,
            desc=f"{config.method} epoch {e + 1}/{config.epochs}",
            after_step=project if mask else None,
        )
        seconds += time.perf_counter() - t0
        if on_epoch is not None:
            on_epoch(e + 1, model, seconds)
    freeze(model)
    return UnlearnedModel(
        method=config.method,
        model=model,
        seconds=seconds,
        params_changed=count_changed(model, original),
        params_total=count_parameters(model),
        config=config.to_json(),
    )


def retrain(
    original: Classifier,
    data: Dataset,
    split: ForgetSplit,
    config: TrainConfig,
    *,
    augmentation: Augmentation | None,
    device: str = "cpu",
) -> UnlearnedModel:
    """The gold standard: the original's architecture trained from scratch on D_r with the original recipe."""
    torch.manual_seed(config.seed)
    model = Classifier(original.spec).to(device)
    history = train_classifier(
        model, data, split.retain, config, augmentation=augmentation, device=device, desc="retrain"
    )
    freeze(model)
    return UnlearnedModel(
        method="Retrain",
        model=model,
        seconds=history["seconds"],
        params_changed=count_changed(model, original),
        params_total=count_parameters(model),
        config=config.to_json(),
    )


# ------------------------------------------------------------------ choosing hyper-parameters


#: How the grid picks among settings, beyond the rule itself.
SELECTION_NOTE = (
    "; among settings meeting it the highest validation accuracy (then fewer epochs); if none meets it, "
    "the one missing it by the fewest points"
)


@dataclass
class GridPoint:
    lr: float
    epochs: int
    forget_acc: float
    holdout_acc: float
    distance: float
    seconds: float

    def to_json(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in asdict(self).items()}


@dataclass
class GridResult:
    best: UnlearnedModel  # the chosen setting's model (trained once, reused)
    chosen: BaselineConfig  # re-running it reproduces `best`
    points: list[GridPoint]
    seconds: float  # the whole search, checks included
    rule: StoppingRule

    def describe(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen.to_json(),
            "rule": self.rule.describe() + SELECTION_NOTE,
            "points": [p.to_json() for p in self.points],
            "search_seconds": round(self.seconds, 2),
        }


def monitor_indices(split: ForgetSplit, size: int, seed: int = 0) -> torch.Tensor:
    """A seeded subset of D_f on which selection rules read forget accuracy."""
    gen = torch.Generator().manual_seed(seed)
    return split.forget[torch.randperm(len(split.forget), generator=gen)[:size]].sort().values


def grid_search(
    original: nn.Module,
    data: Dataset,
    split: ForgetSplit,
    base: BaselineConfig,
    lrs: tuple[float, ...],
    max_epochs: int,
    rule: StoppingRule,
    *,
    device: str = "cpu",
    monitor_size: int = 2000,
) -> GridResult:
    """Try every learning rate for up to `max_epochs` epochs; judge every (lr, epochs) pair by `rule`.

    Forget accuracy is read on a seeded subset of D_f, hold-out accuracy on split.val
    (never the test set). The chosen pair's weights are kept, so it is not trained twice.
    """
    if not lrs:
        raise InvalidInputError(f"{base.method}: the learning-rate grid is empty")
    start = time.perf_counter()
    monitor = monitor_indices(split, monitor_size, base.seed)
    holdout0 = predict(original, data.train, split.val, device=device).accuracy
    horizon = max_epochs if base.method == "l1-sparse" else None
    points: list[GridPoint] = []
    best: dict[str, Any] = {}

    for lr in lrs:
        config = replace(base, lr=lr, epochs=max_epochs, l1_decay_epochs=horizon)

        def check(epochs: int, model: nn.Module, seconds: float, lr: float = lr) -> None:
            model.eval()
            forget_acc = predict(model, data.train, monitor, device=device).accuracy
            holdout_acc = predict(model, data.train, split.val, device=device).accuracy
            point = GridPoint(
                lr, epochs, forget_acc, holdout_acc, rule.distance(forget_acc, holdout_acc, holdout0), seconds
            )
            points.append(point)
            key = (point.distance, -point.holdout_acc, epochs)
            if not best or key < best["key"]:
                best.update(key=key, point=point, state=copy.deepcopy(model.state_dict()))

        result = unlearn_model(original, data, split, config, device=device, on_epoch=check)
        if best["point"].lr == lr:
            best["model"] = result.model
    point = best["point"]
    chosen = replace(base, lr=point.lr, epochs=point.epochs, l1_decay_epochs=horizon)
    model = best["model"]
    model.load_state_dict(best["state"])
    freeze(model)
    unlearned = UnlearnedModel(
        method=base.method,
        model=model,
        seconds=point.seconds,
        params_changed=count_changed(model, original),
        params_total=count_parameters(model),
        config=chosen.to_json(),
    )
    return GridResult(unlearned, chosen, points, time.perf_counter() - start, rule)
