"""Image-similarity metrics for privacy audits, computed in [0, 1] pixel space."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def to_pixels(
    x: torch.Tensor, mean: float | Sequence[float] | None = None, std: float | Sequence[float] | None = None
) -> torch.Tensor:
    """Undo per-channel ``(x - mean) / std`` normalization (if given) and clip to [0, 1]."""
    x = x.detach().to(torch.float64)
    if mean is not None or std is not None:
        shape = (1, -1, 1, 1) if x.dim() == 4 else (-1, 1, 1)
        m = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float64).reshape(shape)
        s = torch.as_tensor(1.0 if std is None else std, dtype=torch.float64).reshape(shape)
        x = x * s + m
    return x.clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio 10 log10(range^2 / MSE) in dB over all elements; inf when equal."""
    if x.shape != y.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = float(torch.mean((x.detach().to(torch.float64) - y.detach().to(torch.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)
