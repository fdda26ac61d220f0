"""The one collect loop: deliver tasks, count their bytes, hand back each answer, record who failed.

Plain rounds, federated evaluation and every step of secure aggregation and HE go through
``collect``; ``accept`` validates each answer (raising InvalidUpdateError refuses it, and the
client is recorded as failed, never fatal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.codec import wire_size
from fedlearn.protocol.messages import Message
from fedlearn.runtime.base import ClientFailure, Runtime

log = logging.getLogger(__name__)


@dataclass
class Traffic:
    """What a round records: who failed and the bytes each way (encoded message sizes)."""

    failed: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0

    def __iadd__(self, other: Traffic) -> Traffic:
        self.failed.extend(c for c in other.failed if c not in self.failed)
        self.bytes_up += other.bytes_up
        self.bytes_down += other.bytes_down
        return self


def collect(runtime: Runtime, tasks: Sequence[Message], accept: Callable[[Message, Message], None],
            rnd: int, what: str = "task") -> Traffic:
    """Deliver ``tasks``; call ``accept(task, answer)`` for each answer (in the runtime's order)."""
    traffic = Traffic(bytes_down=sum(wire_size(t) for t in tasks))
    pending = {t.client_id: t for t in tasks}
    rejected: dict[str, list[str]] = {}  # a reason (its client's id taken out) -> the clients refused for it

    def reject(client_id: str, reason: str) -> None:
        key = reason.replace(client_id, "")
        if key not in rejected:  # logged once per round per reason; the others in one line at the end
            rejected[key] = []
            log.warning("round %d: rejected %s: %s", rnd, what, reason)
        rejected[key].append(client_id)

    for answer in runtime.deliver(tasks):
        task = pending.pop(answer.client_id, None)
        if isinstance(answer, ClientFailure):
            log.warning("round %d: client %s dropped at %s: %s", rnd, answer.client_id, what, answer.reason)
            if task is not None:
                traffic.failed.append(answer.client_id)
            continue
        traffic.bytes_up += wire_size(answer)
        try:
            if task is None:
                raise InvalidUpdateError(f"answer from {answer.client_id}, which was not given a {what} this round")
            accept(task, answer)
        except InvalidUpdateError as exc:
            reject(answer.client_id, str(exc))
            if answer.client_id not in traffic.failed:
                traffic.failed.append(answer.client_id)
        except Exception:  # noqa: BLE001 - a check that broke on hostile input must not end the run for everyone
            log.exception("round %d: rejected %s from %s: checking it failed inside the server (a fedlearn bug; "
                          "please report it)", rnd, what, answer.client_id)
            if answer.client_id not in traffic.failed:
                traffic.failed.append(answer.client_id)
    for first, *others in rejected.values():
        if others:
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            log.warning("round %d: rejected %d more %ss like %s's: %s", rnd, len(others), what, first, shown)
    traffic.failed.extend(pending)  # tasks that got no answer at all
    return traffic
