"""DP-FedAvg (McMahan et al., ICLR 2018): client-level central differential privacy.

Sampled clients (Poisson, rate q) clip their update to L2 norm C before it leaves them; the
server clips again (so one faulty client cannot break the bound), sums the updates with
uniform weights, adds N(0, (z C)^2) to the sum and divides by the *expected* number of clients
q K, never the realised one, so that the number of answers leaks nothing. Each round is one
Poisson-subsampled Gaussian mechanism with sensitivity C, and a maintained accountant turns the
rounds into (epsilon, delta).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fedlearn.client.config import LocalConfig
from fedlearn.errors import ConfigError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.privacy.dp import clip_by_norm, gaussian_noise, noise_generator
from fedlearn.protocol.messages import TrainResult
from fedlearn.strategies.aggregate import WeightedMean
from fedlearn.strategies.base import Aggregation
from fedlearn.strategies.fedavg import FedAvg


class NoisySum(Aggregation):
    """sum_k clip(u_k) + N(0, (z C)^2), divided by the expected client count, added to the weights.

    It also sums the clients' centred "update was within the clip norm" bits (b - 1/2), which
    adaptive clipping privatizes before use.
    """

    def __init__(self, weights: torch.Tensor, clip_norm: float, std: float, expected_clients: float,
                 generator: torch.Generator, on_finish: Callable[[NoisySum], None] | None = None) -> None:
        self.weights = weights
        self.on_finish = on_finish
        self.clip_norm = clip_norm
        self.std = std
        self.expected_clients = expected_clients
        self.generator = generator
        self._sum = torch.zeros(weights.numel(), dtype=torch.float64)
        self._count = 0
        self.centred_bits = 0.0

    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        clipped, norm = clip_by_norm(update, self.clip_norm)
        self._sum.add_(clipped)
        self._count += 1
        # The client saw its update before clipping; a clipped payload sits exactly on the bound.
        reported = result.metrics.get("below_clip", float(norm < self.clip_norm * (1 - 1e-6)))
        self.centred_bits += (1.0 if reported >= 0.5 else 0.0) - 0.5  # a bit, whatever was sent

    def add_sum(self, weighted_sum: torch.Tensor, total_weight: float, count: int, extras: dict[str, int]) -> None:
        # Clients clipped before masking; the server cannot re-clip what it cannot see.
        self._sum.add_(weighted_sum.to(torch.float64))
        self._count += count
        self.centred_bits += extras.get("below_clip", 0) - 0.5 * count

    @property
    def count(self) -> int:
        return self._count

    def finish(self) -> torch.Tensor:
        noisy = self._sum + gaussian_noise(self._sum.numel(), self.std, self.generator) if self.std > 0 else self._sum
        if self.on_finish is not None:
            self.on_finish(self)
        return self.weights + (noisy / self.expected_clients).to(torch.float32)


class DPFedAvg(FedAvg):
    """FedAvg with clipping, calibrated central Gaussian noise and an accountant, stepped every round.

    ``target_epsilon`` with ``stop_at_budget`` ends the run before a round would exceed it.
    ``noise_seed`` makes the noise reproducible (tests only: seeded noise protects nothing).
    """

    name = "dp-fedavg"
    aggregates_empty_rounds = True
    secure_weighting = "uniform"

    def __init__(self, local: LocalConfig | None = None, *, clip_norm: float, noise_multiplier: float,
                 num_clients: int, sampling_rate: float, delta: float, accountant: str = "rdp",
                 target_epsilon: float | None = None, stop_at_budget: bool = False,
                 noise_seed: int | None = None, adaptive_quantile: float | None = None,
                 clip_learning_rate: float = 0.2, clipped_count_stddev: float | None = None) -> None:
        if clip_norm <= 0:
            raise ConfigError(f"--clip-norm must be > 0 for differential privacy; got {clip_norm}")
        if noise_multiplier < 0:
            raise ConfigError(f"--noise-multiplier must be >= 0; got {noise_multiplier}")
        super().__init__(replace(local or LocalConfig(), clip_norm=clip_norm))
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.expected_clients = sampling_rate * num_clients
        self.adaptive_quantile = adaptive_quantile
        self.secure_extras = ("below_clip",) if adaptive_quantile is not None else ()
        self.clip_learning_rate = clip_learning_rate
        if adaptive_quantile is not None:
            if not 0 < adaptive_quantile < 1:
                raise ConfigError(f"--adaptive-clip-quantile must be in (0, 1); got {adaptive_quantile}")
            # Andrew et al. 2021 suggest noise of about m/20 on the count of m expected clients.
            clipped_count_stddev = clipped_count_stddev or self.expected_clients / 20
        self.clipped_count_stddev = clipped_count_stddev if adaptive_quantile is not None else None
        self.accountant = PrivacyAccountant(noise_multiplier=noise_multiplier, sampling_rate=sampling_rate,
                                            delta=delta, kind=accountant,
                                            clipped_count_stddev=self.clipped_count_stddev)
        self._round_clip_norm = clip_norm
        self.target_epsilon = target_epsilon
        self.stop_at_budget = stop_at_budget
        self.generator = noise_generator(noise_seed)

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        self.accountant.step()  # the release happens whatever the clients answer
        self._round_clip_norm = self.clip_norm
        adapt = self._adapt_clip_norm if self.adaptive_quantile is not None else None
        return NoisySum(weights, self.clip_norm, self.noise_multiplier * self.clip_norm, self.expected_clients,
                        self.generator, on_finish=adapt)

    def _adapt_clip_norm(self, aggregation: NoisySum) -> None:
        """Geometric update towards the target quantile from a privatized count (Andrew et al. 2021)."""
        noisy = aggregation.centred_bits + float(gaussian_noise(1, self.clipped_count_stddev, self.generator)[0])
        below = noisy / self.expected_clients + 0.5  # noisy fraction of updates within the clip norm
        self.clip_norm *= math.exp(-self.clip_learning_rate * (below - self.adaptive_quantile))
        self.set_local(clip_norm=self.clip_norm)

    def can_continue(self, next_round: int) -> bool:
        if not (self.stop_at_budget and self.target_epsilon is not None):
            return True
        return self.accountant.epsilon_after(self.accountant.steps + 1) <= self.target_epsilon

    def round_metrics(self) -> dict[str, Any]:
        return {"epsilon": self.accountant.epsilon(), "clip_norm": self._round_clip_norm}

    def privacy_summary(self) -> dict[str, Any]:
        """What summary.json states about the guarantee."""
        return {**self.accountant.summary(), "clip_norm": self.clip_norm, "dp": "central"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.clip_norm = float(state["clip_norm"])


class LocalDPFedAvg(FedAvg):
    """Local DP for an untrusted server: each client clips to C and adds N(0, (z C)^2) before sending.

    The server only averages (uniformly: sample counts are not privatized, so they are not used).
    The guarantee is per client and per release: replacing a client's data moves its clipped
    update by at most 2C, so each round it takes part in is a Gaussian mechanism with noise
    multiplier z / 2 on that sensitivity; the accountant composes every round (the server knows
    who took part, so there is no amplification by sampling).
    """

    name = "local-dp-fedavg"
    secure_weighting = "uniform"

    def __init__(self, local: LocalConfig | None = None, *, clip_norm: float, noise_multiplier: float,
                 delta: float, accountant: str = "rdp", noise_seed: int | None = None) -> None:
        if clip_norm <= 0 or noise_multiplier <= 0:
            raise ConfigError("--dp local needs --clip-norm > 0 and --noise-multiplier > 0")
        super().__init__(replace(local or LocalConfig(), clip_norm=clip_norm,
                                 local_noise_std=noise_multiplier * clip_norm, noise_seed=noise_seed))
        self.clip_norm, self.noise_multiplier = clip_norm, noise_multiplier
        self.accountant = PrivacyAccountant(noise_multiplier=noise_multiplier / 2, sampling_rate=1.0, delta=delta,
                                            kind=accountant)

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        self.accountant.step()
        return UniformMean(weights)

    def round_metrics(self) -> dict[str, Any]:
        return {"epsilon": self.accountant.epsilon()}

    def privacy_summary(self) -> dict[str, Any]:
        return {**self.accountant.summary(), "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "accounted_noise_multiplier": self.noise_multiplier / 2, "dp": "local",
                "epsilon_is": "per client, replace-one (sensitivity 2C), composed over every round"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])


class UniformMean(Aggregation):
    """global + mean of the received updates, each counted once."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights
        self._mean = WeightedMean()

    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        self._mean.add(update, 1.0)

    def add_sum(self, weighted_sum: torch.Tensor, total_weight: float, count: int, extras: dict[str, int]) -> None:
        self._mean.add_sum(weighted_sum, float(count), count)

    @property
    def count(self) -> int:
        return self._mean.count

    def finish(self) -> torch.Tensor:
        return self.weights + self._mean.mean()
