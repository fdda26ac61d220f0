"""Update transforms: the client half of the pipeline (clip, local noise, compress), applied in order.

A transform is registered by name (``@register("transform", name)``) with its own Config. It works
on *every* uplink array jointly (SCAFFOLD's control delta is clipped and noised with the update).
``sum_compatible`` says whether the server may see only a sum of transformed updates (secure
aggregation and HE refuse transforms that are not). ``privacy`` transforms are part of a
client's own policy: a task may request them, but a client refuses a request weaker than its policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import Arrays
from fedlearn.registry import NoConfig, config_from_fields, lookup

if TYPE_CHECKING:
    from fedlearn.privacy.dp import PrivacyRandom


@dataclass
class TransformContext:
    """What a client transform may use: who and which round, and the generator its privacy noise comes from."""

    client_id: str
    round: int
    noise: PrivacyRandom | None = None


class UpdateTransform:
    """Base transform: the identity."""

    Config: ClassVar[type] = NoConfig
    sum_compatible: ClassVar[bool] = True
    privacy: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    @property
    def name(self) -> str:
        return type(self).registered_name

    def client(self, arrays: Arrays, metrics: dict[str, float], ctx: TransformContext) -> Arrays:
        """The arrays after this transform (``metrics`` may gain or lose entries)."""
        return arrays

    def weaker_than(self, other: UpdateTransform) -> bool:
        """True when this (requested) transform protects less than ``other`` (the client's policy)."""
        return False

    def request(self) -> dict[str, Any]:
        """How a task asks for this transform: its name and settings."""
        return {"name": self.name, **asdict(self.config)}


def joint_norm(arrays: Arrays) -> float:
    """The L2 norm of all floating arrays together (float64)."""
    total = 0.0
    for t in arrays.values():
        if t.is_floating_point():
            total += float(torch.linalg.vector_norm(t.to(torch.float64))) ** 2
    return math.sqrt(total)


def build_transforms(requests: Any) -> list[UpdateTransform]:
    """Transforms from a task's ``config["transforms"]`` list of {"name": ..., settings}; malformed is refused."""
    if requests is None:
        return []
    if not isinstance(requests, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                 for r in requests):
        raise InvalidUpdateError("task transforms must be a list of {name, settings}; the server must use fedlearn")
    out = []
    for request in requests:
        cls = lookup("transform", request["name"])
        out.append(cls(config_from_fields("transform", cls, {k: v for k, v in request.items() if k != "name"})))
    return out
