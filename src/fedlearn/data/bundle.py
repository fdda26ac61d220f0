"""The DatasetBundle every loader returns, and the one place where raw pixels become normalized tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError, DataError
from fedlearn.tasks import TASKS


@dataclass
class DatasetBundle:
    """A loaded dataset: normalized train/test splits plus what a model and a partitioner need to know.

    ``task`` (one of fedlearn.tasks.TASKS) says what the labels are and what ``num_classes`` counts: classes
    (int64 labels (N,)), labels (float32 0/1 (N, L)) or regression output dimensions (float32 (N,) or (N, D)).
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    group_names: list[str] | None = None
    task: str = "classification"


def to_nchw(images: np.ndarray, source: str) -> np.ndarray:
    """Return images as (N, C, H, W): (N, H, W) gains a channel axis, (N, H, W, C) is transposed."""
    if images.ndim == 3:
        return images[:, None, :, :]
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return images
    raise DataError(f"{source}: images have shape {images.shape}, expected (N, H, W) or (N, H, W, C); replace the file")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of scaled images (N, C, H, W)."""
    means = tuple(float(x[:, c].mean(dtype=np.float64)) for c in range(x.shape[1]))
    stds = tuple(float(x[:, c].std(dtype=np.float64)) or 1.0 for c in range(x.shape[1]))
    return means, stds


def _normalized(x: np.ndarray, scale: float, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x / scale - mean) / std per channel as a float32 tensor, computed in place on one copy."""
    out = np.array(x, dtype=np.float32, copy=True)
    out /= np.float32(scale)
    out -= np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return torch.from_numpy(np.ascontiguousarray(out))


def _class_labels(y: np.ndarray, num_classes: int, source: str) -> torch.Tensor:
    """Labels as an int64 tensor, after checking they are whole numbers in [0, num_classes)."""
    y = np.asarray(y).reshape(-1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(
            f"{source}: labels run from {y.min()} to {y.max()} but the dataset has {num_classes} classes; "
            "replace the file with an original copy"
        )
    return torch.from_numpy(y.astype(np.int64))


def _multilabel_labels(y: np.ndarray, num_labels: int, source: str) -> torch.Tensor:
    """0/1 labels (N, num_labels) as a float32 tensor, after checking their shape and values."""
    y = np.asarray(y)
    if y.ndim != 2 or y.shape[1] != num_labels:
        raise DataError(f"{source}: multilabel targets have shape {y.shape}, expected (N, {num_labels}); "
                        "replace the file with an original copy")
    if y.size and not np.isin(y, (0, 1)).all():
        raise DataError(f"{source}: multilabel targets must all be 0 or 1; replace the file with an original copy")
    return torch.from_numpy(y.astype(np.float32))


def _regression_targets(y: np.ndarray, dims: int, source: str) -> torch.Tensor:
    """Real targets (N,) for one output or (N, dims) as a float32 tensor, after checking shape and finiteness."""
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) and not np.issubdtype(y.dtype, np.complexfloating)):
        raise DataError(f"{source}: regression targets have dtype {y.dtype}, expected real numbers; replace the file")
    if not ((y.ndim == 1 and dims == 1) or (y.ndim == 2 and y.shape[1] == dims)):
        expected = "(N,) or (N, 1)" if dims == 1 else f"(N, {dims})"
        raise DataError(f"{source}: regression targets have shape {y.shape}, expected {expected}; replace the file")
    if y.size and not np.isfinite(y).all():
        raise DataError(f"{source}: regression targets include NaN or infinity; replace the file with finite values")
    return torch.from_numpy(y.astype(np.float32))


def _labels(y: np.ndarray, num_classes: int, source: str, task: str = "classification") -> torch.Tensor:
    """The stored label tensor for ``task``, validated: see DatasetBundle for each task's dtype and shape."""
    if task == "multilabel":
        return _multilabel_labels(y, num_classes, source)
    if task == "regression":
        return _regression_targets(y, num_classes, source)
    return _class_labels(y, num_classes, source)


def _split(name: str, split: str, x: np.ndarray, y: np.ndarray, num_classes: int,
           scale: float, mean: Sequence[float], std: Sequence[float], task: str = "classification") -> ArrayDataset:
    """One normalized split; images and labels must agree in count."""
    y = np.asarray(y)
    count = y.reshape(-1).shape[0] if task == "classification" else (y.shape[0] if y.ndim else 1)
    if x.shape[0] != count:
        raise DataError(
            f"{name}: the {split} split has {x.shape[0]} images but {count} labels; "
            "replace the files with matching originals"
        )
    return ArrayDataset(_normalized(x, scale, mean, std), _labels(y, num_classes, f"{name} {split}", task))


def make_bundle(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    num_classes: int,
    scale: float,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    train_groups: np.ndarray | None = None,
    test_groups: np.ndarray | None = None,
    group_names: list[str] | None = None,
    task: str = "classification",
) -> DatasetBundle:
    """Build a bundle from (images (N, C, H, W), labels) pairs in raw units; x / scale lies in [0, 1].

    When mean/std are None they are computed per channel on the scaled training images. ``task`` says
    what the labels are (see DatasetBundle) and what ``num_classes`` counts.
    """
    if task not in TASKS:
        raise ConfigError(f"{name}: unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    x_train, y_train = train
    x_test, y_test = test
    if mean is None or std is None:
        mean, std = channel_stats(np.asarray(x_train, dtype=np.float32) / np.float32(scale))
    return DatasetBundle(
        name=name,
        train=_split(name, "train", x_train, y_train, num_classes, scale, mean, std, task),
        test=_split(name, "test", x_test, y_test, num_classes, scale, mean, std, task),
        num_classes=num_classes,
        input_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        train_groups=None if train_groups is None else np.asarray(train_groups, dtype=np.int64),
        test_groups=None if test_groups is None else np.asarray(test_groups, dtype=np.int64),
        group_names=group_names,
        task=task,
    )
