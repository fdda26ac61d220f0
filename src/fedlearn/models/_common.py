"""Shared helpers for the model zoo: shape checks and flatten-size discovery."""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.errors import ModelError


def as_pair(image_size: int | tuple[int, int], model: str) -> tuple[int, int]:
    """Return ``(H, W)`` from an int or a pair, so every model accepts either form."""
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ModelError(
            f"{model}: image_size must be an int or (height, width), got {image_size!r}"
        ) from None
    if h < 1 or w < 1:
        raise ModelError(f"{model}: image_size must be positive, got {h}x{w}")
    return h, w


def check_classes(num_classes: int, model: str) -> int:
    """Reject a class count below 1 with a message instead of a shape error later."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"{model}: num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def check_channels(in_channels: int, model: str) -> int:
    """Reject a channel count below 1 with a message instead of a conv error later."""
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"{model}: in_channels must be a positive int, got {in_channels!r}")
    return in_channels


def flat_size(features: nn.Module, in_channels: int, image_size: tuple[int, int]) -> int:
    """Number of features after ``features`` on one input, found by a dummy forward pass."""
    with torch.no_grad():
        out = features(torch.zeros(1, in_channels, *image_size))
    return int(out[0].numel())
