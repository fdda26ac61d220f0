"""The one driver: for every entry point (`fedlearn run`, `fedlearn server`, FedServer, the face
application) it samples, delivers, folds results in, applies the update, evaluates, records and
checkpoints. *When* the model is updated is the scheduler's choice (``SyncRounds`` here); *how*
results are summed (plain, SecAgg, HE) is the sum protocol's; both use the one collect loop.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from fedlearn.client.state import ClientStateStore
from fedlearn.errors import CheckpointError, InvalidUpdateError
from fedlearn.metrics import BINARY_KEYS, FEDERATED_KEYS
from fedlearn.protocol.messages import EvalResult, Message, TrainResult
from fedlearn.protocol.params import ParamSpec, check_vector
from fedlearn.runtime.base import Runtime
from fedlearn.server.checkpoint import load_checkpoint, save_checkpoint
from fedlearn.server.collect import Traffic, collect
from fedlearn.server.validation import check_result
from fedlearn.strategies.base import Aggregator, ServerState, Strategy

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


class Evaluator(Protocol):
    """Central evaluation: metrics of the global weights on a server-side test set."""

    def score(self, weights: torch.Tensor) -> dict[str, Any]: ...


class SumProtocol(Protocol):
    """How a cohort's results reach the aggregator: one by one (plain) or as one hidden sum (SecAgg, HE)."""

    name: str

    def collect(self, rnd: int, tasks: list, loop: RoundLoop, aggregator: Aggregator) -> tuple[Traffic, str | None]:
        ...


class PlainSum:
    """Each result is validated and folded into the aggregator as it arrives."""

    name = "plain"

    def collect(self, rnd: int, tasks: list, loop: RoundLoop, aggregator: Aggregator) -> tuple[Traffic, str | None]:
        expected = loop.strategy.expected_arrays(loop.state)
        losses = loop.round_losses

        def accept(task: Message, answer: Message) -> None:
            if not isinstance(answer, TrainResult):
                raise InvalidUpdateError(f"{answer.client_id} answered a train task with a {type(answer).__name__}")
            arrays = check_result(answer, task, expected)
            aggregator.add(answer, arrays)
            losses.append((float(answer.metrics.get("train_loss", 0.0)), answer.num_examples))

        return collect(loop.runtime, tasks, accept, rnd, "train task"), None


class SyncRounds:
    """Today's schedule: one cohort per model update, wait for every answer or the deadline, apply once."""

    name = "sync"

    def step(self, loop: RoundLoop, rnd: int) -> dict[str, Any]:
        sampled = loop.strategy.sampler.sample(loop.runtime.client_ids(), rnd, loop.seed)
        tasks = loop.strategy.configure_train(rnd, loop.state, sampled, loop.seed)
        aggregator = loop.strategy.aggregator(rnd, loop.state)
        traffic, aborted = loop.sums.collect(rnd, tasks, loop, aggregator)
        return loop.apply(rnd, aggregator, len(tasks), traffic, aborted)


class RoundLoop:
    """Runs rounds of any strategy on any runtime and keeps the run's history and checkpoint.

    ``evaluator`` scores the global weights centrally after each round; with ``federated_eval``
    the clients' own test sets are used as well. With ``checkpoint_path`` the server state (and,
    in simulation, ``client_state``) is written atomically after every round, before callbacks
    see the row. ``before_round`` runs before each round (a deployment waits for its clients).
    """

    def __init__(
        self,
        strategy: Strategy,
        runtime: Runtime,
        spec: ParamSpec,
        weights: torch.Tensor,
        *,
        min_clients: int = 1,
        min_fit_fraction: float = 0.0,
        seed: int = 0,
        evaluator: Evaluator | None = None,
        federated_eval: bool = False,
        checkpoint_path: str | os.PathLike | None = None,
        callbacks: Iterable[RoundCallback] = (),
        sums: SumProtocol | None = None,
        scheduler: Any = None,
        client_state: ClientStateStore | None = None,
        before_round: Callable[[int], None] | None = None,
        reported: tuple[str, ...] = ("loss", "accuracy"),
    ) -> None:
        check_vector(weights, spec)
        self.strategy = strategy
        self.runtime = runtime
        self.spec = spec
        self.state = ServerState(weights.detach().to("cpu", torch.float32).clone())
        self.min_clients = min_clients
        self.min_fit_fraction = min_fit_fraction
        self.seed = seed
        self.evaluator = evaluator
        self.federated_eval = federated_eval
        self.checkpoint_path = checkpoint_path
        self.callbacks = list(callbacks)
        self.sums = sums or PlainSum()
        self.scheduler = scheduler or SyncRounds()
        self.client_state = client_state
        self.before_round = before_round
        self.reported = reported  # the task's test_* fields (regression: loss, mse, mae; no accuracy)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.round_losses: list[tuple[float, int]] = []
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None

    @property
    def weights(self) -> torch.Tensor:
        return self.state.weights

    def run(self, num_rounds: int) -> list[dict[str, Any]]:
        """Run until ``num_rounds`` rounds are complete in total (resumed rounds count), or the strategy stops."""
        try:
            while self.round < num_rounds and self.strategy.can_continue(self.round + 1):
                if self.before_round is not None:
                    self.before_round(self.round + 1)
                self.run_round()
        finally:
            self.flush()
        return self.history

    def run_round(self) -> dict[str, Any]:
        """One step of the scheduler; returns the history row it appended."""
        start = time.perf_counter()
        rnd = self.round + 1
        self.round_losses = []
        row = self.scheduler.step(self, rnd)
        row.update(self.strategy.round_metrics())
        row.update(self._evaluate(rnd))
        row["seconds"] = time.perf_counter() - start
        self.round = rnd
        self.history.append(row)
        if self.checkpoint_path is not None:
            self.save(self.checkpoint_path, background=True)
        for callback in self.callbacks:
            callback(row)
        return row

    def apply(self, rnd: int, aggregator: Aggregator, sampled: int, traffic: Traffic,
              aborted: str | None = None) -> dict[str, Any]:
        """Turn the cohort's aggregate into new weights (if enough answered) and build the round's row."""
        self.flush()  # the previous round's checkpoint is durable before this round's results count
        needed = max(self.min_clients, math.ceil(self.min_fit_fraction * sampled - 1e-9), 1)
        aggregated = aggregator.count >= needed
        if aggregated or self.strategy.aggregates_empty_rounds:
            self.state = self.strategy.apply(self.state, aggregator.result(), aggregator.count)
        else:
            log.warning("round %d: only %d of %d clients succeeded (need %d); weights unchanged",
                        rnd, aggregator.count, sampled, needed)
        examples = sum(n for _, n in self.round_losses)
        row: dict[str, Any] = {
            "round": rnd,
            "train_loss": sum(loss * n for loss, n in self.round_losses) / examples if examples else None,
            "clients_sampled": sampled,
            "clients_succeeded": aggregator.count,
            "failed_clients": traffic.failed,
            "aggregated": aggregated,
            "bytes_up": traffic.bytes_up,
            "bytes_down": traffic.bytes_down,
        }
        if self.sums.name != "plain":
            row["secure_aggregation"] = self.sums.name
            if aborted:
                row["secure_aggregation_aborted"] = aborted
        return row

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        """The row's test fields: central when there is an evaluator, else federated; binary tasks add
        ``test_auc``, ``test_sensitivity``, ``test_specificity``, ``test_balanced_accuracy`` (and ``fed_*``)."""
        out: dict[str, Any] = {f"test_{k}": None for k in self.reported}
        if self.federated_eval:
            fed = self.evaluate_federated(rnd)
            for key in self.reported:
                out[f"fed_{key}"] = out[f"test_{key}"] = fed.get(key)
            out.update({f"fed_{k}": fed[k] for k in FEDERATED_KEYS if k in fed})
            out.update({f"test_{k}": fed[k] for k in BINARY_KEYS if k in fed})
        if self.evaluator is not None:
            central = self.evaluator.score(self.state.weights)
            out.update({f"test_{k}": central.get(k) for k in self.reported})
            out.update({f"test_{k}": central[k] for k in BINARY_KEYS if k in central})
        return out

    def evaluate_federated(self, rnd: int | None = None) -> dict[str, float]:
        """Sample-weighted metrics of the global weights over every client's test set (binary tasks add the
        pooled sensitivity, specificity, balanced accuracy and histogram AUC)."""
        rnd = self.round if rnd is None else rnd
        tasks = self.strategy.configure_evaluate(rnd, self.state, self.runtime.client_ids())
        results: list[EvalResult] = []

        def accept(task: Message, answer: Message) -> None:
            if not isinstance(answer, EvalResult):
                raise InvalidUpdateError(f"{answer.client_id} answered an evaluation with a {type(answer).__name__}")
            results.append(answer)

        collect(self.runtime, tasks, accept, rnd, "evaluation")
        return self.strategy.aggregate_evaluate(results)

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = {
            "round": self.round,
            "weights": self.state.weights,
            "extras": dict(self.state.extras),
            "model_version": self.state.version,
            "strategy": self.strategy.state_dict(),
            "strategy_name": self.strategy.name,
            "history": self.history,
            "spec": self.spec.to_dict(),
            "seed": self.seed,
        }
        if self.client_state is not None:
            out["client_state"] = self.client_state.state_dict()
        return out

    def save(self, path: str | os.PathLike, *, background: bool = False) -> None:
        """Checkpoint atomically: client state files first, then the server state that names them.

        With ``background`` the file is written (and fsynced) by a thread while the next round trains;
        ``apply`` waits for it before the next round's results change the model, so a crash still leaves
        the previous round's checkpoint or this one.
        """
        self.flush()
        if self.client_state is not None:
            self.client_state.commit()
        state = {**self.state_dict(), "history": list(self.history)}

        def write() -> None:
            try:
                save_checkpoint(path, state)
                if self.client_state is not None:
                    self.client_state.prune()
            except BaseException as exc:  # re-raised in the driver's thread by flush()
                self._writer_error = exc

        if not background:
            write()
            self.flush()
            return
        self._writer = threading.Thread(target=write, name="fedlearn-checkpoint", daemon=True)
        self._writer.start()

    def flush(self) -> None:
        """Wait for a background checkpoint; raise what it raised."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._writer_error is not None:
            error, self._writer_error = self._writer_error, None
            raise error

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if ParamSpec.from_dict(state["spec"]) != self.spec:
            raise CheckpointError("checkpoint was written for a different model; resume with the run's own config")
        if state["strategy_name"] != self.strategy.name:
            raise CheckpointError(f"checkpoint was written by {state['strategy_name']}, not {self.strategy.name}")
        self.round = int(state["round"])
        self.state = ServerState(state["weights"].to(torch.float32), dict(state.get("extras", {})),
                                 int(state.get("model_version", self.round)))
        self.strategy.load_state_dict(state["strategy"])
        self.history = list(state["history"])
        self.seed = int(state["seed"])
        if self.client_state is not None and "client_state" in state:
            self.client_state.load_state_dict(state["client_state"])

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the last round completed in the checkpoint at ``path``."""
        self.load_state_dict(load_checkpoint(path))
