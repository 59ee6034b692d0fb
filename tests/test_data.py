"""Splits are deterministic and disjoint; bad specifications are refused by name."""

from __future__ import annotations

import pytest
import torch

from fv_serving.data import Augmentation, Dataset, ForgetSpec, SplitSpec, load_dataset, make_forget_split
from fv_serving.errors import DataNotFoundError, InvalidInputError


def test_fashion_mnist_is_real_and_complete(fmnist: Dataset) -> None:
    assert (len(fmnist.train), len(fmnist.test)) == (60000, 10000)
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10
    assert fmnist.train.images.dtype == torch.uint8
    assert torch.bincount(fmnist.test.labels).tolist() == [1000] * 10


def test_splits_are_deterministic(fmnist: Dataset) -> None:
    spec = ForgetSpec(percent=10, seed=3)
    a = make_forget_split(fmnist, SplitSpec(seed=1), spec)
    b = make_forget_split(fmnist, SplitSpec(seed=1), spec)
    assert torch.equal(a.forget, b.forget) and torch.equal(a.retain, b.retain) and torch.equal(a.val, b.val)
    assert a.describe()["forget_indices_sha256"] == b.describe()["forget_indices_sha256"]
    c = make_forget_split(fmnist, SplitSpec(seed=1), ForgetSpec(percent=10, seed=4))
    assert not torch.equal(a.forget, c.forget)


def test_random_split_partitions_the_pool(fmnist: Dataset) -> None:
    split = make_forget_split(fmnist, SplitSpec(seed=0, val_size=5000), ForgetSpec(percent=10, seed=0))
    pool, val = SplitSpec(seed=0, val_size=5000).indices(60000)
    assert torch.equal(split.val, val)
    assert len(split.forget) == 5500
    assert torch.equal(torch.cat([split.forget, split.retain]).sort().values, pool)
    assert not set(split.val.tolist()) & set(pool.tolist())
    assert len(split.test) == 10000


def test_class_split_separates_classes(fmnist: Dataset) -> None:
    split = make_forget_split(fmnist, SplitSpec(), ForgetSpec(classes=(2, 5)))
    assert set(fmnist.train.labels[split.forget].tolist()) == {2, 5}
    assert not {2, 5} & set(fmnist.train.labels[split.retain].tolist())
    assert not {2, 5} & set(fmnist.train.labels[split.val].tolist())
    assert not {2, 5} & set(fmnist.test.labels[split.test].tolist())
    assert len(split.test) == 8000 and len(split.test_forget) == 2000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"percent": 0.0}, "percentage must be in"),
        ({"percent": 100.0}, "percentage must be in"),
        ({"percent": -5.0}, "percentage must be in"),
        ({}, "either forget classes or a random percentage"),
        ({"classes": (1,), "percent": 5.0}, "either forget classes"),
        ({"classes": (1, 1)}, "repeat"),
    ],
)
def test_bad_forget_specs(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        ForgetSpec(**kwargs)


def test_unknown_class_is_named(fmnist: Dataset) -> None:
    with pytest.raises(InvalidInputError, match=r"unknown class\(es\) \[12\]"):
        make_forget_split(fmnist, SplitSpec(), ForgetSpec(classes=(12,)))
    with pytest.raises(InvalidInputError, match="unknown class 'Hat'"):
        fmnist.class_index("Hat")
    assert fmnist.class_index("pullover") == 2


def test_missing_data_is_reported(tmp_path) -> None:
    with pytest.raises(DataNotFoundError, match="dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path)
    with pytest.raises(InvalidInputError, match="unknown data set"):
        load_dataset("imagenet")


def test_augmentation_keeps_pixels_and_is_seeded(fmnist: Dataset) -> None:
    x = fmnist.train.as_float(torch.arange(64))
    aug = Augmentation(pad=2, flip=True)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, x)
    flipped_only = Augmentation(pad=0, flip=True)(x, torch.Generator().manual_seed(1))
    for orig, out in zip(x, flipped_only, strict=True):  # each image unchanged or mirrored
        assert torch.equal(out, orig) or torch.equal(out, orig.flip(2))
