"""Model registry: build any zoo model by name for a given input shape and class count."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from fedlearn.errors import ModelError
from fedlearn.models.lenet import LeNet5
from fedlearn.models.mcmahan import McMahan2NN, McMahanCNN
from fedlearn.models.resnet import resnet18_gn
from fedlearn.models.seed_cnn import SeedCNN

_BUILDERS: dict[str, Callable[[int, int, tuple[int, int]], nn.Module]] = {
    "seed-cnn": SeedCNN,
    "mcmahan-2nn": McMahan2NN,
    "mcmahan-cnn": McMahanCNN,
    "lenet5": LeNet5,  # relu activation, max pooling
    "resnet18-gn": resnet18_gn,
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)

MODEL_DESCRIPTIONS: dict[str, str] = {
    "seed-cnn": "FedLearn seed CNN: conv32-conv64 (5x5) + FC 120/84; padded convs below 16x16",
    "mcmahan-2nn": "McMahan et al. 2017 MLP: 200-200 ReLU hidden units",
    "mcmahan-cnn": "McMahan et al. 2017 CNN: conv32-conv64 (5x5 same) + FC 512",
    "lenet5": "LeNet-5 (ReLU, max-pool); sides under 32 padded in conv1",
    "resnet18-gn": "ResNet-18 with GroupNorm(2); CIFAR stem for images up to 64x64",
}


def _check_shape(input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Validate ``(C, H, W)`` so a bad shape fails here, not deep inside a layer."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = ()
    if len(shape) != 3 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape
    ):
        raise ModelError(
            f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}"
        )
    return shape  # type: ignore[return-value]


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build a freshly initialised zoo model for images of ``input_shape`` (C, H, W)."""
    if name not in _BUILDERS:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    c, h, w = _check_shape(input_shape)
    return _BUILDERS[name](c, num_classes, (h, w))
