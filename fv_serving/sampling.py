"""Where the batches of a learning run come from: passes over D_f + D_r, or draws with a set forget share.

The authors shuffle the union of D_f and D_r once per epoch, so a batch holds forget
and retain samples in their natural proportion and an epoch sees every retain image.
A forget vector has only C*H*W parameters: it does not need every retain image, it
needs enough steps with forget samples in them. `steps_per_epoch` switches to drawing
each batch at random (with replacement), from the union or with `forget_fraction` of
it from D_f; an "epoch" is then that many steps, for the learning-rate decay and the
checks.

Drawn batches may also take `at_risk_share` of each batch from the *at-risk* retain
images: those the classifier gets right by the smallest logit margins (the lowest
AT_RISK_QUANTILE in a random pool of AT_RISK_POOL D_r images, scored once before the
first step by `unlearn.at_risk_images`). A perturbation flips those first, and they are
why accuracy on D_r drops more than on the hold-out; showing them more often repairs
them sooner (`benchmarks/retain_tradeoff.py`, `benchmarks/learning_speed.py`).

Every batch is drawn whole, from the run's one generator, whatever the number of
processes: a data-parallel rank takes its slice of the same global batch, so N
processes see exactly the samples (and augmentations) one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fv_serving.config import VectorConfig
from fv_serving.data import Augmentation, Dataset, ForgetSplit, iterate_batches, num_batches
from fv_serving.errors import InvalidInputError

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pixels, labels, data-set indices
AT_RISK_POOL = 10_000  # D_r images scored for the at-risk set
AT_RISK_QUANTILE = 0.2  # the share of the pool's right answers, by smallest margin, called at risk


class BatchPlan:
    """The batches of one run, epoch by epoch."""

    def __init__(
        self,
        data: Dataset,
        split: ForgetSplit,
        config: VectorConfig,
        generator: torch.Generator,
        augmentation: Augmentation | None,
        device: str,
        at_risk: torch.Tensor | None = None,
    ) -> None:
        if (at_risk is None) != (config.at_risk_share is None) or (at_risk is not None and not len(at_risk)):
            raise InvalidInputError("at_risk_share needs a non-empty at-risk set, and an at-risk set needs the share")
        self.data, self.config, self.generator = data, config, generator
        self.at_risk = at_risk
        self.augmentation, self.device = augmentation, device
        self.forget, self.retain = split.forget, split.retain
        self.union = torch.cat([split.forget, split.retain]).sort().values
        self.steps = config.steps_per_epoch or num_batches(len(self.union), config.batch_size)

    def epoch(self) -> Iterator[Batch]:
        if self.config.steps_per_epoch is None:
            yield from self._batches(self.union, shuffle=True)
            return
        for _ in range(self.steps):
            yield from self._batches(self._draw(), shuffle=False)

    def _draw(self) -> torch.Tensor:
        """One batch's indices: the at-risk share if any, then a set share from D_f (at least one sample of
        each set) or the union."""
        size, fraction = self.config.batch_size, self.config.forget_fraction
        drawn = []
        if self.at_risk is not None:
            n_risky = min(max(1, round(size * (self.config.at_risk_share or 0))), size - 2)
            drawn.append(self._pick(self.at_risk, n_risky))
            size -= n_risky
        if fraction is None:
            drawn.append(self._pick(self.union, size))
        else:
            n_forget = min(max(1, round(self.config.batch_size * fraction)), size - 1)
            drawn += [self._pick(self.forget, n_forget), self._pick(self.retain, size - n_forget)]
        return torch.cat(drawn)

    def _pick(self, indices: torch.Tensor, n: int) -> torch.Tensor:
        return indices[torch.randint(len(indices), (n,), generator=self.generator)]

    def _batches(self, indices: torch.Tensor, *, shuffle: bool) -> Iterator[Batch]:
        return iterate_batches(
            self.data.train,
            indices,
            self.config.batch_size,
            shuffle=shuffle,
            generator=self.generator,
            augmentation=self.augmentation,
            device=self.device,
        )
