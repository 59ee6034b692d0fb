"""g(x) = f(clamp(x + delta)): the one place that says how a forget vector meets an input.

Training, evaluation, the exported ONNX graphs and the Triton forget step all follow
this definition; the ONNX and Triton tests compare against it. It works on torch
tensors and numpy arrays alike, and imports neither, so serving-side code that
only checks graphs stays free of torch.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fv_serving.config import Clamp

ArrayT = TypeVar("ArrayT")


def apply_delta(x: ArrayT, delta: Any, clamp: Clamp = None) -> ArrayT:
    """Add the perturbation in pixel space; clamp only if the vector was learned with a clamp."""
    start: Any = x  # torch.Tensor or np.ndarray: both add and clip
    out = start + delta
    return out.clip(clamp[0], clamp[1]) if clamp is not None else out
