"""FedAvg (McMahan et al., 2017): clients train locally and send new - global; the server averages by sample count."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlearn.registry import lookup, names, register
from fedlearn.strategies.base import Strategy


@register("strategy", "fedavg")
class FedAvg(Strategy):
    """The weighted mean update, applied by the server optimizer (``sgd`` with lr 1 is plain FedAvg)."""

    name = "fedavg"

    @dataclass(frozen=True)
    class Config:
        server_optimizer: str | None = field(default=None, metadata={
            "flag": "server_optimizer",
            "help": "server optimizer on the aggregated update: sgd (FedAvg), momentum, adam, yogi, adagrad "
                    "(default: the algorithm's own)"})

        def validate(self) -> None:
            if self.server_optimizer is not None and self.server_optimizer not in names("optimizer"):
                lookup("optimizer", self.server_optimizer)
