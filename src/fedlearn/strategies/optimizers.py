"""Server optimizers: turn a round's aggregated client update into the next global weights.

The server treats the aggregated update ``delta`` (new - old) as a pseudo-gradient and applies an optimizer to it.
``sgd`` with lr 1 is plain FedAvg (McMahan et al., 2017); ``momentum`` is FedAvgM (Hsu, Qi and Brown, "Measuring
the Effects of Non-Identical Data Distribution for Federated Visual Classification", 2019); ``adagrad``, ``adam`` and
``yogi`` are FedAdagrad, FedAdam and FedYogi from Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2 (no bias correction, as in the paper). State is kept in float64 so long runs do not drift; the returned
weights are float32 like the model.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedlearn.errors import CheckpointError, ConfigError, InvalidUpdateError
from fedlearn.registry import flag, in_range, positive, register

__all__ = ["FedAdagrad", "FedAdam", "FedAvgM", "FedYogi", "ServerOptimizer", "ServerSGD"]


# one help text per shared field: the registry merges fields of the same name into one flag
_LR = "server learning rate on the aggregated update (default 1 for sgd / momentum, i.e. FedAvg; 0.01 for adaptive)"
_BETA1 = "first-moment decay of the adaptive server optimizer, in [0, 1)"
_BETA2 = "second-moment decay of FedAdam / FedYogi, in (0, 1)"
_TAU = "adaptivity floor added to sqrt(v) by the adaptive server optimizer, > 0 (small: more adaptive)"


def _below_one(key: str, value: float) -> None:
    """Refuse ``value`` outside [0, 1): at 1 a moment never forgets (momentum diverges, beta1 never moves)."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{flag(key)} must be in [0, 1); got {value}")


def _help(text: str) -> dict[str, str]:
    """Field metadata carrying the flag's help text."""
    return {"help": text}


class ServerOptimizer(ABC):
    """Applies the round's aggregated update (``delta`` = new - old) to the global weights, keeping its own state.

    Subclasses name their per-coordinate state in ``moments``; those vectors are created (float64) on the first
    step, sized like ``delta``, and are what ``state_dict`` saves so a resumed run continues bit for bit.
    """

    Config: ClassVar[type]
    registered_name: ClassVar[str]
    moments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.steps = 0
        self._state: dict[str, torch.Tensor | None] = {name: None for name in self.moments}

    @abstractmethod
    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new global weights (a new float32 tensor) from ``weights`` and the update ``delta``; inputs untouched."""

    # ----- helpers for subclasses -----

    def _inputs(self, weights: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 copies of both vectors after checking they match each other and the stored state."""
        if not isinstance(weights, torch.Tensor) or not isinstance(delta, torch.Tensor):
            raise InvalidUpdateError("server optimizer needs tensors for the weights and the update")
        if weights.dim() != 1 or delta.dim() != 1:
            raise InvalidUpdateError(
                f"server optimizer needs flat vectors; got weights {tuple(weights.shape)}, update {tuple(delta.shape)}")
        if weights.numel() != delta.numel():
            raise InvalidUpdateError(
                f"the update has {delta.numel()} values but the model has {weights.numel()}")
        for name in self.moments:
            moment = self._state[name]
            if moment is not None and moment.numel() != delta.numel():
                raise InvalidUpdateError(
                    f"server optimizer state {name!r} has {moment.numel()} values but the update has "
                    f"{delta.numel()} (was it saved for another model?)")
        low, high = torch.aminmax(delta.detach())  # NaN propagates; cheaper than isfinite on the float64 copy
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            raise InvalidUpdateError("the aggregated update has non-finite values; the server optimizer refuses it")
        return weights.detach().to(dtype=torch.float64, copy=True), delta.detach().to(dtype=torch.float64, copy=True)

    def _moment(self, name: str, like: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """The state vector ``name``, created on first use as ``fill`` everywhere, sized like ``like``."""
        moment = self._state[name]
        if moment is None:
            moment = torch.full_like(like, fill, dtype=torch.float64)
            self._state[name] = moment
        elif moment.device != like.device:  # loaded on the CPU, stepping on an accelerator
            moment = moment.to(like.device)
            self._state[name] = moment
        return moment

    @staticmethod
    def _result(new: torch.Tensor) -> torch.Tensor:
        """Float32 weights from a float64 computation."""
        return new.to(torch.float32)

    # ----- checkpointing -----

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state: its name, step count and moment vectors (None before the first step)."""
        out: dict[str, Any] = {"optimizer": self.registered_name, "steps": self.steps}
        for name in self.moments:
            moment = self._state[name]
            out[name] = None if moment is None else moment.clone()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` gave; a CheckpointError if it is not such a state for this optimizer."""
        if not isinstance(state, dict):
            raise CheckpointError(f"server optimizer state must be a dict; got {type(state).__name__}")
        expected = {"optimizer", "steps", *self.moments}
        if set(state) != expected:
            raise CheckpointError(
                f"server optimizer state has keys {sorted(state)}; expected {sorted(expected)}")
        if state["optimizer"] != self.registered_name:
            raise CheckpointError(
                f"checkpoint holds server optimizer {state['optimizer']!r} but this run uses {self.registered_name!r}")
        steps = state["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise CheckpointError(f"server optimizer state 'steps' must be an integer >= 0; got {steps!r}")
        loaded: dict[str, torch.Tensor | None] = {}
        for name in self.moments:
            moment = state[name]
            if moment is not None:
                if not isinstance(moment, torch.Tensor) or moment.dim() != 1 or not moment.is_floating_point():
                    raise CheckpointError(f"server optimizer state {name!r} must be a flat float tensor or None")
                if not torch.isfinite(moment).all():
                    raise CheckpointError(f"server optimizer state {name!r} has non-finite values")
                moment = moment.detach().to(device="cpu", dtype=torch.float64, copy=True)
            loaded[name] = moment
        present = {m.numel() for m in loaded.values() if m is not None}
        if len(present) > 1 or (present and any(m is None for m in loaded.values())):
            raise CheckpointError("server optimizer state vectors are missing or differ in size")
        if self.moments and (steps == 0) != (not present):
            raise CheckpointError(f"server optimizer state says {steps} steps but its vectors disagree")
        self.steps = steps
        self._state = loaded


@register("optimizer", "sgd")
class ServerSGD(ServerOptimizer):
    """Plain server step ``w + lr * delta``; lr 1 is FedAvg."""

    @dataclass(frozen=True)
    class Config:
        """Settings of the plain server step."""

        lr: float = field(default=1.0, metadata=_help(_LR))

        def validate(self) -> None:
            """Refuse a learning rate that is not positive."""
            positive("server_lr", self.lr)

    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # float64 then one rounding: with lr 1 this equals the float32 sum w + delta bit for bit
        w, d = self._inputs(weights, delta)
        self.steps += 1
        if self.config.lr != 1.0:  # lr * d rounds once, as in w + lr * d; with lr 1 it is d itself
            d.mul_(self.config.lr)
        return self._result(w.add_(d))


@register("optimizer", "momentum")
class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al., 2019): server heavy-ball momentum ``m = momentum * m + delta; w + lr * m``."""

    moments = ("m",)

    @dataclass(frozen=True)
    class Config:
        """Settings of FedAvgM."""

        lr: float = field(default=1.0, metadata=_help(_LR))
        momentum: float = field(default=0.9, metadata=_help("server momentum of FedAvgM, in [0, 1) (0 is FedAvg)"))

        def validate(self) -> None:
            """Refuse a non-positive learning rate or a momentum outside [0, 1)."""
            positive("server_lr", self.lr)
            _below_one("server_momentum", self.momentum)

    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        w, d = self._inputs(weights, delta)
        m = self._moment("m", d)
        m.mul_(self.config.momentum).add_(d)
        self.steps += 1
        return self._result(w + self.config.lr * m)


class _Adaptive(ServerOptimizer):
    """Reddi et al. Algorithm 2: moments ``m`` and ``v`` (rule per subclass); step ``lr * m / (sqrt(v) + tau)``."""

    moments = ("m", "v")

    @abstractmethod
    def _update_v(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        """Update the second moment ``v`` in place from the squared update ``d2``."""

    def step(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        w, d = self._inputs(weights, delta)
        cfg = self.config
        m = self._moment("m", d)
        # v starts at tau^2 because Algorithm 2 requires v_{-1} >= tau^2 (its analysis uses that lower bound on v);
        # tau^2 is the least start it allows, so the start weighs as little as possible against the data's delta^2.
        v = self._moment("v", d, fill=cfg.tau**2)
        m.mul_(cfg.beta1).add_(d, alpha=1.0 - cfg.beta1)
        self._update_v(v, d * d)
        self.steps += 1
        return self._result(w + cfg.lr * m / (v.sqrt() + cfg.tau))


def _validate_adaptive(config: Any, beta2: bool) -> None:
    """The checks shared by the three adaptive optimizers' configs."""
    positive("server_lr", config.lr)
    _below_one("server_beta1", config.beta1)
    if beta2:
        in_range("server_beta2", config.beta2, 0.0, 1.0)
    positive("server_tau", config.tau)


@register("optimizer", "adagrad")
class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al., 2021): ``v = v + delta^2``."""

    @dataclass(frozen=True)
    class Config:
        """Settings of FedAdagrad."""

        lr: float = field(default=0.01, metadata=_help(_LR))
        beta1: float = field(default=0.9, metadata=_help(_BETA1))
        tau: float = field(default=1e-3, metadata=_help(_TAU))

        def validate(self) -> None:
            """Refuse a non-positive lr or tau, or beta1 outside [0, 1)."""
            _validate_adaptive(self, beta2=False)

    def _update_v(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.add_(d2)


@dataclass(frozen=True)
class _SecondMomentConfig:
    """Settings of FedAdam and FedYogi (the same four)."""

    lr: float = field(default=0.01, metadata=_help(_LR))
    beta1: float = field(default=0.9, metadata=_help(_BETA1))
    beta2: float = field(default=0.99, metadata=_help(_BETA2))
    tau: float = field(default=1e-3, metadata=_help(_TAU))

    def validate(self) -> None:
        """Refuse a non-positive lr or tau, beta1 outside [0, 1) or beta2 outside (0, 1)."""
        _validate_adaptive(self, beta2=True)


@register("optimizer", "adam")
class FedAdam(_Adaptive):
    """FedAdam (Reddi et al., 2021): ``v = beta2 * v + (1 - beta2) * delta^2``."""

    Config = _SecondMomentConfig

    def _update_v(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.mul_(self.config.beta2).add_(d2, alpha=1.0 - self.config.beta2)


@register("optimizer", "yogi")
class FedYogi(_Adaptive):
    """FedYogi (Reddi et al., 2021): ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``."""

    Config = _SecondMomentConfig

    def _update_v(self, v: torch.Tensor, d2: torch.Tensor) -> None:
        v.sub_((1.0 - self.config.beta2) * d2 * torch.sign(v - d2))

