"""Which vectors may be served: the checks every serving entry (fuse, forget step, build, switch) applies.

A vector file can be valid and still be wrong to serve:
  * values far outside the pixel range: delta is added to pixels in [0,1], so an entry
    of 1e30 (or 3e38, which overflowed to all-NaN logits in a served graph) is no image
    perturbation but a corrupted or hostile file. Refused beyond `max_abs`, a stated
    multiple of the pixel range, unless the operator raises the bound;
  * a vector that changes nothing (all zeros, or a composition whose terms cancel):
    serving it would let an operator believe something is forgotten while the model
    answers as before. Refused unless asked for explicitly; `--off` is the way to serve
    no forgetting, and it says so;
  * a vector whose stopping rule was not met (for a random subset often the zero
    vector): served if the operator wants it, but every entry says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fv_serving.errors import InvalidInputError
from fv_serving.vectors import ForgetVector, require_finite

#: Pixels live in [0,1]; a perturbation entry beyond 4 pixel ranges moves the input far outside
#: anything the classifier was trained on. Learned vectors stay well inside (tests: |delta| < 1).
DEFAULT_MAX_ABS = 4.0
#: Below this everywhere a vector is numerically zero (a float32 composition that cancels leaves ~1e-8).
NOOP_ABS = 1e-6


@dataclass(frozen=True)
class AdmissionPolicy:
    """What the operator allows beyond the defaults (CLI: --max-abs, --allow-noop)."""

    max_abs: float = DEFAULT_MAX_ABS
    allow_noop: bool = False

    def __post_init__(self) -> None:
        if not self.max_abs > 0:
            raise InvalidInputError(f"max_abs must be positive (math.inf to disable the bound), got {self.max_abs}")


def admit(vector: ForgetVector, policy: AdmissionPolicy | None = None) -> list[str]:
    """Refuse (InvalidInputError) what must not be served; return warnings for what may, with a caveat."""
    policy = policy or AdmissionPolicy()
    require_finite(vector.delta, f"forget vector {vector.vector_id}")  # a NaN would slip past the comparisons below
    largest = float(np.max(np.abs(vector.delta))) if vector.delta.size else 0.0
    if largest > policy.max_abs:
        raise InvalidInputError(
            f"forget vector {vector.vector_id} has entries up to {largest:.3g} in absolute value, beyond the bound "
            f"{policy.max_abs:g} (pixels are in [0,1]); a corrupted or hostile file? Raise the bound with --max-abs "
            "if this is intended"
        )
    warnings = []
    if largest <= NOOP_ABS:
        message = f"forget vector {vector.vector_id} changes nothing (max |delta| = {largest:.1e})"
        if not policy.allow_noop:
            raise InvalidInputError(
                f"{message}: serving it would forget nothing; use --off to serve no forgetting, or --allow-noop"
            )
        warnings.append(f"{message}; served because --allow-noop was given")
    missed = missed_rule(vector)
    if missed:
        warnings.append(f"forget vector {vector.vector_id} did NOT meet its stopping rule: {missed}")
    return warnings


def missed_rule(vector: ForgetVector) -> str | None:
    """A one-line account of the vector's unmet stopping rule, or None when it was met or is not recorded."""
    stopping: Any = vector.metrics.get("stopping")
    if not isinstance(stopping, dict) or stopping.get("rule_met", True):
        return None
    forget, holdout, original = (stopping.get(k) for k in ("forget_acc_monitor", "holdout_acc", "holdout_acc_original"))
    parts = [f"chosen at epoch {stopping.get('chosen_epoch')}"]
    if isinstance(forget, (int, float)) and not math.isnan(forget):
        parts.append(f"forget-set accuracy {forget:.1f}%")
    if isinstance(holdout, (int, float)) and isinstance(original, (int, float)):
        parts.append(f"hold-out accuracy {holdout:.1f}% (original {original:.1f}%)")
    return ", ".join(parts)
