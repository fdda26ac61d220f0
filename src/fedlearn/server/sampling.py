"""Seeded client sampling: the same (seed, round) picks the same clients in every runtime."""

from __future__ import annotations

import math

import numpy as np

from fedlearn.errors import ConfigError


def clients_per_round(num_clients: int, fraction: float, min_clients: int) -> int:
    """McMahan et al.'s m = max(ceil(C * K), min_clients), capped at K."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction must be in (0, 1]; got {fraction}")
    return min(num_clients, max(math.ceil(fraction * num_clients - 1e-9), min_clients, 1))


def sample_clients(client_ids: list[str], fraction: float, min_clients: int, seed: int, round: int) -> list[str]:
    """Pick clients for ``round`` uniformly without replacement; returned in registration order."""
    m = clients_per_round(len(client_ids), fraction, min_clients)
    if m == len(client_ids):
        return list(client_ids)
    rng = np.random.default_rng([seed, round])
    chosen = np.sort(rng.choice(len(client_ids), size=m, replace=False))
    return [client_ids[i] for i in chosen]


def poisson_sample(client_ids: list[str], rate: float, seed: int, round: int) -> list[str]:
    """Each client joins ``round`` independently with probability ``rate`` (what DP accounting assumes)."""
    if not 0 < rate <= 1:
        raise ConfigError(f"--fraction (the Poisson sampling rate) must be in (0, 1]; got {rate}")
    coins = np.random.default_rng([seed, round, 0x5EED]).random(len(client_ids))
    return [cid for cid, coin in zip(client_ids, coins) if coin < rate]
