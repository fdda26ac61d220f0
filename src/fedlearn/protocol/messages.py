"""The only things that cross between server and clients: tasks and results carrying *named* arrays.

A task carries arrays by name (``weights``, and e.g. SCAFFOLD's ``control``), a plain config and
the model version it was made from; a result carries the arrays its client computed (``update``,
``control_delta``, a masked ``masked`` or encrypted ``ciphertext`` vector), its sample count and
metrics. In simulation messages are passed by reference; at a process boundary they are encoded
by ``fedlearn.protocol.codec`` (a JSON header plus raw tensor bytes, never pickle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Arrays = dict[str, torch.Tensor]
MAX_EXAMPLES_PER_CLIENT = 10_000_000  # the default ceiling on any example count a client declares (per run)


@dataclass
class TrainTask:
    """Train from ``arrays["weights"]`` on local data with the hyper-parameters in ``config``."""

    round: int
    client_id: str
    arrays: Arrays
    config: dict[str, Any] = field(default_factory=dict)
    model_version: int = 0

    @property
    def weights(self) -> torch.Tensor:
        return self.arrays["weights"]


@dataclass
class TrainResult:
    """A client's answer: named arrays (its transformed update and whatever its algorithm adds), count, metrics.

    ``sealed`` holds secure aggregation's side data (senders whose relayed shares failed
    authentication, ciphertext chunk sizes); ``num_examples`` is 0 there: the weight travels
    inside the hidden sum.
    """

    round: int
    client_id: str
    num_examples: int
    arrays: Arrays
    metrics: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    sealed: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ProtocolStep:
    round: int
    client_id: str
    stage: str
    data: dict[str, Any] = field(default_factory=dict)
    blob: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))


@dataclass
class SecureTask(_ProtocolStep):
    """One step of a secure-aggregation protocol (key advertisement, share relay, unmasking, HE decryption)."""


@dataclass
class SecureReply(_ProtocolStep):
    """A client's answer to a SecureTask: JSON-able ``data`` plus an optional byte ``blob`` (ciphertexts)."""


@dataclass
class EvalTask:
    """Evaluate ``arrays["weights"]`` on the client's local test data."""

    round: int
    client_id: str
    arrays: Arrays
    config: dict[str, Any] = field(default_factory=dict)
    model_version: int = 0

    @property
    def weights(self) -> torch.Tensor:
        return self.arrays["weights"]


@dataclass
class EvalResult:
    """The global model scored on one client's test data: the task's additive sums and its metrics.

    ``num_examples`` is 0 for a client without test data (in every runtime alike); such a result
    carries no metrics and is left out of the pooled figures.
    """

    round: int
    client_id: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        return self.metrics.get("loss")

    @property
    def accuracy(self) -> float | None:
        return self.metrics.get("accuracy")


Message = TrainTask | TrainResult | EvalTask | EvalResult | SecureTask | SecureReply
MESSAGE_TYPES: dict[str, type] = {cls.__name__: cls for cls in (TrainTask, TrainResult, EvalTask, EvalResult,
                                                               SecureTask, SecureReply)}
