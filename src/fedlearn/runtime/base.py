"""The runtime contract: deliver tasks to clients wherever they run, hand back their answers.

Every runtime hands each task to the client's ``ClientApp`` (in this process, on a worker, or in
a remote process), so a runtime never runs client or privacy code of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedlearn.protocol.messages import Message


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not answer (crashed, timed out, disconnected, refused the task); recorded, not fatal."""

    client_id: str
    reason: str


class Runtime(Protocol):
    """Where clients run."""

    def client_ids(self) -> list[str]:
        """Clients that can be given work this round."""
        ...

    def declared_examples(self, client_id: str) -> tuple[int, int] | None:
        """(train, test) example counts the client declared (at join, or its simulated partition); None if unknown.
        The server clamps a result's weight to them."""
        ...

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        """Deliver tasks (train, evaluate or protocol steps); yield each answer, in task order."""
        ...

    def close(self) -> None:
        ...
