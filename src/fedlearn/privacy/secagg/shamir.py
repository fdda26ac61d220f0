"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Secrets here are 32-byte keys and seeds, so one field element holds a whole secret; any t
shares determine it and t - 1 shares are consistent with every possible secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 32-byte secret


def split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares of ``secret`` at the nonzero points ``xs``: the values of a random polynomial of degree t - 1."""
    xs = list(xs)
    if not 0 <= secret < PRIME:
        raise ValueError("secret must be a field element")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(xs)} shareholders")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and nonzero")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        value = 0
        for c in reversed(coefficients):  # Horner
            value = (value * x + c) % PRIME
        shares[x] = value
    return shares


def reconstruct(shares: Mapping[int, int]) -> int:
    """The polynomial's value at 0 by Lagrange interpolation through all given shares."""
    if not shares:
        raise ValueError("no shares")
    secret = 0
    points = list(shares.items())
    for i, (xi, yi) in enumerate(points):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return secret


def to_int(secret: bytes) -> int:
    return int.from_bytes(secret, "big")


def to_bytes(value: int, length: int = 32) -> bytes:
    """The ``length``-byte secret a reconstructed field element stands for."""
    if value >= 1 << (8 * length):
        raise ValueError("reconstructed value is not a secret of this length: too few or wrong shares")
    return value.to_bytes(length, "big")
