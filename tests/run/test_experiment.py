"""build_clients: with centralized evaluation no client holds back a test set nobody would use."""

from __future__ import annotations

import pytest

from fedlearn.data import load_dataset
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_clients, build_experiment, local_noise_warning


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize(("changes", "held_back"), [
    ({}, False),  # centralized evaluation, the default: every sample trains
    ({"evaluation": "federated"}, True),  # clients evaluate: 20% each, as before
    ({"evaluation": "both"}, True),
    ({"client_test_fraction": 0.2}, True),  # asked for explicitly: kept even under centralized evaluation
])
def test_clients_hold_back_a_test_set_only_when_someone_uses_it(digits, changes: dict, held_back: bool) -> None:
    clients, info = build_clients(RunConfig(clients=5, **changes).validate(), digits)
    assert sum(p["num_train"] + p["num_test"] for p in info) == len(digits.train)
    if held_back:
        assert all(p["num_test"] == round(0.2 * (p["num_train"] + p["num_test"])) for p in info)
        assert all(c.test is not None for c in clients.values())
    else:
        assert all(p["num_test"] == 0 for p in info) and all(c.test is None for c in clients.values())
        assert sum(len(c.train) for c in clients.values()) == len(digits.train)


def test_the_training_split_is_the_same_as_an_explicit_zero(digits) -> None:
    auto, _ = build_clients(RunConfig(clients=4).validate(), digits)
    explicit, _ = build_clients(RunConfig(clients=4, client_test_fraction=0.0).validate(), digits)
    assert [list(c.train.indices) for c in auto.values()] == [list(c.train.indices) for c in explicit.values()]


def test_local_dp_warns_when_the_mean_update_is_mostly_noise() -> None:
    # z sqrt(d / K): 1 * sqrt(93,950 / 10) = 96.9 times the signal; z^2 d clients for noise equal to the signal
    warning = local_noise_warning(1.0, 93_950, 10)
    assert warning is not None and "96.9x" in warning and "~93,950 clients a round" in warning
    assert "\n" not in warning
    assert local_noise_warning(0.5, 3_600, 100) is None  # 0.5 * 6 = 3: the edge is not warned about
    assert local_noise_warning(0.5, 3_601, 100) is not None


def test_a_local_dp_run_at_the_defaults_says_why_it_will_not_learn(caplog) -> None:
    with caplog.at_level("WARNING", logger="fedlearn.run.experiment"):
        build_experiment(RunConfig(dp="local", rounds=1))
    assert any("--dp local: each round's mean update carries noise" in r.getMessage() for r in caplog.records)
