"""Dataset registry: maps each stable dataset name to its loader and returns a normalized DatasetBundle."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from fedlearn.data import cifar, digits, femnist, medmnist2d, mnist
from fedlearn.data.bundle import DatasetBundle
from fedlearn.data.files import data_folder
from fedlearn.errors import ConfigError, DataError

Loader = Callable[[str, Path, bool], DatasetBundle]

_LOADERS: dict[str, Loader] = {
    "digits": digits.load_digits,
    **{name: mnist.load_mnist_format for name in mnist.NAMES},
    cifar.NAME: cifar.load_cifar10,
    "femnist": femnist.load_femnist,
    **{name: medmnist2d.load_medmnist for name in medmnist2d.NAMES},
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)

__all__ = ["DATASETS", "DatasetBundle", "load_dataset"]


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> DatasetBundle:
    """Load dataset ``name`` from ``data_dir`` (default ./data/<name>), downloading missing files if allowed.

    Raises ConfigError for an unknown name and DataError for missing or damaged files.
    """
    key = name.strip().lower()
    if key in medmnist2d.MULTI_LABEL:
        raise DataError(f"{key} is multi-label, which is not supported yet; choose a single-label MedMNIST dataset "
                        f"such as {', '.join(medmnist2d.NAMES[:3])}")
    loader = _LOADERS.get(key)
    if loader is None:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return loader(key, data_folder(key, data_dir), download)

