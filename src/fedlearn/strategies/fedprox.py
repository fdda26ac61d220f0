"""FedProx (Li et al., 2020): FedAvg whose clients add mu/2 ||w - w_global||^2 to their loss."""

from __future__ import annotations

from dataclasses import replace

from fedlearn.client.config import LocalConfig
from fedlearn.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """Aggregates like FedAvg; the proximal term lives in the client's local objective."""

    name = "fedprox"

    def __init__(self, local: LocalConfig | None = None, mu: float = 0.01) -> None:
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        super().__init__(replace(local or LocalConfig(), mu=mu))
