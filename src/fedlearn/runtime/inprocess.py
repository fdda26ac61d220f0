"""Runs every client in this process, one after another, through one ClientApp on a single reused model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

from fedlearn.client.app import ClientApp, TaskRefused
from fedlearn.privacy.secagg.client import SecAggProtocolError
from fedlearn.protocol.messages import EvalResult, EvalTask, Message
from fedlearn.runtime.base import ClientFailure


class InProcessRuntime:
    """Sequential simulation: messages are passed by reference, nothing is serialized or copied.

    Exceptions raised by user code (a model that does not fit the data) propagate: in a
    simulation they are bugs to fix, not network faults to ride out. A task the client refuses
    (its privacy policy, a task for a client it does not host) is a ClientFailure, as over gRPC.
    """

    def __init__(self, app: ClientApp) -> None:
        self.app = app

    def client_ids(self) -> list[str]:
        return self.app.client_ids()

    def declared_examples(self, client_id: str) -> tuple[int, int] | None:
        """(train, test) examples the client holds: in a simulation the server knows its partition."""
        data = self.app.clients.get(client_id)
        return None if data is None else (len(data.train), 0 if data.test is None else len(data.test))

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        # Clients that share one test Dataset object (the seed example gives all five the same
        # MNIST test set) get the same answer for the same weights: score it once per batch.
        scored: dict[tuple[int, int], EvalResult] = {}
        shared_model = not getattr(self.app.trainer, "personal", ())  # personal layers: every client differs
        for task in tasks:
            try:
                if isinstance(task, EvalTask) and shared_model:
                    test = self.app.clients[task.client_id].test if task.client_id in self.app.clients else None
                    key = (id(test), id(task.weights))
                    if test is not None and key in scored:
                        yield replace(scored[key], client_id=task.client_id, round=task.round)
                        continue
                    answer = self.app(task)
                    if test is not None:
                        scored[key] = answer
                    yield answer
                    continue
                yield self.app(task)
            except (TaskRefused, SecAggProtocolError) as exc:
                yield ClientFailure(task.client_id, str(exc))

    def close(self) -> None:
        pass
