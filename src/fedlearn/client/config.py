"""The local-training hyper-parameters a TrainTask carries, parsed from the task's plain config."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LocalConfig:
    """What a client needs to run its local work for one round.

    ``mode`` is ``"delta"`` (train ``local_epochs`` epochs and return new - global, FedAvg and
    FedProx) or ``"gradient"`` (return one full-batch gradient at the global weights, FedSGD).
    ``mu`` is FedProx's proximal coefficient; 0 disables the term. ``clip_norm`` > 0 clips the
    update to that L2 norm before it leaves the client (the first client-side transform, DP);
    ``local_noise_std`` > 0 then adds N(0, std^2) noise on the client (local DP), drawn from the
    OS's CSPRNG unless ``noise_seed`` is set (tests only). ``dpsgd_clip`` > 0 trains with DP-SGD:
    per-example clipping to that norm and noise multiplier ``dpsgd_noise`` on Poisson batches.
    """

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    mu: float = 0.0
    mode: str = "delta"
    seed: int = 0
    eval_batch_size: int = 512
    clip_norm: float = 0.0
    local_noise_std: float = 0.0
    noise_seed: int | None = None
    dpsgd_clip: float = 0.0
    dpsgd_noise: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocalConfig:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
