"""The runtime contract: deliver tasks to clients wherever they run, hand back their answers."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedlearn.protocol.messages import EvalResult, EvalTask, SecureReply, SecureTask, TrainResult, TrainTask


@dataclass(frozen=True)
class ClientFailure:
    """A client that did not answer (crashed, timed out, disconnected); recorded, not fatal."""

    client_id: str
    reason: str


class Runtime(Protocol):
    """Where clients run. Strategies and privacy code never know which runtime they are in."""

    def client_ids(self) -> list[str]:
        """Clients that can be given work this round."""
        ...

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[TrainResult | ClientFailure]:
        """Deliver train tasks; yield each answer as it arrives."""
        ...

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalResult | ClientFailure]:
        """Deliver evaluation tasks; yield each answer as it arrives."""
        ...

    def exchange(self, tasks: Sequence[SecureTask]) -> Iterator[SecureReply | ClientFailure]:
        """Deliver secure-aggregation protocol steps; yield each reply as it arrives."""
        ...

    def close(self) -> None:
        ...
