"""Classifiers: architectures, the checkpoint format, and loading.

Normalisation is the model's first layer, so a forget vector lives in pixel space
([0,1], before normalisation) exactly as in the method, and an exported ONNX graph
takes raw pixels. Checkpoints are safetensors files (no pickle) whose metadata
carries everything needed to rebuild the model and its training split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fv_serving.atomic import atomic_path
from fv_serving.config import ARCHITECTURES
from fv_serving.errors import DataNotFoundError, FileFormatError, InvalidInputError
from fv_serving.perturbation import Clamp, apply_delta

CHECKPOINT_METADATA_KEY = "fv_serving.classifier"
ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class ModelSpec:
    """What a classifier is: enough to rebuild it and to check inputs against it."""

    arch: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise InvalidInputError(f"unknown architecture {self.arch!r}; expected one of {ARCHITECTURES}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise InvalidInputError(
                f"mean/std need one value per channel ({self.in_channels}), got {self.mean} / {self.std}"
            )
        if any(s <= 0 for s in self.std):
            raise InvalidInputError(f"std must be positive, got {self.std}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image (and of a forget vector): [C, H, W]."""
        return (self.in_channels, *self.image_size)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ModelSpec:
        return cls(
            arch=obj["arch"],
            in_channels=int(obj["in_channels"]),
            num_classes=int(obj["num_classes"]),
            image_size=(int(obj["image_size"][0]), int(obj["image_size"][1])),
            mean=tuple(float(m) for m in obj["mean"]),
            std=tuple(float(s) for s in obj["std"]),
            class_names=tuple(obj.get("class_names", ())),
        )


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer so that exported graphs take raw pixels."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Four conv-BN-ReLU blocks (two strided), global pooling, one linear layer: ~0.13 M parameters.

    Chosen for speed on 2 CPU cores (a 55k-image Fashion-MNIST epoch in about half a
    minute when the cores are not shared) while reaching ~91% test accuracy in 5 epochs.
    """
    return nn.Sequential(
        *_conv_bn_relu(in_channels, 32, 2),
        *_conv_bn_relu(32, 64, 1),
        *_conv_bn_relu(64, 64, 2),
        *_conv_bn_relu(64, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    )


def _resnet18_cifar(in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18 in its CIFAR form: 3x3 stride-1 first conv, no max-pool."""
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


class Classifier(nn.Module):
    """Normalisation followed by an architecture body; `spec` says what it is."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.normalize = Normalize(spec.mean, spec.std)
        builders = {"small-cnn": _small_cnn, "resnet18": _resnet18_cifar}
        self.body = builders[spec.arch](spec.in_channels, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm running statistics) and no weight gradients: the frozen classifier f."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def save_classifier(model: Classifier, path: str | Path, info: dict[str, Any]) -> Path:
    """Write weights + spec + `info` (training split, metrics...) to one safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {CHECKPOINT_METADATA_KEY: json.dumps({"spec": model.spec.to_json(), "info": info})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def channels_last(model: ModuleT) -> ModuleT:
    """`model` itself, its 4-d weights moved to channels-last (NHWC) memory order: the same function.

    A convolution whose weight is channels-last runs in that order (oneDNN on CPU), and
    on CPU that is faster for the small convolutions here: `benchmarks/layout.py` times
    a learning step, a prediction and a training step both ways side by side
    (benchmarks/results/layout/). Logits change only by float rounding. Checkpoints
    are written in the standard order (`save_classifier`), so files do not depend on it.
    """
    return model.to(memory_format=torch.channels_last)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` with every BatchNorm folded into the convolution before it, for learning.

    Eval-mode BatchNorm is a per-channel affine map, so folding it changes logits only by
    float rounding (the tests hold it to 1e-4) while a learning step no longer pays for
    it. A model torch.fx cannot trace (Python control flow on tensors) is returned as it
    is: folding is an optimisation, never a requirement. So is a model that is already
    frozen and holds no BatchNorm (such as a folded copy): there is nothing to copy for.
    """
    from torch.fx.experimental.optimization import fuse
    from torch.fx.proxy import TraceError

    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_batchnorm and not model.training and not any(p.requires_grad for p in model.parameters()):
        return model
    try:
        folded = fuse(model)
    except (TraceError, TypeError, NotImplementedError):
        return model
    return freeze(folded)


def learning_copy(model: nn.Module) -> nn.Module:
    """The frozen copy a learning loop runs: BatchNorm folded, weights channels-last (both only cheaper)."""
    return channels_last(fold_batchnorm(model))


@dataclass
class LoadedClassifier:
    model: Classifier
    info: dict[str, Any]
    path: Path


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Rebuild a classifier from its checkpoint, frozen and in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"classifier checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    if CHECKPOINT_METADATA_KEY not in meta:
        raise InvalidInputError(f"{path} is not an fv-serving classifier checkpoint (no {CHECKPOINT_METADATA_KEY})")
    payload = json.loads(meta[CHECKPOINT_METADATA_KEY])
    model = Classifier(ModelSpec.from_json(payload["spec"]))
    model.load_state_dict(state)
    freeze(model.to(device))
    return LoadedClassifier(model=model, info=payload["info"], path=path)


class PerturbedClassifier(nn.Module):
    """A frozen classifier behind a fixed forget vector: the unlearned model g(x) = f(clamp(x + delta))."""

    delta: torch.Tensor

    def __init__(self, classifier: nn.Module, delta: torch.Tensor, clamp: Clamp = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("delta", delta.detach().reshape(1, *delta.shape[-3:]).float())
        self.clamp = clamp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(apply_delta(x, self.delta, self.clamp))
