"""Seeded, batched photo augmentation for the tiny face sets: mirror, small shift, scale and rotation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def augment_faces(x: torch.Tensor, generator: torch.Generator, *, shift: float = 0.08, scale: float = 0.08,
                  degrees: float = 8.0) -> torch.Tensor:
    """Mirror half the faces and warp each by a random similarity transform (shift as a share of the side).

    The random numbers come from ``generator`` on the CPU, so a run is reproduced on any device.
    """
    n = x.shape[0]
    u = torch.rand(n, 5, generator=generator) * 2 - 1  # flip, zoom, angle, dx, dy, each in [-1, 1)
    flip = torch.where(u[:, 0] < 0, -1.0, 1.0)
    zoom = 1.0 + scale * u[:, 1]
    angle = u[:, 2] * math.radians(degrees)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([
        torch.stack([cos * flip, -sin, 2 * shift * u[:, 3]], dim=1),
        torch.stack([sin * flip, cos, 2 * shift * u[:, 4]], dim=1),
    ], dim=1).to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
