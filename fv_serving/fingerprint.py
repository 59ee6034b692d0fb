"""Which classifier a vector was made for.

A forget vector is only meaningful for the exact classifier it was learned against.
Two complementary fingerprints are kept with every vector:

* `weights_sha256`: a digest of the PyTorch weights. Exact, but only checkable where
  the PyTorch checkpoint is at hand.
* probe logits: the classifier's outputs on a fixed, seeded batch of random images.
  Checkable against ANY implementation of the classifier (an ONNX graph exported by
  us or by someone else, a graph that takes normalised input, a model inside Triton),
  because equivalent graphs give the same logits up to float noise, while a
  different classifier gives visibly different ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fv_serving.errors import ModelMismatchError

if TYPE_CHECKING:  # torch is imported only where a PyTorch model is fingerprinted, not to check graphs
    from torch import nn

PROBE_SEED = 2412_16780
PROBE_COUNT = 4
# Logits of equivalent graphs (PyTorch vs ONNX Runtime, CPU vs CUDA, a server's batch vs a local
# run) agree to ~1e-5; another classifier, or the same one behind another vector, differs by whole
# units. The tolerance sits far from both.
PROBE_RTOL = 1e-3
PROBE_ATOL = 1e-3


def logits_match(actual: np.ndarray, expected: np.ndarray) -> bool:
    """The one test of "these are the same model's answers" on probe images (fingerprints, switch checks)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return actual.shape == expected.shape and bool(np.allclose(actual, expected, rtol=PROBE_RTOL, atol=PROBE_ATOL))


def weights_digest(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def probe_batch(input_shape: tuple[int, ...], seed: int = PROBE_SEED, count: int = PROBE_COUNT) -> np.ndarray:
    """Seeded random images in [0,1], shape [count, *input_shape], float32, identical on every machine."""
    rng = np.random.RandomState(seed)
    return rng.uniform(0.0, 1.0, size=(count, *input_shape)).astype(np.float32)


def torch_probe_logits(model: nn.Module, input_shape: tuple[int, ...]) -> np.ndarray:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        x = torch.from_numpy(probe_batch(input_shape)).to(device)
        return model(x).float().cpu().numpy()


@dataclass(frozen=True)
class ClassifierFingerprint:
    weights_sha256: str
    input_shape: tuple[int, int, int]
    num_classes: int
    probe_logits: np.ndarray  # [PROBE_COUNT, num_classes], raw pixels in, logits out

    @classmethod
    def of(cls, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int) -> ClassifierFingerprint:
        return cls(
            weights_sha256=weights_digest(model),
            input_shape=input_shape,
            num_classes=num_classes,
            probe_logits=torch_probe_logits(model, input_shape),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON part; probe logits travel as a tensor next to it."""
        return {
            "weights_sha256": self.weights_sha256,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "probe_seed": PROBE_SEED,
            "probe_count": PROBE_COUNT,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], probe_logits: np.ndarray) -> ClassifierFingerprint:
        shape = tuple(int(s) for s in obj["input_shape"])
        if len(shape) != 3:
            raise ValueError(f"input_shape must be [C,H,W], got {shape}")
        return cls(
            weights_sha256=str(obj["weights_sha256"]),
            input_shape=(shape[0], shape[1], shape[2]),
            num_classes=int(obj["num_classes"]),
            probe_logits=probe_logits,
        )

    @property
    def short_id(self) -> str:
        return self.weights_sha256[:12]

    def check_weights(self, model: nn.Module, what: str) -> None:
        """Refuse a PyTorch classifier whose weights differ from the fingerprinted one."""
        actual = weights_digest(model)
        if actual != self.weights_sha256:
            raise ModelMismatchError(
                f"{what} was made for classifier {self.weights_sha256[:12]}, "
                f"but the given classifier is {actual[:12]} (different weights)"
            )

    def check_outputs(self, run_logits: Callable[[np.ndarray], np.ndarray], what: str) -> None:
        """Refuse any implementation whose logits on the probe batch differ from the fingerprint.

        `run_logits` maps raw-pixel images [N,C,H,W] to logits [N,K] (an ONNX session,
        a Triton client...).
        """
        actual = np.asarray(run_logits(probe_batch(self.input_shape)), dtype=np.float32)
        if actual.shape != self.probe_logits.shape:
            raise ModelMismatchError(
                f"{what} was made for a classifier with output shape {list(self.probe_logits.shape[1:])}, "
                f"but this one returns {list(actual.shape[1:])}"
            )
        if not logits_match(actual, self.probe_logits):
            worst = float(np.max(np.abs(actual - self.probe_logits)))
            raise ModelMismatchError(
                f"{what} was made for classifier {self.short_id}, but this classifier's outputs on the "
                f"probe images differ by up to {worst:.3g} (tolerance {PROBE_ATOL}): a different model"
            )
