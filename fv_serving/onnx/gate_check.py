"""The gated mode's reference semantics in numpy, and the parity check of gated graphs in onnxruntime.

`gated_reference` is `fv_serving.gating.GatedPerturbedClassifier` written for any
function from images to logits (an onnxruntime session of the UNFUSED classifier, a
Triton client...), torch-free, so that every gated graph the serving side builds is
checked against the definition rather than against another graph:

    z0 = f(sanitize(x));  gate = argmax(z0) in classes;  z = z0, with f(clamp(sanitize(x) + delta)) on gated rows

For images inside the pixel range (every real image) sanitize is the identity and
this is exactly the PyTorch gated mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx

from fv_serving.fingerprint import probe_batch
from fv_serving.onnx.graph import find_image_input
from fv_serving.onnx.runtime import NormalizedInput, make_session, perturb, pixel_logits_fn, require_close
from fv_serving.perturbation import sanitize
from fv_serving.vectors import ForgetVector

#: Grey levels added to the probe images in the built-in parity check: flat images are often
#: predicted as other classes than noise, so both sides of the gate tend to be exercised.
PARITY_GREYS = (0.0, 0.25, 0.5, 0.75, 1.0)


def gate_mask(scores: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """True for the rows whose prediction (first maximum, as torch and ONNX ArgMax) is one of `classes`."""
    return np.isin(np.argmax(np.asarray(scores, np.float32), axis=1), np.asarray(list(classes)))


def gated_reference(
    run: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, vector: ForgetVector, classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """(outputs, gate) of the gated mode on raw-pixel `pixels`, with `run` the unperturbed classifier."""
    x = np.asarray(pixels, np.float32)
    plain = np.array(run(sanitize(x)))
    gate = gate_mask(plain, classes)
    if gate.any():
        plain[gate] = run(perturb(x[gate], vector.delta, vector.clamp))
    return plain, gate


def parity_images(chw: tuple[int, int, int]) -> np.ndarray:
    """The probe images and flat grey images: what the built-in checks run a gated graph on."""
    greys = np.stack([np.full(chw, g, np.float32) for g in PARITY_GREYS])
    return np.concatenate([probe_batch(chw), greys])


def verify_gated(
    original: onnx.ModelProto,
    gated: onnx.ModelProto,
    vector: ForgetVector,
    classes: Sequence[int],
    pixels: np.ndarray,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    atol: float | None = None,
    provider: str = "cpu",
) -> tuple[float, int]:
    """(max |diff|, rows gated): gated(x) == `gated_reference` with the unfused `original`, on raw-pixel images.

    Tolerances as `runtime.verify_fused` (relative to the logit scale): 1e-5 for pixel
    input, 1e-4 for normalised input.
    """
    image = find_image_input(original, input_name)
    original_fn = pixel_logits_fn(make_session(original, provider), image, normalized_input)
    gated_fn = pixel_logits_fn(make_session(gated, provider), find_image_input(gated, image.name), normalized_input)
    expected, gate = gated_reference(original_fn, pixels, vector, classes)
    base = atol if atol is not None else (1e-5 if normalized_input is None else 1e-4)
    tolerance = base * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    err = require_close(np.asarray(gated_fn(pixels)), expected, tolerance, "gated graph vs the gated mode's definition")
    return err, int(gate.sum())
