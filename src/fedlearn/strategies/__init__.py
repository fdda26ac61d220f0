"""Server algorithms as compositions. Each module here registers its components itself; the registry
imports every module of this package (``fedlearn.registry``), so a new algorithm is one new file."""

from __future__ import annotations

from fedlearn.protocol.local import LocalConfig
from fedlearn.strategies.base import Aggregator, MeanAggregator, PoissonSampler, Sampler, ServerState, Strategy
from fedlearn.strategies.fedavg import FedAvg
from fedlearn.strategies.fedopt import FedAdagradStrategy, FedAdamStrategy, FedAvgMStrategy, FedYogiStrategy
from fedlearn.strategies.fedprox import FedProx
from fedlearn.strategies.fedsgd import FedSGD
from fedlearn.strategies.scaffold import Scaffold


def build_strategy(name: str, local: LocalConfig | None = None, *, sampler: Sampler | None = None,
                   **values: object) -> Strategy:
    """The registered algorithm ``name`` with flat settings (``mu=0.01``, ``server_lr=0.1``, ...), for Python users."""
    from fedlearn.registry import lookup, make_config

    cls = lookup("strategy", name)  # loads every registered component
    return cls.from_values(values, local=local or LocalConfig(), sampler=sampler or Sampler(),
                           config=make_config("strategy", cls, values))


def algorithms() -> tuple[str, ...]:
    """The registered algorithm names (``--algorithm``)."""
    from fedlearn.registry import names

    return names("strategy")


__all__ = ["Aggregator", "FedAdagradStrategy", "FedAdamStrategy", "FedAvg", "FedAvgMStrategy", "FedProx", "FedSGD",
           "FedYogiStrategy", "MeanAggregator", "PoissonSampler", "Sampler", "Scaffold", "ServerState", "Strategy",
           "algorithms", "build_strategy"]
