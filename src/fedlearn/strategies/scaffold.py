"""SCAFFOLD (Karimireddy et al., ICML 2020) with option II control variates.

The server keeps the control ``c`` in its state and sends it with the weights; each client keeps
its own control ``c_i`` in its client state store, corrects every local gradient by ``c - c_i``,
and after K local steps at learning rate lr sets ``c_i+ = c_i - c + (x - y_i) / (K lr)``, returning
``control_delta = c_i+ - c_i`` beside its update. The server averages both (weighted as the
updates are, which is the paper's uniform mean when clients hold equal shares) and moves
``c <- c + (|S| / N) mean(control_delta)``. With zero controls a round is exactly FedAvg's.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlearn.client.hooks import HookContext, TrainHook
from fedlearn.protocol.messages import Arrays
from fedlearn.registry import register
from fedlearn.strategies.base import ServerState
from fedlearn.strategies.fedavg import FedAvg


@register("hook", "scaffold")
class ScaffoldHook(TrainHook):
    """Client side: gradient correction c - c_i, and the new control c_i+ stored in the client's state."""

    def begin(self, ctx: HookContext) -> None:
        self.server_control = ctx.array("control")
        own = ctx.state.get("control")
        self.own_control = own if own is not None else torch.zeros_like(self.server_control)
        self.correction = ctx.layout.as_params(self.server_control - self.own_control, ctx.device)

    def grads(self, ctx: HookContext, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [g + c for g, c in zip(grads, self.correction)]

    def end(self, ctx: HookContext, params: list[torch.Tensor]) -> None:
        if ctx.steps == 0:
            ctx.uplink["control_delta"] = torch.zeros_like(self.own_control)
            return
        x = ctx.layout.to_flat(ctx.initial)
        y = ctx.layout.to_flat(params)
        mask = ctx.layout.to_flat([torch.ones_like(p) for p in params])  # controls live on parameters only
        new = (self.own_control - self.server_control + (x - y) / (ctx.steps * ctx.local.lr)) * mask
        ctx.uplink["control_delta"] = new - self.own_control
        ctx.new_state["control"] = new


@register("strategy", "scaffold")
class Scaffold(FedAvg):
    """FedAvg plus control variates: ``control`` down, ``control_delta`` up, ``c`` in the server state."""

    name = "scaffold"
    uplink = ("update", "control_delta")

    def hooks(self) -> dict[str, dict[str, Any]]:
        return {"scaffold": {}}

    def task_arrays(self, state: ServerState) -> Arrays:
        if "control" not in state.extras:
            state.extras["control"] = torch.zeros_like(state.weights)
        return {"weights": state.weights, "control": state.extras["control"]}

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        new = super().apply(state, aggregate, count)
        share = count / max(self.sampler.population, 1)
        control = state.extras.get("control", torch.zeros_like(state.weights))
        new.extras = {**state.extras, "control": control + share * aggregate["control_delta"]}
        return new
