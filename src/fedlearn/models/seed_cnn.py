"""The CNN from FedLearn's seed document, adapted to any input channels and size."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.errors import ModelError
from fedlearn.models._common import as_pair, check_channels, check_classes, flat_size


def _side_after(n: int, padding: int) -> int:
    """Side length after conv5 -> pool2 -> conv5 -> pool2 with the given conv padding."""
    n = (n + 2 * padding - 4) // 2
    return (n + 2 * padding - 4) // 2


def seed_cnn_padding(image_size: tuple[int, int]) -> int:
    """0 (the seed's unpadded convs) when they fit, else 2 ('same' convs) for small inputs."""
    for padding in (0, 2):
        if min(_side_after(n, padding) for n in image_size) >= 1:
            return padding
    h, w = image_size
    raise ModelError(
        f"seed-cnn needs images of at least 4x4 pixels, got {h}x{w}; use mcmahan-2nn instead"
    )


class SeedCNN(nn.Module):
    """conv(32,5)-pool-conv(64,5)-pool-fc120-fc84-fc(classes); exactly the seed net on 1x32x32.

    Inputs too small for two unpadded 5x5 convs (under 16x16, e.g. 8x8 digits) get padding=2 in
    both convs; the flatten size is measured with a dummy forward pass, never hard-coded.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int | tuple[int, int]
    ) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "seed-cnn")
        num_classes = check_classes(num_classes, "seed-cnn")
        size = as_pair(image_size, "seed-cnn")
        padding = seed_cnn_padding(size)
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=padding)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 5, padding=padding)
        self.flat_features = flat_size(self._features, in_channels, size)
        self.fc1 = nn.Linear(self.flat_features, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Convolutional trunk, flattened to (batch, flat_features)."""
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return torch.flatten(x, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (batch, num_classes) logits."""
        x = self._features(x)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
