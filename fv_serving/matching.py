"""Random-subset forgetting's forget term: make the forget set look like data the model never saw.

For a random forget set the goal is indistinguishability, not error (docs/method.md
sec. 6): a model retrained without D_f classifies it about as well as unseen data, and a
membership attack cannot tell the two apart. The authors' margin term pushes D_f to
misclassification instead, and the stopping rule ("match") then keeps the zero vector.
A distribution match replaces it:

  alpha * sum_retain CE(z, y) / B + beta * W1(s(batch's D_f), s(as many images of H_A)),

s the per-image true-class softmax confidence ("confidence": what the membership attack
reads) or cross-entropy ("loss") of the perturbed model; W1 between two samples of equal
size is the mean absolute difference of their sorted values (1-D Wasserstein distance).
The reference scores are detached: unseen data is the target, not something to move.

H_A is one half of the validation hold-out; the stopping rule judges on the other half
H_B only, so the rule never scores the vector on the images it was pulled towards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fv_serving.config import Clamp
from fv_serving.data import ImageSet, iterate_batches
from fv_serving.errors import InvalidInputError
from fv_serving.perturbation import apply_delta

SCORES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "confidence": lambda logits, labels: torch.softmax(logits, dim=1).gather(1, labels.view(-1, 1)).squeeze(1),
    "loss": lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"),
}


def holdout_halves(val: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hold-out cut in two, seeded: (H_A, the objective's reference; H_B, the stopping rule's)."""
    order = torch.randperm(len(val), generator=torch.Generator().manual_seed(seed))
    half = len(val) // 2
    return val[order[:half]].sort().values, val[order[half:]].sort().values


def check_objective(objective: str, task_kind: str, *, world: int = 1, augment: bool = False) -> None:
    """Refuse a matching forget term where it does not apply, before any work starts.

    Only random subsets have a distribution to match. A distance between two sorted
    samples is not a sum over images, so data-parallel ranks' slices would not add up;
    and the reference images are scored as they are, so augmented forget batches would
    be compared with a target they cannot reach.
    """
    if objective not in SCORES:
        return
    if task_kind != "random":
        raise InvalidInputError(
            f"the {objective!r} objective is for random-subset vectors (--forget-percent); "
            "class vectors, banks and bank combinations use 'margin'"
        )
    if world > 1:
        raise InvalidInputError(
            f"the {objective!r} objective of random-subset vectors learns in one process only "
            "(its distribution distance is not a per-image sum); drop --nproc"
        )
    if augment:
        raise InvalidInputError(
            f"the {objective!r} objective compares against unaugmented hold-out images; drop --augment"
        )


class DistributionMatching:
    """The data term above, an `unlearn.Objective`; draws its reference images with its own seeded generator."""

    def __init__(
        self,
        score: str,
        classifier: nn.Module,
        perturbation: Callable[[], torch.Tensor],
        images: ImageSet,
        reference: torch.Tensor,
        *,
        alpha: float,
        beta: float,
        clamp: Clamp,
        seed: int,
        device: str = "cpu",
    ) -> None:
        if score not in SCORES:
            raise InvalidInputError(f"distribution matching scores are {tuple(SCORES)}, got {score!r}")
        if len(reference) == 0:
            raise InvalidInputError(
                "distribution matching needs at least 2 validation hold-out images, one half as its reference "
                "(train the classifier with a larger `fv train --val-size`)"
            )
        self.score_of, self.classifier, self.perturbation = SCORES[score], classifier, perturbation
        self.images, self.reference, self.device = images, reference, device
        self.alpha, self.beta, self.clamp = alpha, beta, clamp
        self.generator = torch.Generator().manual_seed(seed + 1)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, is_forget: torch.Tensor, *, batch_size: int
    ) -> torch.Tensor:
        retain = F.cross_entropy(logits[~is_forget], labels[~is_forget], reduction="sum") / batch_size
        n = int(is_forget.sum())
        if n == 0:
            return self.alpha * retain
        drawn = self.reference[torch.randint(len(self.reference), (n,), generator=self.generator)]
        x, y, _ = next(iterate_batches(self.images, drawn, n, device=self.device))
        with torch.no_grad():  # the target: unseen data under the current delta
            target = self.score_of(self.classifier(apply_delta(x, self.perturbation(), self.clamp)), y).sort().values
        mine = self.score_of(logits[is_forget], labels[is_forget]).sort().values
        return self.alpha * retain + self.beta * (mine - target).abs().mean()
