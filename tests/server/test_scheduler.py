"""The scheduler seam: a second scheduler (two cohorts per model update) runs through the same driver."""

from __future__ import annotations

from typing import Any

import torch

from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment
from fedlearn.server.collect import Traffic


class TwoCohorts:
    """Test-only schedule: sample two cohorts, fold both into one aggregate, apply once."""

    name = "two-cohorts"

    def step(self, loop: Any, rnd: int) -> dict[str, Any]:
        ids = loop.runtime.client_ids()
        halves = [ids[: len(ids) // 2], ids[len(ids) // 2 :]]
        aggregator = loop.strategy.aggregator(rnd, loop.state)
        traffic = Traffic()
        sampled = 0
        for cohort in halves:
            tasks = loop.strategy.configure_train(rnd, loop.state, cohort, loop.seed)
            sampled += len(tasks)
            more, _ = loop.sums.collect(rnd, tasks, loop, aggregator)
            traffic += more
        return loop.apply(rnd, aggregator, sampled, traffic)


def test_two_cohorts_per_update_equal_one_cohort_of_everyone():
    config = RunConfig(rounds=2, clients=6, local_epochs=1, seed=1).validate()
    plain = build_experiment(config)
    cohorts = build_experiment(config)
    cohorts.loop.scheduler = TwoCohorts()
    plain.loop.run(2)
    cohorts.loop.run(2)
    # the same clients, the same tasks, summed in the same order: the same model, bit for bit
    assert torch.equal(plain.loop.weights, cohorts.loop.weights)
    assert [r["clients_succeeded"] for r in cohorts.loop.history] == [6, 6]
    assert cohorts.loop.history[-1]["bytes_up"] == plain.loop.history[-1]["bytes_up"]
