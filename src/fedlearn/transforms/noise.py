"""Gaussian noise added by the client itself (local DP): the server never sees an unnoised value."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedlearn.errors import ConfigError
from fedlearn.privacy.dp import gaussian_noise
from fedlearn.protocol.messages import Arrays
from fedlearn.registry import positive, register
from fedlearn.transforms.base import TransformContext, UpdateTransform


@register("transform", "gaussian")
class GaussianNoise(UpdateTransform):
    """Add N(0, std^2) to every floating uplink value; drops ``below_clip`` (nothing unnoised leaves).

    The noise comes from the context's generator: the OS's CSPRNG, or the run seed only under the
    simulation-only seeded-privacy switch.
    """

    privacy = True

    @dataclass(frozen=True)
    class Config:
        std: float = field(default=0.0, metadata={"flag": "local_noise_std",
                                                  "help": "std of the Gaussian noise each client adds (local DP)"})

        def validate(self) -> None:
            positive("local_noise_std", self.std)

    def client(self, arrays: Arrays, metrics: dict[str, float], ctx: TransformContext) -> Arrays:
        if ctx.noise is None:
            raise ConfigError("local noise needs a privacy noise generator on the client")
        metrics.pop("below_clip", None)
        out = {}
        for name in sorted(arrays):
            value = arrays[name]
            if value.is_floating_point():
                noise = gaussian_noise(value.numel(), self.config.std, ctx.noise).view(value.shape)
                value = (value.double() + noise).to(value.dtype)
            out[name] = value
        return out

    def weaker_than(self, other: UpdateTransform) -> bool:
        return isinstance(other, GaussianNoise) and self.config.std < other.config.std
