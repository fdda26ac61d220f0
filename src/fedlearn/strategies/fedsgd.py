"""FedSGD: one full-batch gradient per client; w <- w - lr * sum_k (n_k / n) g_k (the seed's formula)."""

from __future__ import annotations

from dataclasses import replace

from fedlearn.protocol.messages import Arrays
from fedlearn.registry import register
from fedlearn.strategies.base import ServerState, Strategy
from fedlearn.strategies.optimizers import ServerSGD


@register("strategy", "fedsgd")
class FedSGD(Strategy):
    """Clients return ``gradient``; the server steps with the local config's ``lr`` (the README's ``--lr``)."""

    name = "fedsgd"
    mode = "gradient"
    uplink = ("gradient",)

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        step = ServerSGD(replace(ServerSGD.Config(), lr=self.local.lr))
        return ServerState(step.step(state.weights, -aggregate["gradient"]), state.extras, state.version + 1)
