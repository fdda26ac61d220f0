"""The audit's picture: originals in the top row, their reconstructions below, as one PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def grid_image(originals: torch.Tensor, reconstructions: torch.Tensor, *, scale: int = 4, pad: int = 2) -> np.ndarray:
    """A (rows*H*scale + pads, N*W*scale + pads, 3) float array of [0, 1] images, originals above reconstructions."""
    if originals.shape != reconstructions.shape or originals.dim() != 4:
        raise ValueError(
            f"need two (N, C, H, W) batches of equal shape, got {tuple(originals.shape)} and "
            f"{tuple(reconstructions.shape)}"
        )
    n, c, h, w = originals.shape
    if c not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {c}")
    cell_h, cell_w = h * scale, w * scale
    canvas = np.ones((2 * cell_h + 3 * pad, n * cell_w + (n + 1) * pad, 3), dtype=np.float32)
    for row, batch in enumerate((originals, reconstructions)):
        pixels = batch.detach().to("cpu", torch.float32).clamp(0, 1).expand(n, 3, h, w)
        pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).permute(0, 2, 3, 1).numpy()
        top = pad + row * (cell_h + pad)
        for i in range(n):
            left = pad + i * (cell_w + pad)
            canvas[top : top + cell_h, left : left + cell_w] = pixels[i]
    return canvas


def save_grid(
    originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike, *, scale: int = 4, pad: int = 2
) -> Path:
    """Write the grid of [0, 1] images (N, C, H, W) as a PNG of exactly ``grid_image``'s size; returns the path."""
    from matplotlib.image import imsave  # writes pixels 1:1 with the Agg PNG writer, no figure or backend

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, grid_image(originals, reconstructions, scale=scale, pad=pad), format="png")
    return path
