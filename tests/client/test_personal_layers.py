"""Personal layers: named by patterns, kept in each client's state, never in any message."""

from __future__ import annotations

import torch

from fedlearn.protocol.codec import encode
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment


class Recording:
    """Wraps a runtime and keeps the encoded bytes of every message in both directions."""

    def __init__(self, inner) -> None:
        self.inner, self.wire = inner, []

    def client_ids(self):
        return self.inner.client_ids()

    def deliver(self, tasks):
        self.wire.extend(encode(t) for t in tasks)
        for answer in self.inner.deliver(tasks):
            self.wire.append(encode(answer))
            yield answer

    def close(self):
        pass


def test_personal_layers_stay_in_client_state_and_never_cross():
    config = RunConfig(rounds=2, clients=3, local_epochs=1, personal_layers="classifier.4.*", evaluation="federated",
                       model="lenet5", seed=2).validate()
    experiment = build_experiment(config)
    loop = experiment.loop
    spec_names = loop.spec.names
    assert spec_names and not any(n.startswith("classifier.4.") for n in spec_names)
    loop.runtime = recording = Recording(loop.runtime)
    loop.run(2)
    store = recording.inner.app.state
    heads = {cid: store.get(cid)["personal/classifier.4.weight"] for cid in store.client_ids()}
    assert len(heads) == 3
    a, b, c = heads.values()
    assert not torch.equal(a, b) and not torch.equal(b, c)  # each client trained its own head
    for head in heads.values():
        raw = head.numpy().tobytes()
        assert all(raw[:64] not in message for message in recording.wire)
    assert loop.history[-1]["fed_accuracy"] is not None


def test_a_client_starts_from_its_own_stored_head_not_the_last_clients():
    config = RunConfig(rounds=1, clients=2, local_epochs=1, personal_layers="classifier.4.*", model="lenet5",
                       seed=2).validate()
    experiment = build_experiment(config)
    experiment.loop.run(1)
    app = experiment.loop.runtime.app
    trainer = app.trainer
    first = app.client_ids()[0]
    trainer._load_personal(app.state.get(first))
    stored = app.state.get(first)["personal/classifier.4.weight"]
    assert torch.equal(dict(trainer.model.named_parameters())["classifier.4.weight"].detach(), stored)
