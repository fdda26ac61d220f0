"""--min-partition-size 0: W2's partition (1,000 clients on digits) where some clients hold nothing, never sampled."""

from __future__ import annotations

import math

import pytest

from fedlearn.errors import ConfigError, DataError
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment


def test_empty_clients_are_listed_but_never_sampled():
    config = RunConfig(clients=1000, fraction=0.1, rounds=2, local_epochs=1, min_partition_size=0).validate()
    experiment = build_experiment(config)
    empty = [info["client_id"] for info in experiment.partition if info["num_train"] == 0]
    assert empty and len(experiment.partition) == 1000
    live = experiment.loop.runtime.client_ids()
    assert not set(empty) & set(live)
    experiment.loop.run(2)
    for row in experiment.loop.history:
        assert row["clients_sampled"] == math.ceil(0.1 * len(live)) and not row["failed_clients"]


def test_the_default_still_refuses_a_partition_with_empty_clients_and_says_what_to_do():
    with pytest.raises(DataError, match="--min-partition-size 0"):
        build_experiment(RunConfig(clients=1000, rounds=1).validate())
    with pytest.raises(ConfigError, match="--min-partition-size"):
        RunConfig(min_partition_size=-1).validate()
