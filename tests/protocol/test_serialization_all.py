"""Every registered algorithm, and DP and secure aggregation around it, gives a bitwise-identical run when
every message (train, evaluate, secure-aggregation steps) is encoded and decoded on the way."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch

from fedlearn.protocol.codec import decode, encode
from fedlearn.registry import names
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment
from fedlearn.runtime.base import ClientFailure


class Serializing:
    """Wraps a runtime: every task and every answer crosses as bytes, as over a network."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.messages = 0

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def deliver(self, tasks: Sequence) -> Iterator:
        sent = [decode(encode(t)) for t in tasks]
        for answer in self.inner.deliver(sent):
            self.messages += 1
            yield answer if isinstance(answer, ClientFailure) else decode(encode(answer))

    def close(self) -> None:
        pass


def _run(config: RunConfig, serialize: bool):
    experiment = build_experiment(config.validate())
    if serialize:
        experiment.loop.runtime = wrapper = Serializing(experiment.loop.runtime)
    experiment.loop.run(config.rounds)
    return experiment.loop, (wrapper.messages if serialize else 0)


# A run that exercises each registered component that is not an algorithm of its own.
COVERS = {
    ("hook", "prox"): dict(algorithm="fedprox"),
    ("hook", "scaffold"): dict(algorithm="scaffold"),
    ("hook", "dpsgd"): dict(algorithm="fedavg", dp="dpsgd", noise_multiplier=1.0),
    ("transform", "clip"): dict(algorithm="fedadam", dp="central", fraction=0.5, noise_multiplier=0.5),
    ("transform", "gaussian"): dict(algorithm="fedprox", dp="local", noise_multiplier=0.5),
}
CASES = [dict(algorithm=name) for name in names("strategy")] + [
    dict(algorithm="fedavg", server_optimizer=name) for name in names("optimizer")] + list(COVERS.values()) + [
    dict(algorithm="fedavg", secure_aggregation="secagg"),
    dict(algorithm="scaffold", secure_aggregation="secagg+"),
    dict(algorithm="fedavg", evaluation="both"),
]


def test_every_registered_component_is_covered_by_a_serialized_run():
    """A new hook or transform must be given a run here (algorithms and optimizers are enumerated)."""
    registered = {(kind, name) for kind in ("hook", "transform") for name in names(kind)}
    assert registered <= set(COVERS), f"add a run that uses {sorted(registered - set(COVERS))} to COVERS"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_serializing_every_message_changes_nothing(case):
    config = RunConfig(rounds=2, clients=4, local_epochs=1, seed=5, seeded_privacy=True).updated(case)
    plain, _ = _run(config, serialize=False)
    serialized, messages = _run(config, serialize=True)
    assert messages > 0
    assert torch.equal(plain.weights, serialized.weights)
    # Secure-aggregation steps carry JSON data whose in-memory form (int keys) counts a few bytes fewer than
    # its decoded form, so their byte counters may differ by a handful of bytes; everything else is identical.
    skip = {"seconds"} | ({"bytes_up", "bytes_down"} if "secure_aggregation" in case else set())
    for a, b in zip(plain.history, serialized.history):
        assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
