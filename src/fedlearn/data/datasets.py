"""Dataset registry: maps each stable dataset name to its loader and returns a normalized DatasetBundle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedlearn.data import cifar, digits, femnist, medmnist2d, mnist, synthetic
from fedlearn.data.bundle import DatasetBundle
from fedlearn.data.files import data_folder
from fedlearn.errors import ConfigError

Loader = Callable[[str, Path, bool], DatasetBundle]

_LOADERS: dict[str, Loader] = {
    "digits": digits.load_digits,
    **{name: mnist.load_mnist_format for name in mnist.NAMES},
    cifar.NAME: cifar.load_cifar10,
    "femnist": femnist.load_femnist,
    **{name: medmnist2d.load_medmnist for name in medmnist2d.NAMES},
    synthetic.NAME: synthetic.load_synthetic_regression,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)
REGRESSION_BINS = 10  # regression targets are split at train-split deciles for label-aware partitions

__all__ = ["DATASETS", "DatasetBundle", "load_dataset", "partition_labels"]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> DatasetBundle:
    """Load dataset ``name`` from ``data_dir`` (default ./data/<name>), downloading missing files if allowed.

    Raises ConfigError for an unknown name and DataError for missing or damaged files.
    """
    key = name.strip().lower()
    loader = _LOADERS.get(key)
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return loader(key, data_folder(key, data_dir), download)


def partition_labels(bundle: DatasetBundle, split: str = "train") -> tuple[np.ndarray, int]:
    """One int64 class per example of ``split`` for the partitioners and label_counts, and how many classes.

    classification: the labels and num_classes. multilabel: the first positive label, or L (= num_classes)
    for an all-zero row ("no finding"), so L + 1 classes. regression: the decile (at the train split's
    deciles) of the first target value, so REGRESSION_BINS classes.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test' (got {split!r})")
    y = getattr(bundle, split).y.numpy()
    if bundle.task == "multilabel":
        positive = y.reshape(y.shape[0], -1) > 0.5
        first = np.where(positive.any(axis=1), positive.argmax(axis=1), bundle.num_classes)
        return first.astype(np.int64), bundle.num_classes + 1
    if bundle.task == "regression":
        reference = bundle.train.y.numpy().reshape(len(bundle.train), -1)[:, 0]
        edges = np.quantile(reference, np.arange(1, REGRESSION_BINS) / REGRESSION_BINS) if reference.size else []
        value = y.reshape(y.shape[0], -1)[:, 0]
        return np.searchsorted(edges, value, side="right").astype(np.int64), REGRESSION_BINS
    return y.reshape(-1).astype(np.int64), bundle.num_classes
