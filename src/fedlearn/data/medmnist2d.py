"""MedMNIST v2 2D datasets at 28x28 from their official <name>.npz; train and test are used, val is ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle, to_nchw
from fedlearn.data.files import DownloadUnavailable, load_npz, locate, missing_error
from fedlearn.errors import DataError

# Class counts from medmnist.INFO; chestmnist is multi-label (14 binary labels) and is not supported yet.
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
NAMES = tuple(NUM_CLASSES)
MULTI_LABEL = ("chestmnist",)
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


def _labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Flatten (N, 1) labels to (N,); several columns mean a multi-label file, which is refused."""
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(f"{path} holds multi-label targets ({labels.shape[1]} per image), which are not supported yet")
    return labels.reshape(-1).astype(np.int64)


def load_medmnist(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load a single-label MedMNIST dataset; mean/std are computed per channel on its train split."""
    path = folder / f"{name}.npz"
    found, failure = locate(
        name, lambda: path if path.is_file() else None, lambda: _medmnist_download(name, folder), download
    )
    if found is None:
        raise missing_error(name, folder, [path.name], failure=failure,
                            hint="or pip install medmnist and allow downloading on a machine with internet access")
    arrays = load_npz(found, _KEYS)
    train = (to_nchw(arrays["train_images"], str(found)), _labels(arrays["train_labels"], found))
    test = (to_nchw(arrays["test_images"], str(found)), _labels(arrays["test_labels"], found))
    return make_bundle(name, train, test, num_classes=NUM_CLASSES[name], scale=255.0)
