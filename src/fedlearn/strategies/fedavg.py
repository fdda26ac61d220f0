"""FedAvg (McMahan et al., 2017): average the clients' updates weighted by their sample counts."""

from __future__ import annotations

import torch

from fedlearn.protocol.messages import TrainResult
from fedlearn.strategies.aggregate import WeightedMean
from fedlearn.strategies.base import Aggregation, Strategy


class WeightedUpdateAggregation(Aggregation):
    """new = global + step * sum_k (n_k / n) u_k, with ``step`` = 1 for FedAvg and -lr for FedSGD."""

    def __init__(self, weights: torch.Tensor, step: float) -> None:
        self.weights = weights
        self.step = step
        self._mean = WeightedMean()

    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        self._mean.add(update, float(result.num_examples))

    def add_sum(self, weighted_sum: torch.Tensor, total_weight: float, count: int, extras: dict[str, int]) -> None:
        self._mean.add_sum(weighted_sum, total_weight, count)

    @property
    def count(self) -> int:
        return self._mean.count

    def finish(self) -> torch.Tensor:
        return self.weights + self.step * self._mean.mean()


class FedAvg(Strategy):
    """Clients train ``local_epochs`` epochs and send new - global; the server adds the weighted mean."""

    name = "fedavg"
    secure_weighting = "examples"

    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        return WeightedUpdateAggregation(weights, 1.0)
