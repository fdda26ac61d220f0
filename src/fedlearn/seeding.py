"""Per-(round, client) seeds, so every runtime draws the same random numbers for the same work."""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed determined only by ``parts`` (e.g. run seed, round, client id)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
