"""LeNet-5 (LeCun et al. 1998) in its usual modern form, with a selectable activation."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.errors import ModelError
from fedlearn.models._common import as_pair, check_channels, check_classes, flat_size

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
POOLS: dict[str, type[nn.Module]] = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def lenet_padding(image_size: tuple[int, int]) -> tuple[int, int]:
    """conv1 padding ``(32 - side) // 2`` per side below 32, so feature maps match the 32x32 net."""
    return tuple(max(0, (32 - n) // 2) for n in image_size)  # type: ignore[return-value]


class LeNet5(nn.Module):
    """conv 6@5x5 - pool - conv 16@5x5 - pool - FC120 - FC84 - classes.

    Sides under 32 are zero-padded in conv1 (28x28 -> padding 2, giving the classic 16*5*5
    flatten; 8x8 -> padding 12, which works but wastes most of conv1: prefer seed-cnn there).
    ``activation`` is "relu" (the zoo's default), "sigmoid" (e.g. gradient-inversion audits,
    which need a smooth net) or "tanh"; ``pool`` is "max" or "avg" (LeCun's subsampling).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int | tuple[int, int] = 32,
        activation: str = "relu",
        pool: str = "max",
    ) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "lenet5")
        num_classes = check_classes(num_classes, "lenet5")
        size = as_pair(image_size, "lenet5")
        if activation not in ACTIVATIONS:
            raise ModelError(
                f"lenet5: unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}"
            )
        if pool not in POOLS:
            raise ModelError(f"lenet5: unknown pool {pool!r}; use one of {', '.join(POOLS)}")
        act, pooling = ACTIVATIONS[activation], POOLS[pool]
        self.activation = activation
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=lenet_padding(size)),
            act(),
            pooling(2, 2),
            nn.Conv2d(6, 16, 5),
            act(),
            pooling(2, 2),
            nn.Flatten(),
        )
        self.flat_features = flat_size(self.features, in_channels, size)
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, 120),
            act(),
            nn.Linear(120, 84),
            act(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (batch, num_classes) logits."""
        return self.classifier(self.features(x))
