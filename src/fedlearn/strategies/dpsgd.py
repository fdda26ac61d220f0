"""FedAvg whose clients train with DP-SGD: a sample-level guarantee for every client's examples."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from fedlearn.client.config import LocalConfig
from fedlearn.client.dpsgd import steps_per_round
from fedlearn.errors import ConfigError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.protocol.messages import TrainResult
from fedlearn.strategies.base import Aggregation
from fedlearn.strategies.fedavg import FedAvg, WeightedUpdateAggregation


class DPSGDFedAvg(FedAvg):
    """Clients clip per-example gradients to C and add N(0, (z C)^2) per step (Abadi et al., 2016).

    The server keeps one accountant per client: each accepted update adds that client's local
    steps, each a Gaussian mechanism on a Poisson sample of rate B / n_k. ``epsilon`` in the
    metrics is the largest over clients (the guarantee every example has).
    """

    name = "dpsgd-fedavg"
    secure_weighting = None  # per-client accountants need each client's sample count, which a secure sum hides

    def __init__(self, local: LocalConfig | None = None, *, clip_norm: float, noise_multiplier: float,
                 delta: float, accountant: str = "rdp", noise_seed: int | None = None) -> None:
        if clip_norm <= 0 or noise_multiplier <= 0:
            raise ConfigError("--dp dpsgd needs --clip-norm > 0 and --noise-multiplier > 0")
        super().__init__(replace(local or LocalConfig(), dpsgd_clip=clip_norm, dpsgd_noise=noise_multiplier,
                                 noise_seed=noise_seed))
        self.clip_norm, self.noise_multiplier, self.delta, self.kind = clip_norm, noise_multiplier, delta, accountant
        self.accountants: dict[str, PrivacyAccountant] = {}

    def _accountant(self, client_id: str, num_examples: int) -> PrivacyAccountant:
        if client_id not in self.accountants:
            rate = min(1.0, self.local.batch_size / num_examples)
            self.accountants[client_id] = PrivacyAccountant(
                noise_multiplier=self.noise_multiplier, sampling_rate=rate, delta=self.delta, kind=self.kind)
        return self.accountants[client_id]

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        return _AccountedUpdates(weights, self._account)

    def _account(self, result: TrainResult) -> None:
        """An accepted update released this client's local DP-SGD steps."""
        steps = steps_per_round(result.num_examples, self.local.batch_size, self.local.local_epochs)
        self._accountant(result.client_id, result.num_examples).step(steps)

    def epsilon(self) -> float:
        return max((a.epsilon() for a in self.accountants.values()), default=0.0)

    def round_metrics(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon()}

    def privacy_summary(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "accountant": self.kind, "dp": "dpsgd",
                "epsilon_is": "per example, the largest over clients"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountants": {k: a.state_dict() for k, a in self.accountants.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountants = {k: PrivacyAccountant.from_state_dict(v) for k, v in state["accountants"].items()}


class _AccountedUpdates(WeightedUpdateAggregation):
    """FedAvg's weighted mean that also reports each accepted result to the strategy's accountants."""

    def __init__(self, weights: torch.Tensor, on_add: Callable[[TrainResult], None]) -> None:
        super().__init__(weights, 1.0)
        self.on_add = on_add

    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        super().add(result, update)
        self.on_add(result)
