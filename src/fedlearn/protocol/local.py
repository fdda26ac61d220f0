"""The local-training hyper-parameters every TrainTask carries (the keys of its plain config).

Only training itself lives here; what an algorithm adds (FedProx's mu, SCAFFOLD's controls, DP-SGD)
travels as the task's ``hooks`` and ``transforms`` requests, each read by its own component.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from fedlearn.errors import ConfigError

MODES = ("delta", "gradient")


@dataclass(frozen=True)
class TrainingKeys:
    """The local-SGD settings a run configures and every task carries: written once, here.

    ``RunConfig`` (the run's flat YAML keys and flags) and ``LocalConfig`` (what a task carries) both
    extend it, so the two cannot drift apart in names, types or defaults.
    """

    local_epochs: int = 2
    batch_size: int = 10
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class LocalConfig(TrainingKeys):
    """One round of a client's local work.

    ``mode`` is ``"delta"`` (train ``local_epochs`` epochs and return new - global, FedAvg and its
    kin) or ``"gradient"`` (one full-batch gradient at the global weights, FedSGD). ``seed`` fixes
    the batch order and model randomness of this (round, client).
    """

    mode: str = "delta"
    seed: int = 0
    eval_batch_size: int = 512

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalConfig:
        """The local config in a task's plain config (other keys belong to other components)."""
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        config = cls(**known)
        config.check()
        return config

    def check(self) -> None:
        """Refuse values no client should train with (a hostile or mistaken task)."""
        for name in ("local_epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"local {name} must be a positive integer; got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ConfigError(f"local {name} must be a finite number >= 0; got {value!r}")
        if self.mode not in MODES:
            raise ConfigError(f"local mode must be one of {', '.join(MODES)}; got {self.mode!r}")
