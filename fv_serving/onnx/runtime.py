"""onnxruntime sessions and the behavioural checks run through them.

A graph is trusted by what it computes, not by how it was built: the classifier
check feeds the vector's probe images to the *unfused* graph, and the parity
checks compare a fused graph or a forget step against the definition in
`fv_serving.perturbation.apply_delta`. Providers are chosen by name ("cpu",
"cuda"); asking for CUDA where the installed onnxruntime has no CUDA execution
provider is an error, never a silent fall-back to CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fv_serving.errors import InvalidInputError, ModelMismatchError, OnnxGraphError
from fv_serving.onnx.graph import OFF_ID, STEP_INPUT, ImageInput, find_image_input, graph_inputs
from fv_serving.perturbation import Clamp, apply_delta, sanitize
from fv_serving.vectors import ForgetVector

PROVIDERS: dict[str, list[str]] = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}
#: Pixel-space statistics of a graph that takes normalised input: ((mean per channel), (std per channel)).
NormalizedInput = tuple[Sequence[float], Sequence[float]]


def providers_for(provider: str) -> list[str]:
    """Execution providers for a name, refusing CUDA when this onnxruntime build lacks it."""
    if provider not in PROVIDERS:
        raise InvalidInputError(f"unknown provider {provider!r}; expected one of {sorted(PROVIDERS)}")
    wanted = PROVIDERS[provider]
    available = ort.get_available_providers()
    if wanted[0] not in available:
        raise InvalidInputError(
            f"provider {provider!r} needs {wanted[0]}, but this onnxruntime ({ort.__version__}) offers only "
            f"{available}; install onnxruntime-gpu instead of onnxruntime (never both) on a CUDA host"
        )
    return wanted


def make_session(
    model: onnx.ModelProto | bytes | str | Path,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    spinning: bool | None = None,
    tf32: bool = False,
) -> ort.InferenceSession:
    """An InferenceSession on the named provider; CUDA must really be active, not silently dropped.

    `spinning=False` sets session.intra_op.allow_spinning=0 (on a shared 2-core host
    spinning threads steal time from the other session); None keeps ORT's default.
    On CUDA, TF32 is off unless asked for: TF32 convolutions (Ampere and newer) round
    to 10 mantissa bits, which would break the 1e-4/1e-5 parity checks.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if isinstance(model, onnx.ModelProto):
        source: bytes | str = model.SerializeToString()
    elif isinstance(model, Path):
        source = str(model)
    else:
        source = model
    names = providers_for(provider)
    providers: list[str | tuple[str, dict[str, str]]] = list(names)
    if names[0] == "CUDAExecutionProvider":
        providers[0] = (names[0], {"use_tf32": "1" if tf32 else "0"})
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        raise OnnxGraphError(f"onnxruntime cannot load the graph: {exc}") from exc
    if names[0] not in session.get_providers():
        raise InvalidInputError(
            f"onnxruntime did not activate {names[0]} (active: {session.get_providers()}); "
            "check the CUDA/cuDNN libraries onnxruntime-gpu needs"
        )
    return session


def run_image_graph(session: ort.InferenceSession, image: ImageInput, images: np.ndarray) -> np.ndarray:
    """First output for a batch of images; a graph with a static batch b is run in chunks of b."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(image.elem_type)
    x = np.ascontiguousarray(images, dtype=dtype)
    if image.batch is None:
        return np.asarray(session.run(None, {image.name: x})[0])
    b = image.batch
    chunks = []
    for start in range(0, len(x), b):
        chunk = x[start : start + b]
        pad = b - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), dtype)])
        chunks.append(np.asarray(session.run(None, {image.name: chunk})[0])[: b - pad])
    return np.concatenate(chunks)


def check_normalized_input(normalized_input: NormalizedInput | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) as float64 [C] arrays; (0, 1) when the graph takes raw pixels."""
    if normalized_input is None:
        return np.zeros(channels), np.ones(channels)
    mean, std = (np.asarray(v, dtype=np.float64).ravel() for v in normalized_input)
    if mean.shape != (channels,) or std.shape != (channels,):
        raise InvalidInputError(
            f"normalized input needs one mean and one std per channel ({channels}), got {list(mean)} / {list(std)}"
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        raise InvalidInputError(f"mean must be finite and std finite and > 0, got {list(mean)} / {list(std)}")
    return mean, std


def pixel_logits_fn(
    session: ort.InferenceSession, image: ImageInput, normalized_input: NormalizedInput | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """Raw pixels [N,C,H,W] -> first output, normalising first when the graph takes normalised input."""
    mean, std = check_normalized_input(normalized_input, image.chw[0])

    def run(pixels: np.ndarray) -> np.ndarray:
        x = pixels if normalized_input is None else (pixels - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        return run_image_graph(session, image, x)

    return run


def check_vector_matches(
    model: onnx.ModelProto,
    vector: ForgetVector,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    provider: str = "cpu",
) -> None:
    """Refuse (ModelMismatchError) a graph whose logits on the vector's probe images differ from its fingerprint."""
    image = find_image_input(model, input_name)
    others = [i.name for i in graph_inputs(model) if i.name != image.name]
    if others:
        raise OnnxGraphError(
            f"the classifier check feeds only the image input, but the graph also needs {others}; "
            "fuse with force (--force) if you are sure the vector belongs to this classifier"
        )
    session = make_session(model, provider)
    what = f"forget vector {vector.vector_id}"
    try:
        vector.classifier.check_outputs(pixel_logits_fn(session, image, normalized_input), what)
    except ModelMismatchError as exc:
        if normalized_input is None:
            raise
        raise ModelMismatchError(f"{exc} (or the given mean/std are not the graph's normalisation)") from exc


def perturb(pixels: np.ndarray, delta: np.ndarray, clamp: Clamp) -> np.ndarray:
    """clamp(x + delta) by THE definition (`apply_delta`), on numpy arrays."""
    return apply_delta(np.asarray(pixels, np.float32), np.asarray(delta, np.float32), clamp)


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise OnnxGraphError(f"output shape {list(actual.shape)} differs from expected {list(expected.shape)}")
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if actual.size else 0.0


def require_close(actual: np.ndarray, expected: np.ndarray, atol: float, what: str) -> float:
    """Max |actual - expected|; OnnxGraphError if above `atol` (a graph that does not compute what it should)."""
    err = max_abs_diff(actual, expected)
    if not err <= atol:
        raise OnnxGraphError(f"{what}: outputs differ by up to {err:.3g} (tolerance {atol:g})")
    return err


def verify_fused(
    original: onnx.ModelProto,
    fused: onnx.ModelProto,
    vector: ForgetVector,
    pixels: np.ndarray,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    atol: float | None = None,
    provider: str = "cpu",
) -> float:
    """fused(x) == original(clamp(x + delta)) on raw-pixel images (normalised first for such graphs).

    Default tolerance, relative to the logit scale max(1, max|logit|): 1e-5 for pixel
    input (the same float32 ops in the same order: in practice 0), 1e-4 for normalised
    input, where (x - m)/s + d/s rounds differently from (x + d - m)/s by an ulp of
    the input, which the network may amplify.
    """
    image = find_image_input(original, input_name)
    original_fn = pixel_logits_fn(make_session(original, provider), image, normalized_input)
    fused_fn = pixel_logits_fn(make_session(fused, provider), find_image_input(fused, image.name), normalized_input)
    expected = original_fn(perturb(pixels, vector.delta, vector.clamp))
    base = atol if atol is not None else (1e-5 if normalized_input is None else 1e-4)
    tolerance = base * max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    return require_close(fused_fn(pixels), expected, tolerance, "fused graph vs original(clamp(x + delta))")


def verify_forget_step(
    step: onnx.ModelProto, vector: ForgetVector | None, pixels: np.ndarray, provider: str = "cpu"
) -> float:
    """The forget step gives apply_delta(x, delta, clamp) (sanitised x for the "off" step), exactly, and its id."""
    session = make_session(step, provider)
    perturbed, ids = session.run(None, {STEP_INPUT: np.ascontiguousarray(pixels, np.float32)})
    expected = sanitize(pixels) if vector is None else perturb(pixels, vector.delta, vector.clamp)
    expected_id = OFF_ID if vector is None else vector.vector_id
    if ids.shape != (len(pixels), 1) or any(str(v) != expected_id for v in ids.ravel()):
        raise OnnxGraphError(f"forget step graph names {set(ids.ravel())} per image, expected {expected_id!r}")
    return require_close(np.asarray(perturbed), expected, 0.0, "forget step graph vs apply_delta")
