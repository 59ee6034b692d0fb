"""Client side of `fv infer`: turn files or a data set into request batches and score the answers.

Images go to the server as the classifier expects them: float32 [N,C,H,W] pixels in
[0,1] (normalisation is inside the graph, the forget vector is added in pixel space).
Files are refused, not silently resized or converted, when they do not fit: a
resized image is a different input, and the vector was learned for the real size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fv_serving.datasets import read_arrays
from fv_serving.errors import DataNotFoundError, FileFormatError, InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def read_inputs(paths: Sequence[str | Path], chw: Sequence[int]) -> tuple[np.ndarray, list[str]]:
    """Images from PNG/JPEG/BMP files and .npy arrays as float32 [N,C,H,W] in [0,1], with a name per image.

    A .npy file holds one image [C,H,W] (or [H,W] for one channel) or a batch
    [N,C,H,W]; uint8 arrays are scaled by 1/255, float arrays must already be in [0,1].
    """
    c, h, w = (int(d) for d in chw)
    arrays, names = [], []
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise DataNotFoundError(f"input file not found: {path}")
        if path.suffix.lower() == ".npy":
            batch = _read_npy(path, (c, h, w))
            arrays.append(batch)
            names += [path.name] if len(batch) == 1 else [f"{path.name}[{i}]" for i in range(len(batch))]
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            arrays.append(_read_image(path, (c, h, w))[None])
            names.append(path.name)
        else:
            raise InvalidInputError(f"{path}: unsupported input type; give {', '.join(IMAGE_SUFFIXES)} or .npy files")
    if not arrays:
        raise InvalidInputError("no input files given")
    return np.concatenate(arrays).astype(np.float32), names


def _read_npy(path: Path, chw: tuple[int, int, int]) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"{path} is not a readable .npy array: {exc}") from exc
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if not np.all(np.isfinite(array)) or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise InvalidInputError(f"{path}: float pixels must be finite and in [0,1]")
    else:
        raise InvalidInputError(f"{path}: dtype {array.dtype} is not an image (uint8 or float in [0,1])")
    if array.ndim == 2 and chw[0] == 1:
        array = array[None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or tuple(array.shape[1:]) != chw:
        raise InvalidInputError(
            f"{path}: shape {list(array.shape)} does not fit the model's [N,{','.join(map(str, chw))}] images"
        )
    return array


def _read_image(path: Path, chw: tuple[int, int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    c, h, w = chw
    if c not in (1, 3):
        raise InvalidInputError(f"{path}: image files serve 1- or 3-channel models; this one takes {c} channels")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if c == 1 else "RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise FileFormatError(f"{path} is not a readable image: {exc}") from exc
    if pixels.shape[:2] != (h, w):
        raise InvalidInputError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, the model takes {w}x{h}")
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def dataset_sample(
    name: str, count: int, data_root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The first `count` test images of a data set (pixels, labels, class names): same images every run."""
    if count < 1:
        raise InvalidInputError(f"count must be >= 1, got {count}")
    data = read_arrays(name, data_root)
    n = min(count, len(data.test_labels))
    return data.test_images[:n].astype(np.float32) / 255.0, data.test_labels[:n], list(data.class_names)


@dataclass(frozen=True)
class ClassAccuracy:
    name: str
    count: int
    accuracy: float  # percent; NaN when the class has no images


@dataclass(frozen=True)
class AccuracyReport:
    """Accuracy overall and per class of a set of predictions."""

    count: int
    accuracy: float
    per_class: tuple[ClassAccuracy, ...]

    def lines(self, highlight: Sequence[int] = ()) -> list[str]:
        out = [f"accuracy {self.accuracy:6.2f}% on {self.count} images"]
        for index, row in enumerate(self.per_class):
            mark = "  <- forgotten" if index in highlight else ""
            out.append(f"  {index:>2} {row.name:<14} {row.accuracy:6.2f}%  ({row.count} images){mark}")
        return out


def score(predicted: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> AccuracyReport:
    """Accuracy of predicted class ids against labels, overall and per class (percent)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise InvalidInputError(f"{len(predicted)} predictions for {len(labels)} labels")
    names = list(class_names) or [str(c) for c in range(int(labels.max(initial=0)) + 1)]
    rows = []
    for c, name in enumerate(names):
        mask = labels == c
        accuracy = float(100.0 * np.mean(predicted[mask] == c)) if mask.any() else float("nan")
        rows.append(ClassAccuracy(name, int(mask.sum()), accuracy))
    overall = float(100.0 * np.mean(predicted == labels)) if len(labels) else 0.0
    return AccuracyReport(len(labels), overall, tuple(rows))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(exp / exp.sum(axis=1, keepdims=True))
