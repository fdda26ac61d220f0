"""Running weighted mean of vectors: each update is folded in as it arrives, none are kept."""

from __future__ import annotations

import torch


class WeightedMean:
    """Accumulates sum_k w_k v_k and sum_k w_k in float64, so weights of any size stay exact."""

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, vector: torch.Tensor, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if self._sum is None:
            self._sum = vector.to(torch.float64) * weight
        else:
            self._sum.add_(vector, alpha=weight)  # promoted to float64 inside the kernel
        self.total_weight += weight
        self.count += 1

    def add_sum(self, weighted_sum: torch.Tensor, total_weight: float, count: int) -> None:
        """Fold in sum_k w_k v_k over ``count`` vectors at once (what secure aggregation reveals)."""
        if total_weight <= 0 or count <= 0:
            raise ValueError(f"a summed contribution needs positive weight and count, got {total_weight}, {count}")
        summed = weighted_sum.to(torch.float64)
        self._sum = summed.clone() if self._sum is None else self._sum.add_(summed)
        self.total_weight += total_weight
        self.count += count

    def mean(self) -> torch.Tensor:
        """sum_k w_k v_k / sum_k w_k as float32."""
        if self._sum is None:
            raise ValueError("no vector was added")
        return (self._sum / self.total_weight).to(torch.float32)
