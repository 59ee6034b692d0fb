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

The rule that recognises the same classifier in another form (`check_outputs`):
  * compared: the outputs on the 4 probe images (seeded uniform noise in [0,1], fed
    through the graph's normalisation when it takes normalised input and mean/std
    are given), as log-probabilities: log_softmax of logits (so a per-row offset does
    not count), or the log of probabilities for a graph that ends in softmax (rows
    >= 0 summing to 1 within 1e-2), floored at the smallest normal number of their
    dtype (float16: 6.1e-5), below which a softmax in that dtype has no precision;
  * same model: every entry within FORM_ATOL = 0.1 (natural-log units) of the recorded
    log-probabilities; identical logits (within 1e-3, `logits_match`) are reported as such.
Measured (benchmarks/results/fingerprint_forms/: small CNNs trained on 4000
Fashion-MNIST images for 3 epochs): the float16, softmax and normalised-input exports
of one model stay within 5.5e-3, models of 3 other seeds and a ResNet-18 trained alike
are 3.3 or more away (raw logits differ by 2 to 4): the tolerance sits 18x above
the one and 33x below the other. A float16 graph ending in softmax keeps less
information (probabilities below 6.1e-5 are all equal to it), so for it the check is
weaker: it is still refused when the model differs where the probabilities are visible.
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
#: Outputs in [0,1] whose every row sums to 1 within this are probabilities (a graph that ends in softmax).
PROBABILITY_SUM_ATOL = 1e-2
#: Same model in another form: log-probabilities within this on every probe entry (see `form_distance`).
FORM_ATOL = 0.1


def logits_match(actual: np.ndarray, expected: np.ndarray) -> bool:
    """The one test of "these are the same model's answers" on probe images (fingerprints, switch checks)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return actual.shape == expected.shape and bool(np.allclose(actual, expected, rtol=PROBE_RTOL, atol=PROBE_ATOL))


def is_probabilities(outputs: np.ndarray) -> bool:
    """Rows of non-negative values summing to 1: the output of a softmax, not logits."""
    o = np.asarray(outputs, np.float64)
    return (
        o.ndim == 2
        and o.size > 0
        and bool(o.min() >= 0.0 and np.allclose(o.sum(axis=1), 1.0, atol=PROBABILITY_SUM_ATOL))
    )


def log_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, float]:
    """(log-probabilities [N,K], floor): what the form-tolerant comparison compares.

    Logits become log_softmax (float64), so a per-row offset does not count and the
    floor is -inf. Probabilities become their log, floored at the smallest normal
    number of their dtype (float16: 6.1e-5, float32: 1.2e-38): below it a probability
    has lost its precision, and a softmax in that dtype cannot tell such classes apart.
    """
    o = np.asarray(outputs)
    if is_probabilities(o):
        tiny = float(np.finfo(o.dtype if np.issubdtype(o.dtype, np.floating) else np.float32).tiny)
        return np.log(np.maximum(o.astype(np.float64), tiny)), float(np.log(tiny))
    z = o.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(axis=1, keepdims=True)), float("-inf")


def form_distance(actual: np.ndarray, expected_logits: np.ndarray) -> float:
    """Largest |difference| of log-probabilities, both floored at the checked output's floor (`log_probabilities`)."""
    got, floor = log_probabilities(actual)
    want, _ = log_probabilities(expected_logits)
    return float(np.max(np.abs(np.maximum(got, floor) - np.maximum(want, floor)))) if got.size else 0.0


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

    def check_outputs(self, run_logits: Callable[[np.ndarray], np.ndarray], what: str) -> str:
        """Refuse any implementation that is not this classifier; say in which form it was recognised.

        `run_logits` maps raw-pixel images [N,C,H,W] to the model's outputs [N,K] (an
        ONNX session, a Triton client...). Recognised: the same logits (`logits_match`),
        or the same model in another form (float16, a final softmax, an offset on the
        logits): log-probabilities within FORM_ATOL (`form_distance`, module docstring).
        """
        actual = np.asarray(run_logits(probe_batch(self.input_shape)))
        if actual.shape != self.probe_logits.shape:
            raise ModelMismatchError(
                f"{what} was made for a classifier with output shape {list(self.probe_logits.shape[1:])}, "
                f"but this one returns {list(actual.shape[1:])}"
            )
        if logits_match(actual.astype(np.float32), self.probe_logits):
            return "the same logits on the probe images"
        distance = form_distance(actual, self.probe_logits)
        form = "probabilities" if is_probabilities(actual) else "logits"
        if distance <= FORM_ATOL:
            return f"the same model as {form} in {actual.dtype} (log-probabilities within {distance:.2g})"
        raise ModelMismatchError(
            f"{what} was made for classifier {self.short_id}, but this classifier's outputs ({form}, {actual.dtype}) "
            f"on the probe images differ: log-probabilities by up to {distance:.3g} (tolerance {FORM_ATOL}): "
            "a different model"
        )
