"""Forget vectors for a classifier this project did not train: a user's ONNX graph, or their own nn.Module.

Learning a vector needs the gradient of the classifier's outputs with respect to its
input, so the classifier must run in an autograd framework. For an ONNX graph that
means converting it to torch. Chosen: onnx2torch (PyPI, maintained, converts the
standard operator set node by node into torch modules whose weights are the graph's
own initializers). Considered and not chosen: writing our own ONNX interpreter in
torch (a second implementation of every operator to keep correct), onnx2pytorch
(older, fewer operators), and learning in onnxruntime without gradients (a vector
has C*H*W parameters: finite differences would cost that many forward passes per
step). Three things are done to a graph before conversion, each a semantics-preserving
rewrite, because exporters emit forms onnx2torch 1.5 does not take:
  1. onnxruntime's basic graph optimisations (constant folding, removal of Identity
     nodes, which the TorchScript exporter puts in front of shared weights);
  2. opset 18+ graphs are converted to opset 17 (onnx2torch 1.5 converts the
     reductions only in their attribute form);
  3. Reshape(allowzero=1) with a constant target shape that holds no 0 becomes
     allowzero=0 (the flag only changes what a 0 in the shape means).
A graph whose output is a softmax is learned on the softmax's input (the logits the
objective needs); everything else is the graph as given. The converted module is
then trusted by what it computes: it must give the graph's outputs (in onnxruntime)
on the probe images and on real images of the data set, or it is refused.

The vector's fingerprint is the graph's own (`fv_serving.onnx.identity`), so
`fv export fused` and `fv triton build` accept the vector for that graph, and for
the same model in another form (float16, softmax), without --force.

For a user's own nn.Module (the recipe, tested in tests/test_byo_model.py):

    from fv_serving.byo import learn_vector_for_module
    from fv_serving.config import VectorConfig
    from fv_serving.data import ForgetSpec, load_dataset
    from fv_serving.models import Normalize
    from fv_serving.onnx import fuse_vector, load_model, save_model

    data = load_dataset("fashion-mnist")              # or "imagefolder" with a root
    model = torch.nn.Sequential(Normalize(mean, std), my_net).eval()   # raw pixels in [0,1] in
    vector, metrics = learn_vector_for_module(model, data, ForgetSpec(classes=(1,)), VectorConfig(), "v.safetensors")
    torch.onnx.export(my_net, ...)                    # the user's own export, e.g. taking normalised input
    fused = fuse_vector(load_model("my.onnx"), vector, normalized_input=(mean, std))
    save_model(fused.graph, "my_fused.onnx")

The module must take raw pixels in [0,1] (the space vectors live in); a network that
expects normalised input goes behind `Normalize`, and its export is then fused with
`normalized_input=(mean, std)` (`fv export fused --normalized-input --mean --std`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper, version_converter
from torch import nn

from fv_serving.config import DEFAULT_VAL_SIZE, VectorConfig
from fv_serving.data import Dataset, ForgetSpec, SplitSpec, load_dataset, make_forget_split, to_numpy_images
from fv_serving.errors import InvalidInputError, ModelMismatchError, OnnxGraphError
from fv_serving.fingerprint import ClassifierFingerprint, probe_batch
from fv_serving.metrics import evaluate_unlearning
from fv_serving.models import Normalize, PerturbedClassifier, freeze
from fv_serving.onnx.graph import default_opset, find_image_input, graph_outputs, load_model
from fv_serving.onnx.identity import graph_fingerprint
from fv_serving.onnx.runtime import NormalizedInput, make_session, pixel_logits_fn, require_close
from fv_serving.unlearn import learn_forget_vector
from fv_serving.vectors import ForgetVector, save_vector

#: The newest opset onnx2torch 1.5 converts in full.
CONVERTER_OPSET = 17
#: Converted module vs onnxruntime, relative to the output scale: float32 graphs agree to ~1e-6.
CONVERSION_RTOL = 1e-4
#: Real images the conversion is checked on (besides the probe images).
CONVERSION_IMAGES = 64

ForgetTarget = ForgetSpec | Sequence[str]


@dataclass(frozen=True)
class OnnxClassifier:
    """A user's ONNX classifier, converted: `module` takes raw pixels and gives logits; `fingerprint` is the graph's."""

    module: nn.Module
    fingerprint: ClassifierFingerprint
    source: dict[str, Any]  # what was converted, and how (stored in the vector's notes)


def _ort_normalised(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph after onnxruntime's basic (standard-operator) optimisations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    with tempfile.TemporaryDirectory(prefix="fv-byo-") as tmp:
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _without_final_softmax(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    """The graph with a final Softmax over the classes removed (its input becomes the output), and whether it was."""
    output = graph_outputs(model)[0].name
    last = next((n for n in model.graph.node if output in n.output), None)
    axis = next((onnx.helper.get_attribute_value(a) for a in last.attribute if a.name == "axis"), -1) if last else None
    if last is None or last.op_type != "Softmax" or axis not in (1, -1):
        return model, False
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[list(model.graph.node).index(last)]
    out.graph.output[0].name = last.input[0]
    return out, True


def _converter_ready(model: onnx.ModelProto) -> onnx.ModelProto:
    """Steps 1-3 of the module docstring."""
    model = _ort_normalised(model)
    if default_opset(model) > CONVERTER_OPSET:
        try:
            model = version_converter.convert_version(model, CONVERTER_OPSET)
        except Exception as exc:  # the version converter raises bare RuntimeErrors
            raise OnnxGraphError(f"cannot take the graph to opset {CONVERTER_OPSET} for the converter: {exc}") from exc
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        target = constants.get(node.input[1]) if node.op_type == "Reshape" else None
        for attr in node.attribute:
            if attr.name == "allowzero" and attr.i == 1 and target is not None and np.all(target != 0):
                attr.i = 0
    return model


class _PixelClassifier(nn.Module):
    """Raw pixels -> [normalisation] -> converted graph -> logits."""

    def __init__(self, graph: nn.Module, normalized_input: NormalizedInput | None) -> None:
        super().__init__()
        self.normalize = (
            Normalize(*(tuple(float(v) for v in s) for s in normalized_input)) if normalized_input else None
        )
        self.graph = graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.graph(self.normalize(x) if self.normalize is not None else x)
        return out


def _convert(model: onnx.ModelProto) -> nn.Module:
    from onnx2torch import convert

    try:
        return convert(model)
    except (NotImplementedError, KeyError, ValueError, TypeError) as exc:
        raise OnnxGraphError(
            f"onnx2torch cannot convert this graph ({type(exc).__name__}: {exc}); vectors are learned on a torch "
            "version of the graph: export the model with standard operators, or learn with its nn.Module "
            "(fv_serving.byo.learn_vector_for_module)"
        ) from exc


def load_onnx_classifier(
    model: onnx.ModelProto,
    *,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    check_images: np.ndarray | None = None,
) -> OnnxClassifier:
    """Convert a classifier graph to a frozen torch module on raw pixels, checked against onnxruntime.

    `check_images` (raw pixels [N,C,H,W]) are real images the conversion must hold on,
    besides the probe images.
    """
    image = find_image_input(model, input_name)
    if image.elem_type != onnx.TensorProto.FLOAT:
        raise OnnxGraphError(
            f"input {image.name!r} is not float32: vectors are learned on the float32 model (its float16 export "
            "is recognised as the same model when fusing)"
        )
    fingerprint = graph_fingerprint(model, input_name=image.name, normalized_input=normalized_input)
    logits_graph, had_softmax = _without_final_softmax(model)
    module = freeze(_PixelClassifier(_convert(_converter_ready(logits_graph)), normalized_input))
    reference = pixel_logits_fn(
        make_session(logits_graph), find_image_input(logits_graph, image.name), normalized_input
    )
    batches = [probe_batch(image.chw)] + ([np.asarray(check_images, np.float32)] if check_images is not None else [])
    with torch.no_grad():
        for x in batches:
            expected = reference(x)
            got = module(torch.from_numpy(x)).numpy()
            scale = max(1.0, float(np.max(np.abs(expected))))
            require_close(got, expected, CONVERSION_RTOL * scale, "the torch conversion vs the graph in onnxruntime")
    source = {
        "image_input": image.name,
        "normalized_input": {"mean": list(normalized_input[0]), "std": list(normalized_input[1])}
        if normalized_input
        else None,
        "converter": "onnx2torch",
        "learned_on": "the softmax's input (logits)" if had_softmax else "the graph's output",
        "weights_sha256": fingerprint.weights_sha256,
    }
    return OnnxClassifier(module, fingerprint, source)


def _default_split(data: Dataset) -> SplitSpec:
    """The hold-out the stopping rule uses: DEFAULT_VAL_SIZE images, or a tenth of a smaller training set."""
    return SplitSpec(val_size=min(DEFAULT_VAL_SIZE, len(data.train) // 10))


def _forget_spec(data: Dataset, forget: ForgetTarget) -> ForgetSpec:
    if isinstance(forget, ForgetSpec):
        return forget
    if isinstance(forget, str) or not forget:
        raise InvalidInputError(f"forget must be a ForgetSpec or a list of class indices/names, got {forget!r}")
    return ForgetSpec(classes=tuple(data.class_index(str(c)) for c in forget))


def learn_vector_for_module(
    model: nn.Module,
    data: Dataset,
    forget: ForgetTarget,
    config: VectorConfig,
    out: str | Path,
    *,
    fingerprint: ClassifierFingerprint | None = None,
    split: SplitSpec | None = None,
    device: str = "cpu",
    evaluate: bool = True,
    notes: dict[str, Any] | None = None,
) -> tuple[ForgetVector, dict[str, Any]]:
    """Learn a vector against `model` (raw pixels in [0,1] -> logits) on `data`, evaluate it and save it.

    `forget`: a ForgetSpec, or class indices/names of `data`. The fingerprint defaults to
    the module's own (`ClassifierFingerprint.of`: weights digest + probe logits), which
    the module's ONNX export is then checked against by its outputs.
    """
    model = freeze(model.to(device))
    split = split or _default_split(data)
    spec = _forget_spec(data, forget)
    task = make_forget_split(data, split, spec)
    with torch.no_grad():
        classes = int(model(torch.from_numpy(probe_batch(data.input_shape, count=1)).to(device)).shape[1])
    if classes != data.num_classes:
        raise ModelMismatchError(f"the classifier has {classes} outputs, the data set {data.num_classes} classes")
    fingerprint = fingerprint or ClassifierFingerprint.of(model, data.input_shape, classes)
    result = learn_forget_vector(model, data, task, config, device=device)
    metrics: dict[str, Any] = {"stopping": result.stopping_report()}
    if evaluate:
        g = PerturbedClassifier(model, torch.from_numpy(result.delta).to(device), config.clamp)
        unlearned, details = evaluate_unlearning(g, data, task, device=device)
        metrics.update(unlearned.to_json(), details=details)
    vector = ForgetVector(
        classifier=fingerprint,
        delta=result.delta,
        clamp=config.clamp,
        forget=task.describe(),
        hparams=config.to_json(),
        metrics=metrics,
        notes={"dataset": data.name, "split": split.to_json(), "class_names": list(data.class_names), **(notes or {})},
    )
    save_vector(vector, out)
    return vector, metrics


def learn_vector_for_onnx(
    onnx_path: str | Path,
    forget: ForgetTarget,
    config: VectorConfig,
    out: str | Path,
    *,
    data: str = "fashion-mnist",
    data_root: str | Path | None = None,
    input_name: str | None = None,
    normalized_input: NormalizedInput | None = None,
    split: SplitSpec | None = None,
    device: str = "cpu",
    evaluate: bool = True,
) -> tuple[ForgetVector, dict[str, Any]]:
    """`fv learn --onnx`: learn a vector for the classifier graph at `onnx_path` on a data set this project reads.

    `data` is a data set name (`fv_serving.config.DATASETS`; "imagefolder" reads
    `data_root`/train and /test, resized to the graph's H x W); `input_name` and
    `normalized_input` as for `fv export fused`.
    """
    graph = load_model(onnx_path, "classifier graph")
    image = find_image_input(graph, input_name)
    dataset = load_dataset(data, data_root, image_size=(image.chw[1], image.chw[2]) if data == "imagefolder" else None)
    if dataset.input_shape != image.chw:
        raise ModelMismatchError(
            f"input {image.name!r} takes [N,{','.join(map(str, image.chw))}] images, but {dataset.name} has "
            f"[{','.join(map(str, dataset.input_shape))}] images"
        )
    check = to_numpy_images(dataset.test, torch.arange(min(CONVERSION_IMAGES, len(dataset.test))))
    loaded = load_onnx_classifier(graph, input_name=image.name, normalized_input=normalized_input, check_images=check)
    source = {**loaded.source, "onnx": str(Path(onnx_path).absolute())}
    return learn_vector_for_module(
        loaded.module,
        dataset,
        forget,
        config,
        out,
        fingerprint=loaded.fingerprint,
        split=split,
        device=device,
        evaluate=evaluate,
        notes={"classifier_source": source},
    )
