"""Server algorithms, by name."""

from __future__ import annotations

from fedlearn.client.config import LocalConfig
from fedlearn.errors import ConfigError
from fedlearn.strategies.base import Aggregation, Strategy
from fedlearn.strategies.fedavg import FedAvg
from fedlearn.strategies.fedprox import FedProx
from fedlearn.strategies.fedsgd import FedSGD

ALGORITHMS = ("fedavg", "fedsgd", "fedprox")


def build_strategy(name: str, local: LocalConfig | None = None, *, mu: float = 0.01) -> Strategy:
    """The strategy called ``name`` with the given local hyper-parameters."""
    if name == "fedavg":
        return FedAvg(local)
    if name == "fedsgd":
        return FedSGD(local)
    if name == "fedprox":
        return FedProx(local, mu=mu)
    raise ConfigError(f"--algorithm must be one of {', '.join(ALGORITHMS)}; got {name!r}")


__all__ = ["ALGORITHMS", "Aggregation", "FedAvg", "FedProx", "FedSGD", "Strategy", "build_strategy"]
