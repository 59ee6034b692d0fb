"""Unlearning metrics as the field reports them: UA, RA, TA, MIA-Efficacy, Avg. Gap.

Every metric takes the *unlearned model* as a plain nn.Module, so a forget vector
(`PerturbedClassifier`), a model-based baseline and the original model are measured
by the same code. Confidence-based MIA is calibrated on the unlearned model's own
outputs (for a vector: on perturbed inputs), per docs/method.md section 4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from sklearn.svm import SVC
from torch import nn

from fv_serving.config import METRIC_NAMES
from fv_serving.data import Dataset, ForgetSplit, ImageSet, iterate_batches


@dataclass
class Predictions:
    labels: np.ndarray  # predicted class per sample
    true_confidence: np.ndarray  # softmax probability of the true label
    targets: np.ndarray  # true labels

    @property
    def accuracy(self) -> float:
        """Accuracy in percent (0 for an empty set)."""
        return float(100.0 * np.mean(self.labels == self.targets)) if len(self.targets) else 0.0


@torch.no_grad()
def predict(
    model: nn.Module, images: ImageSet, indices: torch.Tensor, batch_size: int = 1000, device: str = "cpu"
) -> Predictions:
    labels, conf, targets = [], [], []
    for x, y, _ in iterate_batches(images, indices, batch_size, device=device):
        probs = torch.softmax(model(x).float(), dim=1)
        labels.append(probs.argmax(1).cpu())
        conf.append(probs.gather(1, y.view(-1, 1)).squeeze(1).cpu())
        targets.append(y.cpu())
    if not labels:
        empty = np.zeros(0)
        return Predictions(empty.astype(np.int64), empty, empty.astype(np.int64))
    return Predictions(torch.cat(labels).numpy(), torch.cat(conf).numpy(), torch.cat(targets).numpy())


def mia_efficacy(member_conf: np.ndarray, nonmember_conf: np.ndarray, forget_conf: np.ndarray, seed: int = 0) -> float:
    """Percent of forget samples a confidence-based membership attack calls non-members.

    Shadow members (retain) and non-members (test pool) are subsampled to the same
    size n = min of the two, seeded; the attack is sklearn SVC(C=3, gamma="auto", rbf)
    on the true-label confidence, as in the unlearning literature.
    """
    rng = np.random.RandomState(seed)
    n = min(len(member_conf), len(nonmember_conf))
    if n == 0 or len(forget_conf) == 0:
        raise ValueError("MIA needs non-empty member, non-member and forget sets")
    members = rng.choice(member_conf, n, replace=False)
    nonmembers = rng.choice(nonmember_conf, n, replace=False)
    features = np.concatenate([members, nonmembers]).reshape(-1, 1)
    target = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(features, target)
    predicted = attack.predict(np.asarray(forget_conf).reshape(-1, 1))
    return float(100.0 * np.mean(predicted == 0))


@dataclass
class UnlearningMetrics:
    """All in percent. UA = 100 - acc(D_f); RA = acc(D_r); TA = acc(test pool); MIA-Efficacy."""

    UA: float
    RA: float
    TA: float
    MIA: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> UnlearningMetrics:
        """The four metrics of a result row (which may hold other columns too)."""
        return cls(**{k: float(row[k]) for k in METRIC_NAMES})

    def avg_gap(self, reference: UnlearningMetrics) -> float:
        """Mean absolute difference to a reference (Retrain) over UA, RA, TA, MIA."""
        return float(np.mean([abs(getattr(self, k) - getattr(reference, k)) for k in METRIC_NAMES]))


def evaluate_unlearning(
    model: nn.Module,
    data: Dataset,
    split: ForgetSplit,
    *,
    seed: int = 0,
    device: str = "cpu",
    max_retain: int | None = None,
) -> tuple[UnlearningMetrics, dict[str, Any]]:
    """UA/RA/TA/MIA of an unlearned model; `max_retain` subsamples D_r (seeded) for quick runs.

    Returns the metrics and details (set sizes, forgotten-class test accuracy).
    """
    retain = split.retain
    if max_retain is not None and len(retain) > max_retain:
        keep = torch.randperm(len(retain), generator=torch.Generator().manual_seed(seed))[:max_retain]
        retain = retain[keep.sort().values]
    forget = predict(model, data.train, split.forget, device=device)
    kept = predict(model, data.train, retain, device=device)
    test = predict(model, data.test, split.test, device=device)
    mia = mia_efficacy(kept.true_confidence, test.true_confidence, forget.true_confidence, seed=seed)
    metrics = UnlearningMetrics(UA=100.0 - forget.accuracy, RA=kept.accuracy, TA=test.accuracy, MIA=mia)
    details: dict[str, Any] = {
        "forget_size": len(split.forget),
        "retain_size_evaluated": len(retain),
        "test_size": len(split.test),
    }
    if len(split.test_forget):
        details["forgotten_classes_test_accuracy"] = predict(
            model, data.test, split.test_forget, device=device
        ).accuracy
    return metrics, details


def per_class_accuracy(model: nn.Module, images: ImageSet, num_classes: int, device: str = "cpu") -> list[float]:
    """Accuracy (percent) on each class of `images`, in class order (NaN for a class with no images)."""
    preds = predict(model, images, torch.arange(len(images)), device=device)
    return [
        float(100.0 * np.mean(preds.labels[preds.targets == c] == c)) if np.any(preds.targets == c) else float("nan")
        for c in range(num_classes)
    ]
