"""Seeded client sampling: reproducible per (seed, round), m = max(ceil(C*K), min_clients).

The samplers are the strategy's (``fedlearn.strategies.base.Sampler`` / ``PoissonSampler``).
"""

from __future__ import annotations

import math

import pytest

from fedlearn.errors import ConfigError
from fedlearn.strategies import FedAvg
from fedlearn.strategies.base import PoissonSampler, Sampler

IDS = [f"client-{i:03d}" for i in range(100)]


def sample_clients(ids: list[str], fraction: float, min_clients: int, seed: int, round: int) -> list[str]:
    return Sampler(fraction, min_clients).sample(ids, round, seed)


def clients_per_round(k: int, fraction: float, min_clients: int) -> int:
    return len(Sampler(fraction, min_clients).sample([str(i) for i in range(k)], 1, 0))


def test_same_seed_and_round_give_the_same_clients() -> None:
    sampler = Sampler(0.1, 1)
    for rnd in (1, 2, 17):
        assert sampler.sample(IDS, rnd, 42) == sampler.sample(IDS, rnd, 42)
        assert sampler.sample(IDS, rnd, 42) == sample_clients(IDS, 0.1, 1, seed=42, round=rnd)  # no hidden state


def test_different_rounds_and_seeds_differ() -> None:
    picks = {tuple(sample_clients(IDS, 0.1, 1, seed=42, round=r)) for r in range(1, 21)}
    assert len(picks) == 20
    assert sample_clients(IDS, 0.1, 1, seed=1, round=1) != sample_clients(IDS, 0.1, 1, seed=2, round=1)


def test_sample_is_a_subset_without_repeats_in_registration_order() -> None:
    ids = [f"z{i}" for i in range(50, 0, -1)]  # registration order is not sorted order
    for rnd in range(1, 6):
        picked = sample_clients(ids, 0.3, 1, seed=0, round=rnd)
        assert len(picked) == 15 == len(set(picked))
        assert set(picked) <= set(ids)
        assert picked == [c for c in ids if c in set(picked)]


def test_every_client_is_eventually_sampled_roughly_uniformly() -> None:
    counts = dict.fromkeys(IDS, 0)
    sampler = Sampler(0.1, 1)
    for rnd in range(1, 401):
        for c in sampler.sample(IDS, rnd, 7):
            counts[c] += 1
    # each client expects 40 picks; binomial sd ~6
    assert min(counts.values()) >= 15 and max(counts.values()) <= 65
    assert sum(counts.values()) == 4000


@pytest.mark.parametrize(
    ("k", "fraction", "min_clients"),
    [(100, 0.1, 1), (100, 0.1, 25), (10, 0.25, 1), (10, 0.25, 2), (7, 0.5, 1), (30, 0.1, 1), (10, 0.3, 1),
     (10, 1.0, 1), (3, 0.01, 1), (3, 0.01, 2), (1, 0.5, 1), (5, 0.2, 0)],
)
def test_count_is_max_of_ceil_fraction_and_min_clients(k: int, fraction: float, min_clients: int) -> None:
    expected = min(k, max(math.ceil(round(fraction * k, 9)), min_clients, 1))
    assert clients_per_round(k, fraction, min_clients) == expected
    ids = [str(i) for i in range(k)]
    assert len(sample_clients(ids, fraction, min_clients, seed=3, round=1)) == expected
    sampler = Sampler(fraction, min_clients)
    sampler.sample(ids, 1, 3)
    assert sampler.population == k and sampler.rate == fraction and sampler.kind == "uniform"


def test_count_exact_values() -> None:
    assert clients_per_round(100, 0.1, 1) == 10
    assert clients_per_round(30, 0.1, 1) == 3  # 0.1 * 30 is 3.0000000000000004 in floating point
    assert clients_per_round(10, 0.25, 1) == 3
    assert clients_per_round(10, 0.25, 5) == 5
    assert clients_per_round(10, 0.5, 20) == 10  # capped at the number of clients
    assert clients_per_round(1000, 0.001, 1) == 1


def test_full_participation_returns_everyone_in_order() -> None:
    assert sample_clients(IDS, 1.0, 1, seed=9, round=4) == IDS
    assert Sampler().sample(IDS, 4, 9) == IDS  # the default samples everyone
    assert FedAvg().sampler.sample(IDS, 4, 9) == IDS  # and is what a strategy gets


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0000001, 1.5, 2, float("nan")])
def test_fraction_out_of_range_raises_config_error(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        Sampler(fraction, 1)
    with pytest.raises(ConfigError, match="fraction"):
        PoissonSampler(fraction)


# -- Poisson sampling (what DP amplification by sampling assumes) ------------------------------


def test_poisson_sample_is_secret_by_default_whatever_the_run_seed() -> None:
    ids = [f"z{i}" for i in range(1000)]
    sampler = PoissonSampler(0.1)
    assert sampler.secret
    first, second = sampler.sample(ids, 3, 5), PoissonSampler(0.1).sample(ids, 3, 5)
    assert first != second  # the same round and seed: the CSPRNG's coins, not the seed's (equal w.p. ~1e-60)
    assert first != PoissonSampler(0.1, secret=False).sample(ids, 3, 5)
    sizes = [len(sampler.sample(ids, 3, 5)) for _ in range(200)]
    assert 90 <= sum(sizes) / len(sizes) <= 110 and len(set(sizes)) > 1
    assert first == [c for c in ids if c in set(first)]  # in population order


def test_poisson_sample_is_seeded_ordered_and_sized_like_its_rate() -> None:
    ids = [f"z{i}" for i in range(1000, 0, -1)]
    sampler = PoissonSampler(0.1, secret=False)  # the simulation-only seeded-privacy switch
    assert sampler.kind == "poisson" and sampler.rate == 0.1
    assert sampler.sample(ids, 3, 5) == PoissonSampler(0.1, secret=False).sample(ids, 3, 5)
    assert sampler.sample(ids, 3, 5) != sampler.sample(ids, 4, 5)
    assert sampler.sample(ids, 3, 5) != sampler.sample(ids, 3, 6)
    sizes = [len(sampler.sample(ids, r, 5)) for r in range(1, 201)]
    assert len(set(sizes)) > 1  # the cohort size itself is random
    assert 90 <= sum(sizes) / len(sizes) <= 110  # mean 100, sd of the mean ~0.7
    for rnd in range(1, 6):
        picked = sampler.sample(ids, rnd, 5)
        assert len(picked) == len(set(picked)) and picked == [c for c in ids if c in set(picked)]
    assert sampler.population == 1000 and sampler.expected() == pytest.approx(100.0)
    assert PoissonSampler(1.0).sample(ids, 1, 0) == ids
