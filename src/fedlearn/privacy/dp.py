"""Differential-privacy vector maths: L2 clipping of flat updates and calibrated Gaussian noise."""

from __future__ import annotations

import secrets

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


def noise_generator(seed: int | None) -> torch.Generator:
    """A generator for privacy noise: from the OS's CSPRNG unless a seed is given (tests, audits).

    Noise drawn from a seed anyone can read in config.yaml protects nothing, so the default is
    unpredictable; a seeded generator exists only to make runs comparable in tests.
    """
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def gaussian_noise(numel: int, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise in float64, the precision of the aggregate it is added to."""
    return torch.randn(numel, generator=generator, dtype=torch.float64) * std
