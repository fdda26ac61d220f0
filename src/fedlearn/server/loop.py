"""The one round loop: sample, send tasks, fold results in, evaluate, record, checkpoint."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fedlearn.errors import CheckpointError, InvalidUpdateError
from fedlearn.metrics import BINARY_KEYS, FEDERATED_KEYS
from fedlearn.protocol.messages import EvalResult, TrainTask, wire_size
from fedlearn.protocol.params import ParamSpec, check_vector
from fedlearn.runtime.base import ClientFailure, Runtime
from fedlearn.server.checkpoint import load_checkpoint, save_checkpoint
from fedlearn.server.sampling import poisson_sample, sample_clients
from fedlearn.server.secure import HomomorphicRound, SecureAggregationRound
from fedlearn.server.validation import check_result
from fedlearn.strategies.base import Aggregation, Strategy

log = logging.getLogger(__name__)

Evaluator = Callable[[torch.Tensor], "tuple[float, float]"]
RoundCallback = Callable[[dict[str, Any]], None]


class RoundLoop:
    """Runs federated rounds with any strategy on any runtime and keeps the run's history.

    ``evaluator`` scores the global weights centrally after each round; with
    ``federated_eval`` the clients' own test sets are used as well. When ``checkpoint_path``
    is set the state is written atomically after every round, before callbacks see the row.
    """

    def __init__(
        self,
        strategy: Strategy,
        runtime: Runtime,
        spec: ParamSpec,
        weights: torch.Tensor,
        *,
        fraction: float = 1.0,
        min_clients: int = 1,
        min_fit_fraction: float = 0.0,
        sampling: str = "uniform",
        seed: int = 0,
        evaluator: Evaluator | None = None,
        federated_eval: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        callbacks: Iterable[RoundCallback] = (),
        secure: SecureAggregationRound | HomomorphicRound | None = None,
    ) -> None:
        check_vector(weights, spec)
        self.strategy = strategy
        self.runtime = runtime
        self.spec = spec
        self.weights = weights.detach().to("cpu", torch.float32).clone()
        self.fraction = fraction
        self.min_clients = min_clients
        self.min_fit_fraction = min_fit_fraction
        self.sampling = sampling
        self.seed = seed
        self.evaluator = evaluator
        self.federated_eval = federated_eval
        self.checkpoint_path = checkpoint_path
        self.callbacks = list(callbacks)
        self.secure = secure  # secure aggregation: clients' updates are only ever seen summed
        self.round = 0
        self.history: list[dict[str, Any]] = []

    def run(self, num_rounds: int) -> list[dict[str, Any]]:
        """Run until ``num_rounds`` rounds are complete in total (resumed rounds count)."""
        while self.round < num_rounds and self.strategy.can_continue(self.round + 1):
            self.run_round()
        return self.history

    def run_round(self) -> dict[str, Any]:
        """One complete round; returns the history row it appended."""
        start = time.perf_counter()
        rnd = self.round + 1
        if self.sampling == "poisson":
            sampled = poisson_sample(self.runtime.client_ids(), self.fraction, self.seed, rnd)
        else:
            sampled = sample_clients(self.runtime.client_ids(), self.fraction, self.min_clients, self.seed, rnd)
        tasks = self.strategy.configure_train(rnd, self.weights, sampled, self.seed)
        aggregation = self.strategy.begin_aggregation(rnd, self.weights)
        extra: dict[str, Any] = {}
        if self.secure is None:
            failed, bytes_up, bytes_down, train_loss = self._collect(rnd, tasks, aggregation)
        else:
            outcome = self.secure.run(rnd, tasks, self.runtime, self.strategy, aggregation, self.seed)
            failed, bytes_up, bytes_down, train_loss = outcome.failed, outcome.bytes_up, outcome.bytes_down, None
            extra["secure_aggregation"] = self.secure.name
            if outcome.aborted:
                extra["secure_aggregation_aborted"] = outcome.aborted
        needed = max(self.min_clients, math.ceil(self.min_fit_fraction * len(tasks) - 1e-9), 1)
        aggregated = aggregation.count >= needed
        if aggregated or self.strategy.aggregates_empty_rounds:
            self.weights = aggregation.finish()
        else:
            log.warning("round %d: only %d of %d clients succeeded (need %d); weights unchanged",
                        rnd, aggregation.count, len(tasks), needed)
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": train_loss,
            "clients_sampled": len(tasks),
            "clients_succeeded": aggregation.count,
            "failed_clients": failed,
            "aggregated": aggregated,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            **extra,
        }
        row.update(self.strategy.round_metrics())
        row.update(self._evaluate(rnd))
        row["seconds"] = time.perf_counter() - start
        self.round = rnd
        self.history.append(row)
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.state_dict())
        for callback in self.callbacks:
            callback(row)
        return row

    def _collect(self, rnd: int, tasks: list[TrainTask],
                 aggregation: Aggregation) -> tuple[list[str], int, int, float | None]:
        """Deliver plain train tasks and fold each checked update in: (failed, bytes up, bytes down, loss)."""
        by_client = {t.client_id: t for t in tasks}
        bytes_down = sum(wire_size(t) for t in tasks)
        bytes_up, loss_sum, examples = 0, 0.0, 0
        failed: list[str] = []
        for answer in self.runtime.train(tasks):
            if isinstance(answer, ClientFailure):
                log.warning("round %d: client %s dropped: %s", rnd, answer.client_id, answer.reason)
                if by_client.pop(answer.client_id, None) is not None:
                    failed.append(answer.client_id)
                continue
            bytes_up += wire_size(answer)
            try:
                update = check_result(answer, by_client.pop(answer.client_id, None), self.spec)
            except InvalidUpdateError as exc:
                log.warning("round %d: rejected: %s", rnd, exc)
                failed.append(answer.client_id)
                continue
            aggregation.add(answer, update)
            loss_sum += float(answer.metrics.get("train_loss", 0.0)) * answer.num_examples
            examples += answer.num_examples
        failed.extend(by_client)  # tasks that got no answer at all
        return failed, bytes_up, bytes_down, (loss_sum / examples if examples else None)

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        """The row's test fields: central when there is an evaluator, else federated; binary tasks add
        ``test_auc``, ``test_sensitivity``, ``test_specificity``, ``test_balanced_accuracy`` (and ``fed_*``)."""
        out: dict[str, Any] = {"test_accuracy": None, "test_loss": None}
        if self.federated_eval:
            fed = self.evaluate_federated(rnd)
            out.update({"fed_accuracy": fed.get("accuracy"), "fed_loss": fed.get("loss")})
            out.update({"test_accuracy": fed.get("accuracy"), "test_loss": fed.get("loss")})
            out.update({f"fed_{k}": fed[k] for k in FEDERATED_KEYS if k in fed})
            out.update({f"test_{k}": fed[k] for k in BINARY_KEYS if k in fed})
        if self.evaluator is not None:
            score = getattr(self.evaluator, "score", None)  # CentralEvaluator: loss, accuracy and binary metrics
            central = score(self.weights) if score is not None else dict(zip(("loss", "accuracy"),
                                                                              self.evaluator(self.weights)))
            out.update({"test_accuracy": central["accuracy"], "test_loss": central["loss"]})
            out.update({f"test_{k}": central[k] for k in BINARY_KEYS if k in central})
        return out

    def evaluate_federated(self, rnd: int | None = None) -> dict[str, float]:
        """Sample-weighted loss and accuracy of the global weights over every client's test set
        (for binary tasks also the pooled sensitivity, specificity, balanced accuracy and histogram AUC)."""
        rnd = self.round if rnd is None else rnd
        tasks = self.strategy.configure_evaluate(rnd, self.weights, self.runtime.client_ids())
        results = [r for r in self.runtime.evaluate(tasks) if isinstance(r, EvalResult)]
        return self.strategy.aggregate_evaluate(results)

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "weights": self.weights,
            "strategy": self.strategy.state_dict(),
            "strategy_name": self.strategy.name,
            "history": self.history,
            "spec": self.spec.to_dict(),
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ParamSpec.from_dict(state["spec"]) != self.spec:
            raise CheckpointError("checkpoint was written for a different model; resume with the run's own config")
        if state["strategy_name"] != self.strategy.name:
            raise CheckpointError(f"checkpoint was written by {state['strategy_name']}, not {self.strategy.name}")
        self.round = int(state["round"])
        self.weights = state["weights"].to(torch.float32)
        self.strategy.load_state_dict(state["strategy"])
        self.history = list(state["history"])
        self.seed = int(state["seed"])

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the last round completed in the checkpoint at ``path``."""
        self.load_state_dict(load_checkpoint(path))

