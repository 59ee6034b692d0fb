"""Output masking: the trivial class-wise 'unlearning' reference, with no learning at all.

The forgotten classes' logits are set to -inf, so they can never be predicted and
their softmax probability is exactly 0. It is the floor any class-wise method must
beat to be worth its cost: it leaves every other prediction of the original model
as it was (a retained image the original called a forgotten class now gets its
runner-up class instead), costs nothing to build and one comparison at inference.
What it does not do: it forgets nothing inside the model (features and logits of the
other classes are untouched, and anyone calling the bare classifier sees the class),
and it means nothing for random-subset forgetting, where no class is removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fv_serving.errors import InvalidInputError


class OutputMaskedClassifier(nn.Module):
    """f(x) with the logits of `forgotten` classes replaced by -inf."""

    mask: torch.Tensor

    def __init__(self, classifier: nn.Module, forgotten: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if not forgotten:
            raise InvalidInputError("output masking needs at least one forgotten class")
        bad = [c for c in forgotten if not 0 <= c < num_classes]
        if bad or len(set(forgotten)) >= num_classes:
            raise InvalidInputError(f"cannot mask classes {list(forgotten)} of a {num_classes}-class model")
        self.classifier = classifier
        mask = torch.zeros(1, num_classes, dtype=torch.bool)
        mask[0, list(forgotten)] = True
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x).masked_fill(self.mask, float("-inf"))
