"""scikit-learn's bundled 8x8 digits: tiny, offline, with a fixed stratified 80/20 train/test split."""

from __future__ import annotations

from pathlib import Path

from fedlearn.data.bundle import DatasetBundle, make_bundle

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed so the split never changes between runs or machines


def load_digits(name: str, folder: Path | None = None, download: bool = False) -> DatasetBundle:
    """1437 train / 360 test images (1, 8, 8); pixels 0..16 scaled by 1/16, mean/std from the train split."""
    from sklearn.datasets import load_digits as sklearn_digits  # imported on use: ~100 MB, ~1 s
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = digits.images.reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )
    return make_bundle(name, (x_train, y_train), (x_test, y_test), num_classes=10, scale=16.0)
