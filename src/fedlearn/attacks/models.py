"""The LeNet of the DLG/iDLG papers (Zhu et al. 2019, Zhao et al. 2020): the standard gradient-inversion target."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.models._common import as_pair, check_channels, check_classes


class DLGLeNet(nn.Module):
    """Three 5x5 sigmoid convs (12 channels, strides 2, 2, 1, padding 2), no pooling, one FC layer.

    Zhu et al.'s audit net: smooth (sigmoid) and without max-pool, so the gradient is a twice
    differentiable, nearly invertible function of the input. fedlearn's LeNet5 (even with
    ``activation="sigmoid", pool="avg"``) is much harder to invert with its default init.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int | tuple[int, int] = 32) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "dlg-lenet")
        num_classes = check_classes(num_classes, "dlg-lenet")
        h, w = as_pair(image_size, "dlg-lenet")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, 5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, h, w)).shape[1]
        self.fc = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (batch, num_classes) logits."""
        return self.fc(self.features(x))
