"""Fixed-point encoding of weighted updates into Z_{2^bits}, sized so that n clients cannot overflow.

A client's vector is [r * clip(u) quantized, n_k, extra counts...] with r = n_k / max_weight:
the update part is stochastically rounded onto ``levels`` steps across [-clip, clip] (unbiased),
the integer part (sample count, adaptive-clipping bits) is carried exactly. The server divides the
dequantized sum by the exact total weight, so sample weighting is exact up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError
from fedlearn.privacy.secagg.crypto import mask_dtype


@dataclass(frozen=True)
class FixedPoint:
    """How ``clients`` vectors of ``length`` update values and ``extras`` integers sum in Z_{2^bits}."""

    bits: int
    clip: float
    clients: int
    max_weight: int
    length: int
    extras: int = 1  # the sample count; adaptive clipping adds a "within the clip norm" bit

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 64:
            raise ConfigError(f"--secagg-bits must be between 8 and 64; got {self.bits}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"--secagg-clip must be a positive number; got {self.clip}")
        if self.max_weight < 1:
            raise ConfigError(f"--secagg-max-weight must be >= 1; got {self.max_weight}")
        if self.clients * self.max_weight > self.modulus - 1:
            raise ConfigError(f"{self.clients} clients of up to {self.max_weight} examples overflow "
                              f"{self.bits}-bit secure sums; raise --secagg-bits or lower --secagg-max-weight")
        if self.levels < 2:
            raise ConfigError(f"{self.bits} bits leave no quantization levels for {self.clients} clients; "
                              "raise --secagg-bits")

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def size(self) -> int:
        """Integers each client masks: the update and its counts."""
        return self.length + self.extras

    @property
    def levels(self) -> int:
        """Quantization steps per coordinate: the sum of ``clients`` values in [0, levels] stays below 2^bits."""
        return (self.modulus - 1) // self.clients

    @property
    def step(self) -> float:
        return 2 * self.clip / self.levels

    def error_bound(self, count: int) -> float:
        """Largest absolute error, per coordinate, of ``decode``'s weighted sum of ``count`` in-range updates.

        Stochastic rounding moves each client's value by less than one step, scaled back by max_weight.
        """
        return count * self.step * self.max_weight

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FixedPoint:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__})

    def encode(self, update: np.ndarray, weight: int, extras: list[int], rng: np.random.Generator) -> np.ndarray:
        """The integer vector a client masks: its weighted, clipped, stochastically rounded update and counts."""
        if not 0 < weight <= self.max_weight:
            raise ConfigError(f"this client has {weight} examples, more than --secagg-max-weight "
                              f"{self.max_weight}; raise it to at least the largest client's count")
        if len(extras) != self.extras - 1:
            raise ValueError(f"expected {self.extras - 1} extra counts, got {len(extras)}")
        scaled = np.clip(np.asarray(update, dtype=np.float64), -self.clip, self.clip) * (weight / self.max_weight)
        position = (scaled + self.clip) * (self.levels / (2 * self.clip))
        quantized = np.floor(position + rng.random(position.shape))
        np.clip(quantized, 0, self.levels, out=quantized)
        dtype = mask_dtype(self.bits)
        out = np.empty(self.length + self.extras, dtype=dtype)
        out[: self.length] = quantized.astype(dtype)
        out[self.length :] = np.asarray([weight, *extras], dtype=dtype)
        return out

    def decode(self, total: np.ndarray, count: int) -> tuple[np.ndarray, int, list[int]]:
        """(sum_k n_k clip(u_k) in float64, sum_k n_k, summed extras) from the unmasked sum of ``count`` vectors."""
        values = total[: self.length].astype(np.float64) * self.step - count * self.clip
        counts = [int(v) for v in total[self.length :]]
        return values * self.max_weight, counts[0], counts[1:]
