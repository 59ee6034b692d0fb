"""Forget-vector arithmetic (method.md section 5): new vectors as combinations of a class bank.

delta(w) = sum_k w_k delta_k. Zero-shot rules pick w without training (1 for each
chosen class: "sum"; 1/m each: "mean"); learned coefficients start from the
zero-shot sum and are trained by `unlearn.learn_perturbation` with `BankCombination`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fv_serving.errors import InvalidInputError

ZERO_SHOT_RULES = ("sum", "mean")


def zero_shot_weights(bank_classes: Sequence[int], chosen: Sequence[int], rule: str) -> torch.Tensor:
    """Coefficients over the bank's classes: chosen classes get 1 ("sum") or 1/m ("mean"), others 0."""
    if rule not in ZERO_SHOT_RULES:
        raise InvalidInputError(f"unknown zero-shot rule {rule!r}; expected one of {ZERO_SHOT_RULES}")
    if not chosen:
        raise InvalidInputError("choose at least one class to compose")
    missing = [c for c in chosen if c not in bank_classes]
    if missing:
        raise InvalidInputError(f"class(es) {missing} are not in the bank (it holds {list(bank_classes)})")
    weights = torch.zeros(len(bank_classes))
    for c in chosen:
        weights[list(bank_classes).index(c)] = 1.0 if rule == "sum" else 1.0 / len(chosen)
    return weights


def combine(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k delta_k for a bank [K,C,H,W] and weights [K]."""
    if weights.shape != (vectors.shape[0],):
        raise InvalidInputError(f"need {vectors.shape[0]} coefficients, got {weights.shape[0]}")
    return np.tensordot(weights.astype(np.float32), vectors, axes=1).astype(np.float32)
