"""FedProx (Li et al., 2020): FedAvg whose clients add mu/2 ||w - w_global||^2 to their local objective."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fedlearn.client.hooks import ProxHook
from fedlearn.registry import register
from fedlearn.strategies.fedavg import FedAvg


@register("strategy", "fedprox")
class FedProx(FedAvg):
    """Aggregates like FedAvg; the proximal term is the client hook ``prox``."""

    name = "fedprox"

    Config = ProxHook.Config

    def hooks(self) -> dict[str, dict[str, Any]]:
        return {"prox": asdict(self.config)}
