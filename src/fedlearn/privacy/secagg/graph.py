"""Who masks with whom: everyone (SecAgg) or k random neighbours (SecAgg+, Bell et al. 2020)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def default_degree(num_clients: int) -> int:
    """About 2 log2 n neighbours, even, and never more than n - 1: SecAgg+'s polylogarithmic cost."""
    k = 2 * math.ceil(math.log2(max(num_clients, 2)))
    return min(k + (k % 2), num_clients - 1)


def neighbour_graph(client_ids: Sequence[str], degree: int | None, seed: int) -> dict[str, set[str]]:
    """A symmetric graph: complete when ``degree`` is None or >= n - 1, else a random k-regular ring.

    The ring is a Harary-style circulant over a seeded random permutation: each client is joined
    to the k/2 clients on either side, so every client has exactly k neighbours (k rounded up to even).
    """
    ids = list(client_ids)
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {c: set(ids) - {c} for c in ids}
    if degree < 2:
        raise ValueError("a SecAgg+ graph needs at least 2 neighbours per client")
    half = (degree + 1) // 2
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    graph: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(order):
        for step in range(1, half + 1):
            other = order[(i + step) % n]
            graph[c].add(other)
            graph[other].add(c)
    return graph
