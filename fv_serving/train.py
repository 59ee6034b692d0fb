"""Training a classifier: the original model, and the Retrain reference (trained on D_r only).

One short SGD loop (one-cycle learning rate, momentum, weight decay) that reads top
to bottom; model-based unlearning baselines reuse `sgd_epochs` with their own losses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fv_serving.config import TrainConfig
from fv_serving.data import Augmentation, Dataset, ImageSet, iterate_batches, num_batches

BatchLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def sgd_epochs(
    model: nn.Module,
    images: ImageSet,
    indices: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    loss_fn: BatchLoss = cross_entropy_loss,
    augmentation: Augmentation | None = None,
    seed: int = 0,
    device: str = "cpu",
    desc: str = "train",
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """Shuffled epochs over `indices`; the scheduler steps per batch. Returns the mean loss per epoch."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses: list[float] = []
    steps = num_batches(len(indices), batch_size)
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(
            iterate_batches(
                images,
                indices,
                batch_size,
                shuffle=True,
                generator=generator,
                augmentation=augmentation,
                device=device,
            ),
            total=steps,
            desc=f"{desc} {epoch + 1}/{epochs}",
            leave=False,
            mininterval=1.0,
        )
        for x, y, idx in bar:
            loss = loss_fn(model, x, y, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            if scheduler is not None:
                scheduler.step()
            total += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / max(count, 1))
    model.eval()
    return losses


def train_classifier(
    model: nn.Module,
    data: Dataset,
    indices: torch.Tensor,
    config: TrainConfig,
    *,
    augmentation: Augmentation | None,
    device: str = "cpu",
    desc: str = "train",
) -> dict[str, Any]:
    """Train from the given initial weights on `indices` of the training set; returns a history."""
    torch.manual_seed(config.seed)
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        nesterov=True,
    )
    steps = num_batches(len(indices), config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps)
    start = time.perf_counter()
    losses = sgd_epochs(
        model,
        data.train,
        indices,
        epochs=config.epochs,
        batch_size=config.batch_size,
        optimizer=optimizer,
        scheduler=scheduler,
        augmentation=augmentation if config.augment else None,
        seed=config.seed,
        device=device,
        desc=desc,
    )
    return {"epoch_losses": losses, "seconds": time.perf_counter() - start}
