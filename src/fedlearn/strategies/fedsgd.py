"""FedSGD: one full-batch gradient per client; w <- w - lr * sum_k (n_k / n) g_k (the seed's formula)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from fedlearn.client.config import LocalConfig
from fedlearn.strategies.base import Aggregation, Strategy
from fedlearn.strategies.fedavg import WeightedUpdateAggregation


class FedSGD(Strategy):
    """The server applies the step with the configured ``lr``; clients only compute gradients."""

    name = "fedsgd"
    secure_weighting = "examples"

    def __init__(self, local: LocalConfig | None = None) -> None:
        super().__init__(replace(local or LocalConfig(), mode="gradient"))

    def set_local(self, **changes: Any) -> None:
        super().set_local(**changes)
        self.local = replace(self.local, mode="gradient")

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        return WeightedUpdateAggregation(weights, -self.local.lr)
