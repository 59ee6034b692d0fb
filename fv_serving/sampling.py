"""Where the batches of a learning run come from: passes over D_f + D_r, or draws with a set forget share.

The authors shuffle the union of D_f and D_r once per epoch, so a batch holds forget
and retain samples in their natural proportion and an epoch sees every retain image.
A forget vector has only C*H*W parameters: it does not need every retain image, it
needs enough steps with forget samples in them. `steps_per_epoch` switches to drawing
each batch at random (with replacement), from the union or with `forget_fraction` of
it from D_f; an "epoch" is then that many steps, for the learning-rate decay and the
checks.

Every batch is drawn whole, from the run's one generator, whatever the number of
processes: a data-parallel rank takes its slice of the same global batch, so N
processes see exactly the samples (and augmentations) one process would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fv_serving.config import VectorConfig
from fv_serving.data import Augmentation, Dataset, ForgetSplit, iterate_batches, num_batches

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # pixels, labels, data-set indices


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
    ) -> None:
        self.data, self.config, self.generator = data, config, generator
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
        """One batch's indices: a set share from D_f (at least one sample of each set), or from the union."""
        size, fraction = self.config.batch_size, self.config.forget_fraction
        if fraction is None:
            return self.union[torch.randint(len(self.union), (size,), generator=self.generator)]
        n_forget = min(max(1, round(size * fraction)), size - 1)
        forget = self.forget[torch.randint(len(self.forget), (n_forget,), generator=self.generator)]
        retain = self.retain[torch.randint(len(self.retain), (size - n_forget,), generator=self.generator)]
        return torch.cat([forget, retain])

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
