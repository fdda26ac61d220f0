"""CIFAR-10 from the official python batches (data_batch_1..5, test_batch), loose or in cifar-10-batches-py/."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle
from fedlearn.data.files import find_files, locate, missing_error
from fedlearn.errors import DataError

NAME = "cifar10"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _torchvision_download(root: Path) -> None:
    """Let torchvision fetch and unpack the batches into root/cifar-10-batches-py."""
    from torchvision import datasets

    datasets.CIFAR10(root=str(root), train=True, download=True)


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch as (uint8 images (n, 3, 32, 32), int64 labels). Pickle: only load files you trust."""
    try:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        x = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
    except Exception as exc:  # noqa: BLE001 - unpickling a damaged file can raise almost anything
        raise DataError(f"{path} is not a CIFAR-10 python batch ({type(exc).__name__}); download it again") from None
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path} holds {x.shape[0]} images but {y.shape[0]} labels; download it again")
    return x, y


def load_cifar10(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load CIFAR-10 with the usual per-channel normalization."""
    files = (*TRAIN_FILES, TEST_FILE)
    paths, failure = locate(
        name,
        lambda: find_files((folder, folder / SUBDIR), [(f,) for f in files]),
        lambda: _torchvision_download(folder),
        download,
    )
    if paths is None:
        raise missing_error(name, folder, files, also=folder / SUBDIR, failure=failure)
    batches = [_read_batch(p) for p in paths]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    return make_bundle(name, (x_train, y_train), batches[-1], num_classes=10, scale=255.0, mean=MEAN, std=STD)
