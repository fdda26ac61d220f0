"""The Strategy interface: what the server does in a round, independent of where clients run."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any

import torch

from fedlearn.client.config import LocalConfig
from fedlearn.errors import ConfigError
from fedlearn.metrics import pool_federated
from fedlearn.protocol.messages import EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.seeding import derive_seed


class Aggregation(ABC):
    """One round's aggregate, built result by result as the runtime hands them back."""

    @abstractmethod
    def add(self, result: TrainResult, update: torch.Tensor) -> None:
        """Fold in one client's decoded update (already checked for size and finiteness)."""

    @property
    @abstractmethod
    def count(self) -> int:
        """How many updates were folded in."""

    @abstractmethod
    def finish(self) -> torch.Tensor:
        """The new global weights."""

    def add_sum(self, weighted_sum: torch.Tensor, total_weight: float, count: int, extras: dict[str, int]) -> None:
        """Fold in the securely aggregated sum of ``count`` clients' weighted updates and their summed ``extras``."""
        raise ConfigError(f"{type(self).__name__} needs each client's update; it cannot use secure aggregation")


class Strategy(ABC):
    """A server algorithm: configures clients' local work and turns their results into new weights.

    ``local`` holds the hyper-parameters sent to clients each round; subclasses add their own
    (FedProx's ``mu``) and choose what clients return (updates or gradients).
    """

    name = "strategy"
    # DP-FedAvg must release a (noised) update even when few or no sampled clients answered,
    # or the number of answers would leak through whether the model changed.
    aggregates_empty_rounds = False
    # How clients weight their update inside a secure sum ("examples" or "uniform"); None: the
    # strategy needs individual updates (robust statistics, per-client accounting) and refuses
    # secure aggregation and HE. ``secure_extras`` are per-client bits summed alongside.
    secure_weighting: str | None = None
    secure_extras: tuple[str, ...] = ()

    def __init__(self, local: LocalConfig | None = None) -> None:
        self.local = local or LocalConfig()

    def set_local(self, **changes: Any) -> None:
        """Change the local hyper-parameters for the following rounds (e.g. lr decay)."""
        known = LocalConfig.__dataclass_fields__
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(f"unknown local setting {unknown[0]!r}; known: {', '.join(known)}")
        self.local = replace(self.local, **changes)

    def task_config(self, round: int, client_id: str, seed: int) -> dict[str, Any]:
        noise_seed = self.local.noise_seed  # tests only: each task gets its own reproducible privacy noise
        if noise_seed is not None:
            noise_seed = derive_seed(noise_seed, round, client_id)
        return replace(self.local, seed=derive_seed(seed, round, client_id), noise_seed=noise_seed).to_dict()

    def configure_train(
        self, round: int, weights: torch.Tensor, client_ids: list[str], seed: int
    ) -> list[TrainTask]:
        """One TrainTask per sampled client; all share the same weights tensor (no copies)."""
        return [TrainTask(round, cid, weights, self.task_config(round, cid, seed)) for cid in client_ids]

    @abstractmethod
    def begin_aggregation(self, round: int, weights: torch.Tensor) -> Aggregation:
        """Start folding this round's results into new global weights."""

    def configure_evaluate(self, round: int, weights: torch.Tensor, client_ids: list[str]) -> list[EvalTask]:
        config = {"eval_batch_size": self.local.eval_batch_size}
        return [EvalTask(round, cid, weights, config) for cid in client_ids]

    def aggregate_evaluate(self, results: list[EvalResult]) -> dict[str, float | None]:
        """Sample-weighted mean loss and accuracy over the clients' test sets; for binary tasks the
        clients' confusion counts and margin histograms are summed exactly (``fedlearn.metrics``)."""
        n = sum(r.num_examples for r in results)
        if n == 0:
            return {}
        return {
            "loss": sum(r.loss * r.num_examples for r in results) / n,
            "accuracy": sum(r.accuracy * r.num_examples for r in results) / n,
            "num_examples": n,
            **pool_federated(r.metrics for r in results),
        }

    def round_metrics(self) -> dict[str, Any]:
        """Extra fields for this round's metrics row (e.g. the privacy spent so far)."""
        return {}

    def can_continue(self, next_round: int) -> bool:
        """False when running ``next_round`` would break a limit the strategy keeps (a privacy budget)."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy after a restart."""
        return {"local": self.local.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local = LocalConfig.from_dict(state["local"])
