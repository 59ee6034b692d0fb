"""g(x) = f(clamp(sanitize(x) + delta)): the one place that says how a forget vector meets an input.

Training, evaluation, the exported ONNX graphs and the Triton forget step all follow
this definition; the ONNX and Triton tests compare against it. It works on torch
tensors and numpy arrays alike, and does not import torch, so serving-side code that
only checks graphs stays free of torch.

`sanitize` is the stated handling of inputs outside the pixel range [0,1]: NaN
becomes 0 and everything is clipped to [0,1] BEFORE delta is added. A real image is
unchanged by it (so learning and evaluation are too), while a caller who knows delta
can no longer send x - delta to cancel it wherever that leaves the pixel range, and
a NaN or Inf pixel can no longer turn into NaN logits (which Triton answers as
invalid JSON). The vector's own clamp (after the addition) is a property of the vector.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from fv_serving.config import Clamp

ArrayT = TypeVar("ArrayT")

#: The pixel range every vector is learned in (raw pixels, before the model's normalisation).
PIXEL_RANGE = (0.0, 1.0)


def sanitize(x: ArrayT, pixel_range: Clamp = PIXEL_RANGE) -> ArrayT:
    """NaN -> the range's low end, then clip to the range (None: leave the input as it is)."""
    if pixel_range is None:
        return x
    low, high = pixel_range
    if isinstance(x, np.ndarray):
        return np.clip(np.nan_to_num(x, nan=low, posinf=high, neginf=low), low, high)  # type: ignore[return-value]
    tensor: Any = x  # a torch.Tensor (this module does not import torch)
    out: ArrayT = tensor.nan_to_num(nan=low, posinf=high, neginf=low).clamp(low, high)
    return out


def apply_delta(x: ArrayT, delta: Any, clamp: Clamp = None, pixel_range: Clamp = PIXEL_RANGE) -> ArrayT:
    """Add the perturbation in pixel space to the sanitised input; clamp only if the vector was learned with one."""
    out: Any = sanitize(x, pixel_range) + delta
    return out.clip(clamp[0], clamp[1]) if clamp is not None else out
