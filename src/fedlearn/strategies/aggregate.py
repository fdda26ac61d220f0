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

    def mean(self) -> torch.Tensor:
        """sum_k w_k v_k / sum_k w_k as float32."""
        if self._sum is None:
            raise ValueError("no vector was added")
        return (self._sum / self.total_weight).to(torch.float32)
