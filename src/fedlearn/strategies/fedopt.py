"""FedAvgM, FedAdam, FedYogi, FedAdagrad (Hsu et al. 2019; Reddi et al., ICLR 2021, Algorithm 2).

Each is FedAvg with another default server optimizer (``fedlearn.strategies.optimizers``);
``--server-lr``, ``--server-beta1``, ``--server-beta2``, ``--server-tau``, ``--server-momentum`` set it.
"""

from __future__ import annotations

from fedlearn.registry import register
from fedlearn.strategies.fedavg import FedAvg


@register("strategy", "fedavgm")
class FedAvgMStrategy(FedAvg):
    """FedAvg with server momentum."""

    name = "fedavgm"
    default_optimizer = "momentum"


@register("strategy", "fedadam")
class FedAdamStrategy(FedAvg):
    """FedAvg with the Adam server optimizer."""

    name = "fedadam"
    default_optimizer = "adam"


@register("strategy", "fedyogi")
class FedYogiStrategy(FedAvg):
    """FedAvg with the Yogi server optimizer."""

    name = "fedyogi"
    default_optimizer = "yogi"


@register("strategy", "fedadagrad")
class FedAdagradStrategy(FedAvg):
    """FedAvg with the Adagrad server optimizer."""

    name = "fedadagrad"
    default_optimizer = "adagrad"
