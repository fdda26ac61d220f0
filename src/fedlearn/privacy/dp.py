"""Differential-privacy vector maths: L2 clipping of flat updates and calibrated Gaussian noise."""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from fedlearn.protocol.params import ParamSpec


def clip_by_norm(update: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Scale ``update`` so its L2 norm is at most ``clip_norm``; returns (clipped, norm before clipping)."""
    norm = float(torch.linalg.vector_norm(update.to(torch.float64)))
    if norm <= clip_norm or norm == 0.0:
        return update, norm
    return update * (clip_norm / norm), norm


def clip_per_layer(update: torch.Tensor, spec: ParamSpec, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Clip each tensor's slice to clip_norm / sqrt(#tensors), so the whole stays within ``clip_norm``."""
    budget = clip_norm / len(spec.numels) ** 0.5
    pieces = [clip_by_norm(piece, budget)[0] for piece in update.split(spec.numels)]
    return torch.cat(pieces), float(torch.linalg.vector_norm(update.to(torch.float64)))


class PrivacyRandom:
    """The randomness a privacy guarantee rests on: Gaussian noise and sampling coins.

    By default every draw comes from the operating system's CSPRNG (``os.urandom``, 53-bit uniforms), and a Gaussian
    is the sum of 4 Box-Muller draws of std ``std / 2`` (Holohan and Braghin 2021, as Opacus' secure_mode does),
    which blunts floating-point attacks on the low bits of a single sample. With a ``seed`` (the simulation-only
    seeded-privacy switch) a seeded torch generator makes runs reproducible instead; nothing is private then.
    """

    SUMMED = 4  # Gaussian draws summed per noise value

    def __init__(self, seed: int | None = None) -> None:
        self.seeded = seed is not None
        self._torch = torch.Generator().manual_seed(seed) if seed is not None else None

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 values uniform in [0, 1)."""
        if self._torch is not None:
            return torch.rand(n, generator=self._torch, dtype=torch.float64)
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)

    def normal(self, shape: tuple[int, ...] | torch.Size | int, std: float) -> torch.Tensor:
        """float64 N(0, std^2) noise of ``shape``."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if self._torch is not None:
            return torch.randn(shape, generator=self._torch, dtype=torch.float64) * std
        n = math.prod(shape)
        total = torch.zeros(n, dtype=torch.float64)
        for _ in range(self.SUMMED // 2):  # each Box-Muller pair gives two independent standard normals
            u1, u2 = 1.0 - self.uniform(n), self.uniform(n)  # u1 in (0, 1]: log(u1) is finite
            radius = torch.sqrt(-2.0 * torch.log(u1))
            total += radius * torch.cos(2 * math.pi * u2) + radius * torch.sin(2 * math.pi * u2)
        return (total * (std / math.sqrt(self.SUMMED))).view(shape)


def noise_generator(seed: int | None) -> PrivacyRandom:
    """Privacy randomness: the OS's CSPRNG unless a seed is given (the simulation-only seeded-privacy switch).

    Noise drawn from a seed anyone can read in config.yaml protects nothing, so the default is
    unpredictable; a seeded source exists only to make runs comparable in tests.
    """
    return PrivacyRandom(seed)


def gaussian_noise(numel: int, std: float, generator: PrivacyRandom) -> torch.Tensor:
    """N(0, std^2) noise in float64, the precision of the aggregate it is added to."""
    return generator.normal(numel, std)
