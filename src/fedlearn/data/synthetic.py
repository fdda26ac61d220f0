"""A tiny seeded linear regression problem, y = X w* + noise, for tests and quick regression runs offline.

Each example is 8 features presented as a (1, 1, 8) "image", so it fits the (C, H, W) input contract;
models that flatten their input (mcmahan-2nn) take it as it is, convolutional ones are not meant for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle

NAME = "synthetic-regression"
NUM_EXAMPLES = 1000
NUM_FEATURES = 8
NUM_TRAIN = 800  # the first 800 examples train, the last 200 test
NOISE_STD = 0.1
SEED = 0  # fixed so the data never changes between runs or machines


def _problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X (1000, 8), y (1000,), w* (8,)) in float64, all from one generator seeded with SEED."""
    rng = np.random.default_rng(SEED)
    weights = rng.standard_normal(NUM_FEATURES)
    x = rng.standard_normal((NUM_EXAMPLES, NUM_FEATURES))
    y = x @ weights + NOISE_STD * rng.standard_normal(NUM_EXAMPLES)
    return x, y, weights


def true_weights() -> np.ndarray:
    """The w* the targets were made from (what least squares on the train split recovers, up to the noise)."""
    return _problem()[2]


def load_synthetic_regression(name: str = NAME, folder: Path | None = None, download: bool = False) -> DatasetBundle:
    """800 train / 200 test examples (1, 1, 8) with one real target each; features are N(0, 1), not rescaled."""
    x, y, _ = _problem()
    images = x.reshape(NUM_EXAMPLES, 1, 1, NUM_FEATURES)
    return make_bundle(name, (images[:NUM_TRAIN], y[:NUM_TRAIN]), (images[NUM_TRAIN:], y[NUM_TRAIN:]),
                       num_classes=1, scale=1.0, mean=(0.0,), std=(1.0,), task="regression")
