"""Forget-vector arithmetic (docs/method.md section 5): new vectors as combinations of a class bank.

delta(w) = sum_k w_k delta_k. Zero-shot rules pick w without training (1 for each
chosen class: "sum"; 1/m each: "mean"); learned coefficients start from the
zero-shot sum and are trained by `unlearn.learn_perturbation` with `BankCombination`.
Every composition, wherever it is asked for (CLI, export, a live switch), is made
here (`compose` for one asked for by name), so a composed vector always carries the same metadata: the bank's classifier
fingerprint and clamp, and the coefficients that made it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fv_serving.errors import InvalidInputError
from fv_serving.vectors import ForgetVector, VectorBank

ZERO_SHOT_RULES = ("sum", "mean")


def class_ids(values: Sequence[str], class_names: Sequence[str]) -> list[int]:
    """Class ids from indices ("2") or names ("Pullover", case-insensitive), with a clear error."""
    lowered = [n.lower() for n in class_names]
    out = []
    for value in values:
        text = str(value).strip()
        if text.lstrip("-").isdigit():
            out.append(int(text))
        elif text.lower() in lowered:
            out.append(lowered.index(text.lower()))
        else:
            known = ", ".join(class_names) if class_names else "numbered only (no names recorded)"
            raise InvalidInputError(f"unknown class {value!r}; the classes are {known}")
    return out


def bank_class_names(bank: VectorBank) -> list[str]:
    return list(bank.notes.get("class_names") or [])


def zero_shot_weights(bank_classes: Sequence[int], chosen: Sequence[int], rule: str) -> np.ndarray:
    """Coefficients over the bank's classes: chosen classes get 1 ("sum") or 1/m ("mean"), others 0."""
    if rule not in ZERO_SHOT_RULES:
        raise InvalidInputError(f"unknown zero-shot rule {rule!r}; expected one of {ZERO_SHOT_RULES}")
    if not chosen:
        raise InvalidInputError("choose at least one class to compose")
    missing = [c for c in chosen if c not in bank_classes]
    if missing:
        raise InvalidInputError(f"class(es) {missing} are not in the bank (it holds {list(bank_classes)})")
    weights = np.zeros(len(bank_classes), np.float32)
    for c in chosen:
        weights[list(bank_classes).index(c)] = 1.0 if rule == "sum" else 1.0 / len(chosen)
    return weights


def combine(vectors: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_k w_k delta_k for a bank [K,C,H,W] and weights [K]."""
    if weights.shape != (vectors.shape[0],):
        raise InvalidInputError(f"need {vectors.shape[0]} coefficients, got {weights.shape[0]}")
    return np.tensordot(weights.astype(np.float32), vectors, axes=1).astype(np.float32)


def vector_from_bank(
    bank: VectorBank,
    weights: Sequence[float] | np.ndarray,
    mode: str,
    classes: Sequence[int] | None = None,
) -> ForgetVector:
    """The composed vector sum_k w_k delta_k, carrying the bank's fingerprint, clamp and the coefficients.

    `classes` (what the composition is meant to forget) makes the vector a class-wise
    task that `fv evaluate` can rebuild; plain coefficients leave it unspecified.
    """
    w = np.asarray(weights, dtype=np.float32).ravel()
    if not np.all(np.isfinite(w)):
        raise InvalidInputError(f"coefficients must be finite, got {list(w)}")
    composed = {"mode": mode, "bank_classes": bank.classes, "coefficients": [round(float(x), 6) for x in w]}
    forget: dict[str, object] = {"composed": composed}
    if classes is not None:
        forget = {"kind": "class", "classes": list(classes), **forget}
    return ForgetVector(
        classifier=bank.classifier, clamp=bank.clamp, delta=combine(bank.vectors, w), forget=forget, notes=bank.notes
    )


def zero_shot_vector(bank: VectorBank, classes: Sequence[int], rule: str) -> ForgetVector:
    """Sum or mean of the chosen classes' vectors: no training, no classifier needed."""
    return vector_from_bank(bank, zero_shot_weights(bank.classes, classes, rule), rule, classes)


def compose(
    bank: VectorBank,
    *,
    classes: Sequence[str] = (),
    mode: str = "sum",
    coefficients: Sequence[float] | None = None,
    class_names: Sequence[str] = (),
) -> ForgetVector:
    """The one entry for a composition asked for by name: zero-shot over `classes`, or explicit coefficients.

    Classes are indices or names (the bank's recorded names, else `class_names`).
    """
    if bool(classes) == (coefficients is not None):
        raise InvalidInputError("with a bank give either classes (zero-shot sum/mean) or coefficients")
    if coefficients is not None:
        return vector_from_bank(bank, coefficients, "coefficients")
    return zero_shot_vector(bank, class_ids(classes, bank_class_names(bank) or class_names), mode)
