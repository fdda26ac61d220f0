"""The face-specific part of a TrainTask's config: public hyper-parameters only, never a template."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from fedlearn.errors import ConfigError

TEMPLATE_MODES = ("learned", "codebook")


@dataclass(frozen=True)
class FaceConfig:
    """How a party trains its private identity head with the federated backbone.

    ``templates="learned"``: each party's head is a trainable matrix, one row per person it knows
    (the plain baseline). ``"codebook"``: each party's people are pinned to secret rows of a public,
    data-free orthonormal codebook drawn from ``codebook_seed``; party ``pool`` of ``pools`` may only
    draw rows from its own slice, and with ``cross_pool_negatives`` every other row is a negative.
    ``scale`` and ``margin`` are CosFace's s and m.
    """

    templates: str = "learned"
    scale: float = 16.0
    margin: float = 0.2
    codebook_seed: int = 0
    codebook_size: int = 0  # 0: as many rows as the embedding has dimensions
    pool: int = 0
    pools: int = 1
    cross_pool_negatives: bool = True
    augment: bool = True

    def __post_init__(self) -> None:
        if self.templates not in TEMPLATE_MODES:
            raise ConfigError(f"face templates must be one of {', '.join(TEMPLATE_MODES)}, got {self.templates!r}")
        if self.scale <= 0 or not 0 <= self.margin < 1:
            raise ConfigError(f"CosFace needs scale > 0 and 0 <= margin < 1, got {self.scale} and {self.margin}")
        if self.pools < 1 or not 0 <= self.pool < self.pools:
            raise ConfigError(f"codebook pool {self.pool} is outside 0..{self.pools - 1}; the strategy assigns pools")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceConfig:
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown face setting {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)
