"""MedMNIST v2 2D datasets at 28x28 from their official <name>.npz; train and test are used, val is ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle, to_nchw
from fedlearn.data.files import DownloadUnavailable, load_npz, locate, missing_error
from fedlearn.errors import DataError

# Class counts from medmnist.INFO for the single-label datasets; label counts for the multi-label one.
NUM_CLASSES = {
    "pneumoniamnist": 2,
    "breastmnist": 2,
    "bloodmnist": 8,
    "dermamnist": 7,
    "octmnist": 4,
    "organamnist": 11,
    "organcmnist": 11,
    "organsmnist": 11,
    "pathmnist": 9,
    "retinamnist": 5,
    "tissuemnist": 8,
}
MULTI_LABEL = {"chestmnist": 14}  # 14 binary findings per chest X-ray; all zero means "no finding"
NAMES = (*NUM_CLASSES, *MULTI_LABEL)
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


def _medmnist_download(name: str, folder: Path) -> None:
    """Let the optional ``medmnist`` package fetch <name>.npz (28x28) into folder."""
    try:
        import medmnist
    except ImportError:
        raise DownloadUnavailable("the medmnist package is not installed; pip install medmnist") from None
    folder.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, medmnist.INFO[name]["python_class"])
    dataset_class(split="test", root=str(folder), download=True)


def _labels(labels: np.ndarray, path: Path, name: str) -> np.ndarray:
    """Single-label: (N, 1) flattened to (N,), several columns refused; multi-label: (N, L) kept as it is."""
    if name in MULTI_LABEL:
        return labels  # make_bundle checks the shape (N, L) and the 0/1 values
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path} holds multi-label targets ({labels.shape[1]} per image) but {name} is single-label; "
                        "replace it with an original copy")
    return labels.reshape(-1).astype(np.int64)


def load_medmnist(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load a MedMNIST dataset (chestmnist as a multilabel bundle); mean/std are per channel on its train split."""
    path = folder / f"{name}.npz"
    found, failure = locate(
        name, lambda: path if path.is_file() else None, lambda: _medmnist_download(name, folder), download
    )
    if found is None:
        raise missing_error(name, folder, [path.name], failure=failure,
                            hint="or pip install medmnist and allow downloading on a machine with internet access")
    arrays = load_npz(found, _KEYS)
    train = (to_nchw(arrays["train_images"], str(found)), _labels(arrays["train_labels"], found, name))
    test = (to_nchw(arrays["test_images"], str(found)), _labels(arrays["test_labels"], found, name))
    if name in MULTI_LABEL:
        return make_bundle(name, train, test, num_classes=MULTI_LABEL[name], scale=255.0, task="multilabel")
    return make_bundle(name, train, test, num_classes=NUM_CLASSES[name], scale=255.0)
