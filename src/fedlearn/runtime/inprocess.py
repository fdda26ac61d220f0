"""Runs every client in this process, one after another, on a single reused model."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace

from fedlearn.client.data import ClientData
from fedlearn.client.secure import SecureClients
from fedlearn.client.trainer import LocalTrainer
from fedlearn.protocol.messages import EvalResult, EvalTask, SecureReply, SecureTask, TrainResult, TrainTask
from fedlearn.runtime.base import ClientFailure


class InProcessRuntime:
    """Sequential simulation: messages are passed by reference, nothing is serialized or copied.

    Exceptions raised by user code (a model that does not fit the data) propagate: in a
    simulation they are bugs to fix, not network faults to ride out.
    """

    def __init__(self, trainer: LocalTrainer, clients: Mapping[str, ClientData],
                 secure: SecureClients | None = None) -> None:
        self.trainer = trainer
        self.clients = dict(clients)
        self.secure = secure or SecureClients()  # each simulated client's secure-aggregation secrets

    def client_ids(self) -> list[str]:
        return list(self.clients)

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[TrainResult | ClientFailure]:
        for task in tasks:
            yield self.secure.finish_train(task, self.trainer.fit(task, self.clients[task.client_id]))

    def exchange(self, tasks: Sequence[SecureTask]) -> Iterator[SecureReply | ClientFailure]:
        for task in tasks:
            yield self.secure.handle(task)

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalResult | ClientFailure]:
        # Clients that share one test Dataset object (the seed example gives all five the same
        # MNIST test set) get the same answer for the same weights: score it once.
        scored: dict[tuple[int, int], EvalResult] = {}
        for task in tasks:
            data = self.clients[task.client_id]
            if data.test is None or len(data.test) == 0:
                yield ClientFailure(task.client_id, "no local test data")
                continue
            key = (id(data.test), id(task.weights))
            if key not in scored:
                scored[key] = self.trainer.evaluate(task, data)
            yield replace(scored[key], client_id=task.client_id, round=task.round)

    def close(self) -> None:
        pass
