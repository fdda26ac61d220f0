"""L2 clipping of a client's uplink arrays, jointly (DP-FedAvg's sensitivity bound)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlearn.protocol.messages import Arrays
from fedlearn.registry import positive, register
from fedlearn.transforms.base import TransformContext, UpdateTransform, joint_norm


@register("transform", "clip")
class Clip(UpdateTransform):
    """Scale every floating uplink array by min(1, norm / ||all arrays||); report whether it was within.

    ``below_clip`` (1.0 or 0.0) feeds adaptive clipping's quantile estimate (Andrew et al., 2021).
    """

    privacy = True

    @dataclass(frozen=True)
    class Config:
        norm: float = field(default=1.0, metadata={"flag": "clip_norm", "help": "L2 bound on each client's update"})

        def validate(self) -> None:
            positive("clip_norm", self.norm)

    def client(self, arrays: Arrays, metrics: dict[str, float], ctx: TransformContext) -> Arrays:
        norm = joint_norm(arrays)
        metrics["below_clip"] = float(norm <= self.config.norm)
        if norm <= self.config.norm or norm == 0.0:
            return arrays
        scale = self.config.norm / norm
        return {k: (v * scale if v.is_floating_point() else v) for k, v in arrays.items()}

    def weaker_than(self, other: UpdateTransform) -> bool:
        return isinstance(other, Clip) and self.config.norm > other.config.norm
