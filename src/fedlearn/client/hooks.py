"""Client hooks: what an algorithm adds to local SGD (a proximal term, control variates, DP-SGD).

A hook is registered by name (``@register("hook", name)``) with its own Config; a task asks for
hooks by name in ``config["hooks"]`` ({name: settings}). The trainer calls ``begin`` once (read
the task's arrays and the client's state), ``grads`` at every step and ``end`` once (write the
client's new state and the arrays the result adds). ``grads`` must be pure tensor maths on lists
of tensors, with no in-place change and no Python branching on values, so a vectorized runtime can
run it under ``torch.func.vmap`` across clients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Arrays, TrainTask
from fedlearn.registry import NoConfig, config_from_fields, lookup, positive, register


@dataclass
class ParamLayout:
    """Where each trainable parameter sits in the model's flat vector (the ParamSpec order)."""

    names: list[str]
    slices: list[tuple[int, int]]
    shapes: list[torch.Size]
    numel: int

    def as_params(self, flat: torch.Tensor, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the trainable parameters."""
        flat = flat.to(device)
        return [flat[a:b].view(shape) for (a, b), shape in zip(self.slices, self.shapes)]

    def to_flat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """A full-length flat vector holding ``tensors`` at the parameters' places and zeros elsewhere."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        for (a, b), t in zip(self.slices, tensors):
            out[a:b] = t.detach().reshape(-1).to("cpu", torch.float32)
        return out


@dataclass
class HookContext:
    """What a hook sees of one client's round: the task, local config, the client's state and the layout."""

    task: TrainTask
    local: LocalConfig
    state: Mapping[str, torch.Tensor]
    layout: ParamLayout
    device: torch.device
    initial: list[torch.Tensor]
    new_state: Arrays = field(default_factory=dict)
    uplink: Arrays = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    num_examples: int = 0

    def array(self, name: str) -> torch.Tensor:
        """A named array of the task, checked to be a flat float vector of the model's length."""
        value = self.task.arrays.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() != self.layout.numel \
                or not value.is_floating_point():
            raise InvalidUpdateError(f"task for {self.task.client_id} lacks a {self.layout.numel}-value {name!r} "
                                     "array; the server's algorithm and this client's disagree")
        return value


class TrainHook:
    """Base hook: does nothing. Subclasses override what they need."""

    Config: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    def begin(self, ctx: HookContext) -> None:
        """Read the task's arrays and the client's state before the first step."""

    def grads(self, ctx: HookContext, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The gradients the optimizer applies at this step (pure tensor maths)."""
        return grads

    def batches(self, ctx: HookContext, dataset: Any,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]] | None:
        """Replace the trainer's mini-batches (DP-SGD's Poisson sampling); None keeps them."""
        return None

    def backward(self, ctx: HookContext, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """Set the parameters' .grad for one batch and return the batch's loss sum; None: plain backward."""
        return None

    def end(self, ctx: HookContext, params: list[torch.Tensor]) -> None:
        """After the last step: add uplink arrays, metrics and the client's new state."""


def build_hooks(requests: Any) -> list[TrainHook]:
    """The hooks a task asks for, in a fixed (sorted) order; an unknown or malformed request is refused."""
    if requests is None:
        return []
    if not isinstance(requests, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                 for k, v in requests.items()):
        raise InvalidUpdateError("task hooks must map hook names to settings; the server must use fedlearn")
    hooks = []
    for name in sorted(requests):
        cls = lookup("hook", name)
        hooks.append(cls(config_from_fields("hook", cls, requests[name])))
    return hooks


@register("hook", "prox")
class ProxHook(TrainHook):
    """FedProx (Li et al., 2020): the gradient of mu/2 ||w - w_global||^2 added to the data loss's."""

    @dataclass(frozen=True)
    class Config:
        mu: float = field(default=0.01, metadata={"flag": "mu", "help": "FedProx proximal coefficient"})

        def validate(self) -> None:
            positive("mu", self.mu, allow_zero=True)

    def grads(self, ctx: HookContext, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        mu = self.config.mu
        return [g + mu * (p.detach() - p0) for g, p, p0 in zip(grads, params, ctx.initial)]
