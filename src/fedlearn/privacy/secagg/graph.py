"""Who masks with whom: everyone (SecAgg) or k random neighbours (SecAgg+, Bell et al. 2020)."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence

SECURITY_BITS = 40  # Bell et al.'s sigma: a client's input is exposed with probability at most 2^-40
CORRECTNESS_BITS = 20  # eta: a round fails to unmask (and reveals nothing) with probability at most 2^-20
MAX_DEGREE = 512  # past this SecAgg+ saves little over SecAgg's complete graph: the search stops there


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeometric_tail(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[at least ``at_least`` marked among ``draws`` taken without replacement from ``population``]."""
    top = min(marked, draws)
    if at_least > top:
        return 0.0
    denominator = _log_choose(population, draws)
    terms = [_log_choose(marked, j) + _log_choose(population - marked, draws - j) - denominator
             for j in range(max(at_least, draws - (population - marked)), top + 1)]
    peak = max(terms)
    return min(1.0, math.exp(peak) * sum(math.exp(t - peak) for t in terms))


@functools.cache
def secagg_plus_parameters(n: int, corrupt: float, dropout: float, *, sigma: int = SECURITY_BITS,
                           eta: int = CORRECTNESS_BITS) -> tuple[int, int] | None:
    """The fewest neighbours k (even) and a threshold t > (k + 1) / 2 of the k + 1 share holders for which SecAgg+
    on ``n`` clients holds, or None when only the complete graph (SecAgg) does.

    The model (Bell et al. 2020, with our own union bounds): a ``corrupt`` fraction of the clients colludes with the
    server and is fixed before the graph is drawn; a ``dropout`` fraction drops at random; the graph is a Harary
    graph over a fresh random order, so each client's k neighbours are a uniformly random k-subset of the others.
    Security (2^-sigma, split in two halves): no honest client has t corrupt neighbours, who could rebuild both of
    its secrets (n * P[hypergeometric >= t]); and no run of k/2 consecutive corrupt or dropped clients on the ring
    cuts the honest survivors into groups whose partial sums the server would learn (n * C(m, k/2) / C(n, k/2)).
    Correctness (2^-eta): every client keeps t surviving neighbours (n * P[more than k - t neighbours dropped]).
    k is searched up to ``MAX_DEGREE``.
    """
    bad, gone = math.floor(corrupt * n), math.floor(dropout * n)
    half_risk = 2.0 ** -(sigma + 1)
    for k in range(2, min(n - 1, MAX_DEGREE + 1), 2):
        run, either = k // 2, bad + gone
        cut = 0.0 if run > either else n * math.exp(_log_choose(either, run) - _log_choose(n, run))
        if cut > half_risk:
            continue
        # the smallest t > (k + 1) / 2 that exposes no one: exposure falls as t grows, and a larger t only makes
        # correctness worse, so it is the one to try
        low, high = (k + 1) // 2 + 1, k + 1
        while low < high:
            mid = (low + high) // 2
            if n * hypergeometric_tail(n - 1, bad, k, mid) <= half_risk:
                high = mid
            else:
                low = mid + 1
        if low <= k and n * hypergeometric_tail(n - 1, gone, k, k - low + 1) <= 2.0 ** -eta:
            return k, low
    return None


def neighbour_graph(client_ids: Sequence[str], degree: int | None, seed: int | None) -> dict[str, set[str]]:
    """A symmetric graph: complete when ``degree`` is None or >= n - 1, else a random k-regular ring.

    The ring is a Harary-style circulant over a seeded random permutation: each client is joined
    to the k/2 clients on either side, so every client has exactly k neighbours (k rounded up to even). The order
    comes from the OS's CSPRNG, or from ``seed`` under the simulation-only seeded-privacy switch.
    """
    ids = list(client_ids)
    n = len(ids)
    if degree is None or degree >= n - 1:
        return {c: set(ids) - {c} for c in ids}
    if degree < 2:
        raise ValueError("a SecAgg+ graph needs at least 2 neighbours per client")
    half = (degree + 1) // 2
    order = sorted(ids)
    (random.SystemRandom() if seed is None else random.Random(seed)).shuffle(order)
    graph: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(order):
        for step in range(1, half + 1):
            other = order[(i + step) % n]
            graph[c].add(other)
            graph[other].add(c)
    return graph
