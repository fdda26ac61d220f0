"""The default influence bound: exact scaling, order independence, state, and a run that survives 1e38 updates."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.protocol.messages import TrainResult
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment
from fedlearn.server.influence import REFUSE_BEYOND, InfluenceBound


def test_round_one_uses_the_model_norm_and_later_rounds_last_rounds_median() -> None:
    bound = InfluenceBound(2.0)
    weights = torch.tensor([3.0, 4.0])  # norm 5
    assert bound.limit(weights) == 10.0
    assert bound.limit(torch.zeros(2)) == math.inf  # nothing to measure against: no limit yet
    small = {"update": torch.tensor([0.6, 0.8])}
    assert bound.apply("a", small, 10.0) is small  # within the limit: untouched, not copied
    big = bound.apply("b", {"update": torch.tensor([30.0, 40.0])}, 10.0)
    assert torch.allclose(big["update"], torch.tensor([6.0, 8.0]))  # norm 50: scaled to the limit, same direction
    far = 10.0 * REFUSE_BEYOND + 1
    with pytest.raises(InvalidUpdateError, match=f"update from c has norm {far:g}, over {REFUSE_BEYOND:g}x"):
        bound.apply("c", {"update": torch.tensor([0.0, far])}, 10.0)
    bound.apply("d", {"update": torch.tensor([0.0, 2.0])}, 10.0)
    assert bound.end_round() == {"updates_scaled": 1, "updates_refused": 1}
    assert bound.median == 2.0  # of the bounded norms 1, 10, 2 (the refused one does not count)
    assert bound.limit(weights) == 4.0
    assert bound.end_round() == {"updates_scaled": 0, "updates_refused": 0}
    assert bound.median == 2.0  # a round without answers keeps the limit


def test_arrays_are_measured_and_scaled_jointly() -> None:
    bound = InfluenceBound(1.0)
    out = bound.apply("a", {"update": torch.tensor([3.0, 0.0]), "control_delta": torch.tensor([0.0, 4.0])}, 1.0)
    assert torch.allclose(out["update"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(out["control_delta"], torch.tensor([0.0, 0.8]))


@pytest.mark.parametrize("value,shown,limit", [(1e17, "1e\\+18", 1e6), (3.4e37, "inf", 1e6), (1e30, "inf", math.inf)])
def test_a_huge_finite_update_is_refused_even_when_its_norm_overflows(value: float, shown: str, limit: float) -> None:
    with pytest.raises(InvalidUpdateError, match=f"norm {shown}"):
        InfluenceBound().apply("a", {"update": torch.full((100,), value)}, limit)


def test_the_next_limit_does_not_depend_on_the_order_answers_arrive_in() -> None:
    norms = [0.5, 3.0, 1e38, 2.0, 0.1, 7.0, 20.0]
    limits = set()
    for seed in range(5):
        order = norms[:]
        random.Random(seed).shuffle(order)
        bound = InfluenceBound(3.0)
        for n in order:
            try:
                bound.apply("x", {"update": torch.tensor([n])}, 10.0)
            except InvalidUpdateError:
                pass
        assert bound.end_round() == {"updates_scaled": 1, "updates_refused": 1}
        limits.add(bound.limit(torch.ones(1)))
    assert limits == {3.0 * 2.5}  # the median of 0.1, 0.5, 2, 3, 7, 10


def test_a_minority_at_or_over_the_limit_cannot_raise_it() -> None:
    bound = InfluenceBound(3.0)
    limit = 1.5
    for _ in range(5):
        for n in [limit, 5 * limit, 0.5, 0.5, 0.5]:  # two attackers every round, three honest clients
            bound.apply("x", {"update": torch.tensor([n])}, limit)
        bound.end_round()
        limit = bound.limit(torch.ones(1))
        assert limit == 1.5  # the median stays the honest 0.5


def test_the_limit_survives_a_checkpoint() -> None:
    bound = InfluenceBound(3.0)
    bound.apply("a", {"update": torch.tensor([2.0])}, 10.0)
    bound.end_round()
    again = InfluenceBound(3.0)
    again.load_state_dict(bound.state_dict())
    assert again.limit(torch.ones(1)) == bound.limit(torch.ones(1)) == 6.0


@pytest.mark.parametrize("factor", [0.0, -1.0, math.nan, math.inf])
def test_a_bad_factor_is_refused(factor: float) -> None:
    with pytest.raises(ConfigError, match="update_bound"):
        InfluenceBound(factor)


class Attacker:
    """Wraps the simulation's runtime: client-0 answers every train task with a huge finite vector."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def deliver(self, tasks):
        for answer in self.inner.deliver(tasks):
            if isinstance(answer, TrainResult) and answer.client_id == "client-0":
                answer = replace(answer, arrays={"update": torch.full_like(answer.arrays["update"], 1e38)})
            yield answer


def _accuracy(update_bound: float, attacked: bool) -> float:
    config = RunConfig(rounds=6, clients=10, partition="iid", update_bound=update_bound, seed=3, threads=1)
    experiment = build_experiment(config)
    if attacked:
        experiment.loop.runtime = Attacker(experiment.loop.runtime)
    history = experiment.loop.run(config.rounds)
    return history[-1]["test_accuracy"]


def test_one_client_sending_1e38_updates_cannot_ruin_the_run() -> None:
    """Without the bound a finite 1e38 update leaves an unusable model; with the default bound it is refused
    every round and the run ends within 2 points of the run without the attacker."""
    honest = _accuracy(RunConfig().update_bound, attacked=False)
    assert honest > 0.8
    assert _accuracy(RunConfig().update_bound, attacked=True) >= honest - 0.02
    assert _accuracy(0.0, attacked=True) < 0.3
