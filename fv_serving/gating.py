"""Gated forget vectors: add delta only to inputs the frozen model assigns to a forgotten class.

The reviewers' main complaint about forget vectors is that a universal delta costs
retain and test accuracy (docs/method.md section 8): every input is perturbed, including
the many that have nothing to do with the forgotten class. The gated mode keeps the
learned delta but routes by the frozen model's own prediction:

    g(x) = f(x + delta)  if argmax f(x) is a forgotten class
    g(x) = f(x)          otherwise

so images the original already places in a retained class keep the original's
logits exactly, and only the (mostly forgotten-class) rest is perturbed.

What it gives up, plainly:
  * it is no longer input-agnostic: the perturbation depends on the input through
    f's prediction, so it is not 'one vector added to every input' and the fused
    ONNX graph is a different graph (two classifier passes and a select);
  * it costs a second forward pass of the classifier per input (here both passes
    always run, and a select picks per sample, so the result does not depend on
    batch composition and the graph stays export-friendly);
  * it is only meaningful for class-wise forgetting: for a random subset there is no
    forgotten class to gate on;
  * a forgotten-class image that f misclassifies into a retained class is left as
    it is (it was not recognised in the first place, so UA counts it as forgotten);
  * the gate itself is visible behaviour: an attacker who can query g and knows the
    scheme learns that the model still recognises the class (it chose to perturb).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fv_serving.errors import InvalidInputError
from fv_serving.perturbation import Clamp, apply_delta


class GatedPerturbedClassifier(nn.Module):
    """f(x + delta) where f predicts a forgotten class, f(x) elsewhere (per sample)."""

    delta: torch.Tensor
    forgotten: torch.Tensor

    def __init__(
        self, classifier: nn.Module, delta: torch.Tensor, forgotten: Sequence[int], clamp: Clamp = None
    ) -> None:
        super().__init__()
        if not forgotten:
            raise InvalidInputError("a gated forget vector needs the forgotten classes to gate on (class-wise only)")
        self.classifier = classifier
        self.register_buffer("delta", delta.detach().reshape(1, *delta.shape[-3:]).float())
        self.register_buffer("forgotten", torch.tensor(list(forgotten), dtype=torch.long))
        self.clamp = clamp

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """True for the samples whose plain prediction is a forgotten class."""
        return torch.isin(logits.argmax(dim=1), self.forgotten)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain = self.classifier(x)
        perturbed = self.classifier(apply_delta(x, self.delta, self.clamp))
        return torch.where(self.gate(plain).unsqueeze(1), perturbed, plain)
