"""g(x) = f(clamp(x + delta)): the one place that says how a forget vector meets an input.

Training, evaluation, the exported ONNX graphs and the Triton forget step all follow
this definition; the ONNX and Triton tests compare against it.
"""

from __future__ import annotations

import torch
from torch import nn

Clamp = tuple[float, float] | None


def apply_delta(x: torch.Tensor, delta: torch.Tensor, clamp: Clamp = None) -> torch.Tensor:
    """Add the perturbation in pixel space; clamp only if the vector was learned with a clamp."""
    out = x + delta
    return out.clamp(clamp[0], clamp[1]) if clamp is not None else out


class PerturbedClassifier(nn.Module):
    """A frozen classifier behind a fixed forget vector: the unlearned model g."""

    delta: torch.Tensor

    def __init__(self, classifier: nn.Module, delta: torch.Tensor, clamp: Clamp = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("delta", delta.detach().reshape(1, *delta.shape[-3:]).float())
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(apply_delta(x, self.delta, self.clamp))
