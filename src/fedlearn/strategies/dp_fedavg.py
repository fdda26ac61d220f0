"""DP-FedAvg (McMahan et al., ICLR 2018): client-level central differential privacy.

Sampled clients (Poisson, rate q) clip their update to L2 norm C before it leaves them; the
server clips again (so one faulty client cannot break the bound), sums the updates with
uniform weights, adds N(0, (z C)^2) to the sum and divides by the *expected* number of clients
q K, never the realised one, so that the number of answers leaks nothing. Each round is one
Poisson-subsampled Gaussian mechanism with sensitivity C, and a maintained accountant turns the
rounds into (epsilon, delta).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedlearn.client.config import LocalConfig
from fedlearn.errors import ConfigError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.privacy.dp import clip_by_norm, gaussian_noise, noise_generator
from fedlearn.protocol.messages import TrainResult
from fedlearn.strategies.base import Aggregation
from fedlearn.strategies.fedavg import FedAvg


class NoisySum(Aggregation):
    """sum_k clip(u_k) + N(0, (z C)^2), divided by the expected client count, added to the weights."""

    def __init__(self, weights: torch.Tensor, clip_norm: float, std: float, expected_clients: float,
                 generator: torch.Generator) -> None:
        self.weights = weights
        self.clip_norm = clip_norm
        self.std = std
        self.expected_clients = expected_clients
        self.generator = generator
        self._sum = torch.zeros(weights.numel(), dtype=torch.float64)
        self._count = 0

    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        clipped, _ = clip_by_norm(update, self.clip_norm)
        self._sum.add_(clipped)
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def finish(self) -> torch.Tensor:
        noisy = self._sum + gaussian_noise(self._sum.numel(), self.std, self.generator) if self.std > 0 else self._sum
        return self.weights + (noisy / self.expected_clients).to(torch.float32)


class DPFedAvg(FedAvg):
    """FedAvg with clipping, calibrated central Gaussian noise and an accountant, stepped every round.

    ``target_epsilon`` with ``stop_at_budget`` ends the run before a round would exceed it.
    ``noise_seed`` makes the noise reproducible (tests only: seeded noise protects nothing).
    """

    name = "dp-fedavg"
    aggregates_empty_rounds = True

    def __init__(self, local: LocalConfig | None = None, *, clip_norm: float, noise_multiplier: float,
                 num_clients: int, sampling_rate: float, delta: float, accountant: str = "rdp",
                 target_epsilon: float | None = None, stop_at_budget: bool = False,
                 noise_seed: int | None = None) -> None:
        if clip_norm <= 0:
            raise ConfigError(f"--clip-norm must be > 0 for differential privacy; got {clip_norm}")
        if noise_multiplier < 0:
            raise ConfigError(f"--noise-multiplier must be >= 0; got {noise_multiplier}")
        super().__init__(replace(local or LocalConfig(), clip_norm=clip_norm))
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = sampling_rate * num_clients
        self.accountant = PrivacyAccountant(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                                            delta=delta, kind=accountant)
        self.target_epsilon = target_epsilon
        self.stop_at_budget = stop_at_budget
        self.generator = noise_generator(noise_seed)

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        self.accountant.step()  # the release happens whatever the clients answer
        return NoisySum(weights, self.clip_norm, self.noise_multiplier * self.clip_norm, self.expected_clients,
                        self.generator)

    def can_continue(self, next_round: int) -> bool:
        if not (self.stop_at_budget and self.target_epsilon is not None):
            return True
        return self.accountant.epsilon_after(self.accountant.steps + 1) <= self.target_epsilon

    def round_metrics(self) -> dict[str, Any]:
        return {"epsilon": self.accountant.epsilon()}

    def privacy_summary(self) -> dict[str, Any]:
        """What summary.json states about the guarantee."""
        return {**self.accountant.summary(), "clip_norm": self.clip_norm, "dp": "central"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
