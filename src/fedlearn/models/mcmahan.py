"""The two MNIST models of McMahan et al. 2017 (FedAvg paper): the 2NN MLP and the CNN."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.errors import ModelError
from fedlearn.models._common import as_pair, check_channels, check_classes, flat_size


class McMahan2NN(nn.Module):
    """Flatten -> 200 ReLU -> 200 ReLU -> classes (199,210 parameters on 1x28x28, 10 classes)."""

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int | tuple[int, int]
    ) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "mcmahan-2nn")
        num_classes = check_classes(num_classes, "mcmahan-2nn")
        h, w = as_pair(image_size, "mcmahan-2nn")
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * h * w, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (batch, num_classes) logits."""
        return self.net(x)


class McMahanCNN(nn.Module):
    """conv5x5(32,'same')-pool-conv5x5(64,'same')-pool-fc512-classes (1,663,370 params on MNIST).

    The flatten size follows the input (7*7*64 on 28x28); inputs need to be at least 4x4.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int | tuple[int, int]
    ) -> None:
        super().__init__()
        in_channels = check_channels(in_channels, "mcmahan-cnn")
        num_classes = check_classes(num_classes, "mcmahan-cnn")
        size = as_pair(image_size, "mcmahan-cnn")
        if min(size) < 4:
            raise ModelError(
                f"mcmahan-cnn needs images of at least 4x4 pixels, got {size[0]}x{size[1]}; "
                "use mcmahan-2nn instead"
            )
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.flat_features = flat_size(self.features, in_channels, size)
        self.classifier = nn.Sequential(
            nn.Linear(self.flat_features, 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return (batch, num_classes) logits."""
        return self.classifier(self.features(x))
