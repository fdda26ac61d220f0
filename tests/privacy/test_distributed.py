"""The distributed discrete Gaussian's maths: rotation, sampler, conditional rounding, modular sums, accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlearn.errors import InvalidUpdateError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.privacy.distributed import (
    ORDERS,
    DiscreteGaussianEncoding,
    DistributedAccountant,
    SharePolicy,
    calibrate,
    discrete_gaussian,
    poisson_rdp,
    rdp_to_epsilon,
    rotate,
    rounding_bound,
    unrotate,
    zcdp_rho,
)
from fedlearn.privacy.dp import PrivacyRandom


def plan(**changes) -> DiscreteGaussianEncoding:
    values = dict(bits=18, clip=1.0, length=3000, noise_multiplier=1.0, clients=20, honest=20, rotation_seed=7)
    return DiscreteGaussianEncoding.plan(**{**values, **changes})


def test_the_rotation_is_orthonormal_and_undone_exactly():
    x = np.random.default_rng(0).normal(size=3000)
    y = rotate(x, 11, 4096)
    assert y.shape == (4096,) and np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    assert np.abs(unrotate(y, 11)[:3000] - x).max() < 1e-12 and np.abs(unrotate(y, 11)[3000:]).max() < 1e-12
    # a spike is spread over every coordinate: no coordinate holds more than a few times ||x|| / sqrt(d)
    spike = rotate(np.eye(1, 3000, 5)[0] * 10.0, 11, 4096)
    assert np.abs(spike).max() == pytest.approx(10.0 / 64.0)


def test_discrete_gaussian_has_the_right_probabilities():
    random = PrivacyRandom(seed=3)
    small = discrete_gaussian(200_000, 0.6, random)
    values, counts = np.unique(small, return_counts=True)
    expected = np.exp(-values.astype(float) ** 2 / (2 * 0.36))
    expected /= np.exp(-np.arange(-20, 21) ** 2 / (2 * 0.36)).sum()
    for v, c, p in zip(values, counts, expected, strict=True):
        if p > 1e-3:  # within 5 standard errors of each frequent value's probability
            assert abs(c / small.size - p) < 5 * math.sqrt(p * (1 - p) / small.size), v
    large = discrete_gaussian(200_000, 40.0, random)
    assert large.dtype == np.int64 and abs(large.mean()) < 0.5 and large.var() == pytest.approx(1600, rel=0.02)


def test_encoding_rounds_within_the_bound_and_sums_modulo_two_to_the_bits():
    encoding = plan(noise_multiplier=1e-12)  # shares of ~1e-8: the sampler returns exact zeros
    assert encoding.share_std < 1e-6
    rng = np.random.default_rng(1)
    updates = [rng.normal(size=3000) for _ in range(20)]
    inputs = [encoding.encode(u, rng, PrivacyRandom(seed=i)) for i, u in enumerate(updates)]
    assert all(x.dtype == np.uint32 and x.shape == (4096,) and int(x.max()) < 2**18 for x in inputs)
    for x in inputs:  # each rounded, centred input lies within the conditional-rounding bound
        centred = x.astype(np.int64)
        centred[centred >= 2**17] -= 2**18
        assert np.linalg.norm(centred) <= encoding.norm_bound
    total = np.zeros(4096, dtype=np.uint32)
    for x in inputs:
        total = (total + x) & np.uint32(2**18 - 1)
    decoded, count, extras = encoding.decode(total, 20)
    clipped = sum(u / max(1.0, np.linalg.norm(u)) for u in updates)
    assert count == 20 and extras == []
    # stochastic rounding: unbiased, error about gamma * sqrt(20) / 2 per coordinate after the rotation
    assert np.abs(decoded - clipped).max() < 8 * encoding.gamma * math.sqrt(20)


def test_the_sum_of_honest_shares_carries_the_accounted_noise():
    encoding = plan(clients=30, honest=10)
    rng = np.random.default_rng(2)
    total = np.zeros(4096, dtype=np.int64)
    for i in range(30):
        total += encoding.encode(np.zeros(3000), rng, PrivacyRandom(seed=100 + i)).astype(np.int64)
    decoded, _, _ = encoding.decode(total % 2**18, 30)
    # 30 shares of variance (z * norm_bound)^2 / 10 each, in units of gamma; the accounting counts only 10 of them
    expected = math.sqrt(30 / 10) * encoding.noise_multiplier * encoding.norm_bound * encoding.gamma
    assert np.std(decoded) == pytest.approx(expected, rel=0.05)
    assert encoding.noise_multiplier * encoding.norm_bound * encoding.gamma >= encoding.noise_multiplier * 1.0


def test_aligned_updates_do_not_wrap_around_at_18_bits():
    encoding = plan(clients=100, honest=60)
    u = np.ones(3000) / math.sqrt(3000)  # every client the same unit update: the sum's largest coordinates
    rng = np.random.default_rng(4)
    total = sum(encoding.encode(u, rng, PrivacyRandom(seed=i)).astype(np.int64) for i in range(100))
    decoded, _, _ = encoding.decode(total % 2**18, 100)
    noise = math.sqrt(100 / 60) * encoding.noise_multiplier * encoding.norm_bound * encoding.gamma
    assert np.abs(decoded - 100 * u).max() < 6 * noise  # a wrapped coordinate would be off by 2^18 gamma


def test_a_non_finite_update_is_never_encoded():
    with pytest.raises(InvalidUpdateError, match="non-finite"):
        plan().encode(np.full(3000, np.nan), np.random.default_rng(0), PrivacyRandom(seed=0))


def test_zcdp_bound_is_the_gaussian_one_for_large_shares_and_worse_for_tiny_ones():
    assert zcdp_rho(100.0, 4096, 10, 50.0) == pytest.approx(100.0**2 / (2 * 10 * 50.0**2), rel=1e-12)
    assert zcdp_rho(100.0, 4096, 10, 0.3) > 100.0**2 / (2 * 10 * 0.3**2)  # tau: the sum is not yet Gaussian
    assert zcdp_rho(100.0, 4096, 1, 50.0) == pytest.approx(100.0**2 / (2 * 50.0**2), rel=1e-12)
    # rounding and rotation inflate the sensitivity: c + d/4 ... never below C / gamma
    assert rounding_bound(1000.0, 4096) > 1000.0


@pytest.mark.parametrize(("rate", "z", "rounds", "looser"), [(0.1, 1.0, 100, 1.3), (0.01, 1.2, 500, 1.3),
                                                               (0.3, 2.0, 20, 1.7)])
def test_the_general_subsampling_bound_is_sound_and_close_for_a_gaussian(rate, z, rounds, looser):
    ours = rdp_to_epsilon(rounds * poisson_rdp(rate, 1 / (2 * z * z)), 1e-5)
    tight = PrivacyAccountant(noise_multiplier=z, sampling_rate=rate, delta=1e-5).epsilon_after(rounds)
    # never below the Gaussian's tight figure; the price of a bound that holds for any mechanism grows with q
    assert tight <= ours <= looser * tight
    assert np.all(poisson_rdp(1.0, 0.02) == ORDERS * 0.02)
    assert np.all(np.diff([poisson_rdp(q, 0.02)[10] for q in (0.01, 0.1, 0.5, 1.0)]) > 0)


def test_calibration_reaches_the_target_and_the_accountant_counts_rounds_and_clients():
    z = calibrate(8.0, 0.1, 50, 1e-5)
    assert rdp_to_epsilon(50 * poisson_rdp(0.1, 1 / (2 * z * z)), 1e-5) == pytest.approx(8.0, rel=1e-3)
    accountant = DistributedAccountant(0.1, 1e-5)
    for rnd in range(50):
        accountant.step(1 / (2 * z * z), ["a", "b"] if rnd % 2 else ["a"])
    assert accountant.epsilon() == pytest.approx(8.0, rel=1e-3)
    # the server saw "a" in all 50 rounds: no amplification against it
    assert accountant.epsilon_against_server() == pytest.approx(rdp_to_epsilon(ORDERS * 50 / (2 * z * z), 1e-5))
    restored = DistributedAccountant(0.1, 1e-5)
    restored.load_state_dict(accountant.state_dict())
    assert restored.epsilon() == accountant.epsilon() and restored.client_rho == accountant.client_rho
    assert restored.client_rho == pytest.approx({"a": 50 / (2 * z * z), "b": 25 / (2 * z * z)})


def test_a_client_refuses_a_round_weaker_than_its_policy():
    encoding = plan(honest=10)
    policy = SharePolicy(clip=1.0, min_share_noise=1.0 / math.sqrt(20))
    assert policy.check(encoding, 3000) is None
    assert "below this client's own minimum" in policy.check(plan(honest=40, clients=40), 3000)
    assert "above this client's own" in SharePolicy(0.5, 0.0).check(encoding, 3000)
    assert "expects 3000 values" in policy.check(encoding, 2999)
