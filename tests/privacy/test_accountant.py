"""The privacy accountant against dp_accounting computed directly, the Abadi et al. reference, and calibration."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fedlearn.errors import CheckpointError, ConfigError
from fedlearn.privacy import PrivacyAccountant, calibrate_noise_multiplier, default_delta, effective_noise_multiplier
from fedlearn.privacy.accountant import delta_warning

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def direct_poisson(kind: str, q: float, z: float, steps: int, delta: float) -> float:
    """Epsilon from dp_accounting alone, with its default settings."""
    accountant = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    return accountant.compose(event, steps).get_epsilon(delta)


def accountant(z: float, q: float, delta: float = 1e-5, kind: str = "rdp", **kwargs) -> PrivacyAccountant:
    return PrivacyAccountant(noise_multiplier=z, sampling_rate=q, delta=delta, kind=kind, **kwargs)


@pytest.mark.parametrize("kind", ["rdp", "pld"])
@pytest.mark.parametrize(
    ("q", "z", "steps", "delta"),
    [(0.01, 4.0, 1000, 1e-5), (0.05, 1.5, 100, 1e-6), (1.0, 8.0, 20, 1e-3), (0.2, 2.0, 50, 1e-5)],
)
def test_epsilon_equals_dp_accounting(kind, q, z, steps, delta):
    acct = accountant(z, q, delta, kind)
    for _ in range(3):
        acct.step()
    acct.step(steps - 3)
    assert acct.steps == steps
    assert acct.epsilon() == pytest.approx(direct_poisson(kind, q, z, steps, delta), abs=1e-6)


def test_abadi_reference_rdp():
    acct = accountant(4.0, 0.01, 1e-5)
    acct.step(10_000)
    eps = acct.epsilon()
    print(f"q=0.01 z=4.0 steps=10000 delta=1e-5 RDP epsilon = {eps:.4f}")
    assert 1.0 < eps < 1.1


@pytest.mark.parametrize("kind", ["rdp", "pld"])
def test_epsilon_grows_with_steps_and_falls_with_noise(kind):
    zs = [2.0, 4.0, 8.0]
    steps = [1, 10, 100, 1000]
    grid = [[accountant(z, 0.01, kind=kind).epsilon_after(t) for t in steps] for z in zs]
    for row in grid:
        assert all(a < b for a, b in zip(row, row[1:]))
    for t in range(len(steps)):
        column = [row[t] for row in grid]
        assert all(a > b for a, b in zip(column, column[1:]))


def test_epsilon_after_does_not_record_steps():
    acct = accountant(1.0, 0.1)
    acct.step(5)
    assert acct.epsilon_after(50) > acct.epsilon()
    assert acct.steps == 5
    assert acct.epsilon_after(0) == 0.0


@pytest.mark.parametrize(
    ("target", "q", "steps", "kind"),
    [(1.0, 0.01, 1000, "rdp"), (8.0, 0.1, 100, "rdp"), (3.0, 1.0, 10, "rdp"), (0.2, 0.02, 50, "pld")],
)
def test_calibration_reproduces_target_and_is_minimal(target, q, steps, kind):
    z = calibrate_noise_multiplier(target, sampling_rate=q, steps=steps, delta=1e-5, kind=kind)
    eps = accountant(z, q, kind=kind).epsilon_after(steps)
    assert target * 0.99 <= eps <= target
    assert accountant(z * 0.99, q, kind=kind).epsilon_after(steps) > target


def test_calibration_with_adaptive_clipping_count_noise():
    z = calibrate_noise_multiplier(2.0, sampling_rate=0.01, steps=200, delta=1e-5, clipped_count_stddev=2.0)
    plain = calibrate_noise_multiplier(2.0, sampling_rate=0.01, steps=200, delta=1e-5)
    assert z > plain  # the count release spends part of the budget
    eps = accountant(z, 0.01, clipped_count_stddev=2.0).epsilon_after(200)
    assert 1.98 <= eps <= 2.0
    assert accountant(z * 0.99, 0.01, clipped_count_stddev=2.0).epsilon_after(200) > 2.0
    with pytest.raises(ConfigError, match="--clipped-count-stddev"):
        calibrate_noise_multiplier(2.0, sampling_rate=0.01, steps=200, delta=1e-5, clipped_count_stddev=0.2)


def test_calibration_refuses_unreachable_target():
    with pytest.raises(ConfigError, match="--target-epsilon"):
        calibrate_noise_multiplier(0.01, sampling_rate=1.0, steps=1000, delta=1e-5)
    with pytest.raises(ConfigError, match="--target-epsilon"):
        calibrate_noise_multiplier(0.0, sampling_rate=0.1, steps=10, delta=1e-5)


def test_steps_within_stops_before_the_budget():
    acct = accountant(1.1, 0.01)
    k = acct.steps_within(1.0, 100_000)
    assert 0 < k < 100_000
    assert acct.epsilon_after(k) <= 1.0 < acct.epsilon_after(k + 1)
    assert acct.steps_within(1e6, 123) == 123
    assert accountant(0.5, 1.0).steps_within(0.1, 100) == 0


def test_fixed_size_sampling_uses_replace_one_rdp():
    acct = accountant(2.0, 0.1, sampling="fixed", population=100, sample_size=10)
    acct.step(100)
    # replace-one moves a clipped sum by 2C, and dp_accounting's RDP reads the multiplier per unit of sensitivity
    direct = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE).compose(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert acct.epsilon() == pytest.approx(direct.get_epsilon(1e-5), abs=1e-6)
    assert acct.epsilon() != pytest.approx(direct_poisson("rdp", 0.1, 2.0, 100, 1e-5), rel=0.01)


def test_fixed_size_sampling_is_not_below_the_tight_replace_one_bound():
    # everyone sampled: RDP must not claim less than PLD's exact replace-one Gaussian (which doubles the sensitivity)
    acct = accountant(2.0, 1.0, sampling="fixed", population=10, sample_size=10)
    tight = pld.PLDAccountant(REPLACE_ONE).compose(dp_accounting.GaussianDpEvent(2.0), 5).get_epsilon(1e-5)
    assert tight <= acct.epsilon_after(5) < 1.2 * tight


def test_fixed_size_sampling_settings_are_checked():
    with pytest.raises(ConfigError, match="--accountant"):
        accountant(2.0, 0.1, kind="pld", sampling="fixed", population=100, sample_size=10)
    with pytest.raises(ConfigError, match="--clients"):
        accountant(2.0, 0.1, sampling="fixed", sample_size=10)
    with pytest.raises(ConfigError, match="clients per round"):
        accountant(2.0, 0.1, sampling="fixed", population=100, sample_size=101)
    with pytest.raises(ConfigError, match="--fraction"):
        accountant(2.0, 0.5, sampling="fixed", population=100, sample_size=10)
    accountant(2.0, 0.1, sampling="fixed", population=25, sample_size=3)  # ceil(0.1 * 25) is fine


def test_adaptive_clipping_count_noise_is_one_combined_gaussian():
    z, sigma_b, q = 2.0, 2.0, 0.02
    z_eff = effective_noise_multiplier(z, sigma_b)
    assert z_eff == pytest.approx((z**-2 + (2 * sigma_b) ** -2) ** -0.5)
    acct = accountant(z, q, clipped_count_stddev=sigma_b)
    # dp_accounting's RDP folds the two Gaussians on one sample into the same single Gaussian
    both = dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z), dp_accounting.GaussianDpEvent(2 * sigma_b)])
    direct = rdp.RdpAccountant().compose(dp_accounting.PoissonSampledDpEvent(q, both), 50).get_epsilon(1e-5)
    assert acct.epsilon_after(50) == pytest.approx(direct, abs=1e-6)
    assert acct.epsilon_after(50) > accountant(z, q).epsilon_after(50)
    pld_acct = accountant(z, q, kind="pld", clipped_count_stddev=sigma_b)
    assert pld_acct.epsilon_after(50) == pytest.approx(direct_poisson("pld", q, z_eff, 50, 1e-5), abs=1e-6)
    assert math.isinf(accountant(z, q, clipped_count_stddev=0.0).epsilon_after(1))


def test_zero_noise_means_infinite_epsilon():
    acct = accountant(0.0, 0.1)
    assert acct.epsilon() == 0.0
    acct.step()
    assert math.isinf(acct.epsilon())
    assert math.isinf(accountant(0.0, 0.1, kind="pld").epsilon_after(3))


def test_state_dict_round_trip():
    acct = accountant(1.3, 0.02, 1e-6, "rdp", clipped_count_stddev=4.0)
    acct.step(42)
    state = json.loads(json.dumps(acct.state_dict()))
    fresh = accountant(1.3, 0.02, 1e-6, "rdp", clipped_count_stddev=4.0)
    fresh.load_state_dict(state)
    assert fresh.steps == 42 and fresh.epsilon() == acct.epsilon()
    rebuilt = PrivacyAccountant.from_state_dict(state)
    assert rebuilt.state_dict() == acct.state_dict()
    with pytest.raises(CheckpointError, match="--noise-multiplier"):
        accountant(1.4, 0.02, 1e-6, clipped_count_stddev=4.0).load_state_dict(state)
    with pytest.raises(CheckpointError, match="damaged"):
        fresh.load_state_dict({"steps": 3})


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        (dict(noise_multiplier=-1.0), "--noise-multiplier"),
        (dict(noise_multiplier=float("nan")), "--noise-multiplier"),
        (dict(sampling_rate=0.0), "--fraction"),
        (dict(sampling_rate=1.5), "--fraction"),
        (dict(delta=0.0), "--delta"),
        (dict(delta=1.0), "--delta"),
        (dict(kind="moments"), "--accountant"),
        (dict(sampling="shuffle"), "--sampling"),
        (dict(clipped_count_stddev=-1.0), "--clipped-count-stddev"),
    ],
)
def test_bad_settings_name_their_flag(kwargs, flag):
    settings = dict(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-5) | kwargs
    with pytest.raises(ConfigError, match=flag) as raised:
        PrivacyAccountant(**settings)
    assert "\n" not in str(raised.value)


def test_default_delta_is_at_most_1e5_and_well_below_one_over_n():
    assert default_delta(1) == default_delta(3) == default_delta(10) == 1e-5  # the 3-hospital scenario: not 0.30
    assert default_delta(60_000) == pytest.approx(60_000**-1.1) and 60_000**-1.1 < 1e-5  # DP-SGD on MNIST
    with pytest.raises(ConfigError, match="--delta"):
        default_delta(0)
    assert delta_warning(1e-5, 10, "clients") is None
    assert "--delta 0.1 is at least 1/10 for 10 clients" in delta_warning(0.1, 10, "clients")


def test_dp_event_and_summary():
    acct = accountant(1.0, 0.1)
    acct.step(7)
    event = acct.dp_event()
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 7)
    summary = acct.summary()
    assert summary["epsilon"] == acct.epsilon() and summary["accountant"] == "rdp"
    assert summary["delta"] == 1e-5 and summary["noise_multiplier"] == 1.0
