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
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from fedlearn.client.state import ClientStateStore
from fedlearn.errors import CheckpointError, InvalidUpdateError
from fedlearn.metrics import BINARY_KEYS, FEDERATED_KEYS
from fedlearn.protocol.messages import EvalResult, Message, TrainResult
from fedlearn.protocol.params import ParamSpec, check_vector
from fedlearn.runtime.base import Runtime
from fedlearn.server.checkpoint import KEEP, load_latest_checkpoint, save_checkpoint
from fedlearn.server.collect import Traffic, collect
from fedlearn.server.influence import InfluenceBound
from fedlearn.server.ledger import LEDGER, PrivacyLedger, carry_forward, privacy_state
from fedlearn.server.validation import MAX_EXAMPLES_PER_CLIENT, check_eval_result, check_result
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
        bound = loop.influence
        limit = bound.limit(loop.state.weights) if bound is not None else math.inf

        def accept(task: Message, answer: Message) -> None:
            if not isinstance(answer, TrainResult):
                raise InvalidUpdateError(f"{answer.client_id} answered a train task with a {type(answer).__name__}")
            answer = check_result(answer, task, expected, known=loop.declared(answer.client_id, 0),
                                  ceiling=loop.max_examples, finite=bound is None)  # the bound's norm scans for NaN
            arrays = answer.arrays if bound is None else bound.apply(answer.client_id, answer.arrays, limit)
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
        influence: InfluenceBound | None = None,
        max_examples: int = MAX_EXAMPLES_PER_CLIENT,
        binary: bool | None = None,
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
        self.influence = influence  # the per-client norm bound of plain rounds (None: off)
        self.max_examples = max_examples  # the ceiling on any count a client declares
        self.binary = binary  # whether the model is a two-class classifier (None: unknown, binary counts accepted)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.round_losses: list[tuple[float, int]] = []
        self.eval_failed: list[str] = []  # the last federated evaluation's clients that failed or were refused
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._kept: deque[dict[str, int]] = deque(maxlen=KEEP)  # client-state indexes the kept checkpoints name

    @property
    def weights(self) -> torch.Tensor:
        return self.state.weights

    def declared(self, client_id: str, which: int) -> int | None:
        """The client's training (0) or test (1) count as the runtime knows it (declared at join, or the
        simulation's partition); None when the runtime cannot tell."""
        declared = getattr(self.runtime, "declared_examples", None)
        counts = declared(client_id) if declared is not None else None
        return None if counts is None else counts[which]

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
        self._book_privacy(rnd)
        needed = max(self.min_clients, math.ceil(self.min_fit_fraction * sampled - 1e-9), 1)
        aggregated = aggregator.count >= needed
        if aggregated or self.strategy.aggregates_empty_rounds:
            new = self._applied(rnd, aggregator)
            aggregated = aggregated and new is not None
            self.state = new or self.state
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
        if self.influence is not None and self.sums.name == "plain":
            row.update(self.influence.end_round())  # updates scaled down to the round's limit, or refused
        if self.sums.name != "plain":
            row["secure_aggregation"] = self.sums.name
            if aborted:
                row["secure_aggregation_aborted"] = aborted
        return row

    def _applied(self, rnd: int, aggregator: Aggregator) -> ServerState | None:
        """The strategy's new state, or None (weights unchanged) when it would leave the model non-finite."""
        try:
            new = self.strategy.apply(self.state, aggregator.result(), aggregator.count)
        except InvalidUpdateError as exc:
            log.error("round %d: the aggregate was refused (%s); weights unchanged", rnd, exc)
            return None
        low, high = torch.aminmax(new.weights)
        if not (math.isfinite(low.item()) and math.isfinite(high.item())):
            log.error("round %d: the aggregate would make the model non-finite; weights unchanged", rnd)
            return None
        return new

    def _evaluate(self, rnd: int) -> dict[str, Any]:
        """The row's test fields: central when there is an evaluator, else federated; binary tasks add
        ``test_auc``, ``test_sensitivity``, ``test_specificity``, ``test_balanced_accuracy`` (and ``fed_*``)."""
        out: dict[str, Any] = {f"test_{k}": None for k in self.reported}
        if self.federated_eval:
            fed = self.evaluate_federated(rnd)
            out["fed_failed_clients"] = self.eval_failed  # refused or silent at evaluation
            for key in self.reported:
                out[f"fed_{key}"] = out[f"test_{key}"] = fed.get(key)
            out.update({f"fed_{k}": fed[k] for k in FEDERATED_KEYS if k in fed})
            out.update({f"test_{k}": fed[k] for k in BINARY_KEYS if k in fed})
        if self.evaluator is not None:
            central = self.evaluator.score(self.state.weights)
            out.update({f"test_{k}": central.get(k) for k in self.reported})
            out.update({f"test_{k}": central[k] for k in BINARY_KEYS if k in central})
        diverged = sorted(k for k, v in out.items() if isinstance(v, float) and not math.isfinite(v))
        if diverged:  # JSON has no NaN: the row says None, the log says why
            log.warning("round %d: the global model's %s is not finite: it diverged (lower --lr) or was poisoned",
                        rnd, ", ".join(diverged))
            out.update(dict.fromkeys(diverged))
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
            results.append(check_eval_result(answer, task, known=self.declared(answer.client_id, 1),
                                             ceiling=self.max_examples, binary=self.binary))

        self.eval_failed = collect(self.runtime, tasks, accept, rnd, "evaluation").failed
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
        if self.influence is not None:
            out["influence"] = self.influence.state_dict()
        return out

    def save(self, path: str | os.PathLike, *, background: bool = False) -> None:
        """Checkpoint atomically: client state files first, then the server state that names them.

        The last ``KEEP`` checkpoints are kept (``checkpoint.pt``, ``checkpoint.1.pt``, ...), and the client state
        files each of them names, so a resume can fall back to an older one. With ``background`` the file is written
        (and fsynced) by a thread while the next round trains; ``apply`` waits for it before the next round's
        results change the model, so a crash still leaves the previous round's checkpoint or this one.
        """
        self.flush()
        if self.client_state is not None:
            self.client_state.commit()
        state = {**self.state_dict(), "history": list(self.history), "client_state_kept": list(self._kept)[1 - KEEP:]}
        index = self.client_state.index() if self.client_state is not None else {}

        def write() -> None:
            try:
                save_checkpoint(path, state, keep=KEEP)
                self._kept.append(index)
                if self.client_state is not None:
                    self.client_state.prune(self._kept)
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

    def _ledger(self, path: str | os.PathLike | None = None) -> PrivacyLedger | None:
        """The run folder's privacy ledger (beside the checkpoint), or None without a checkpoint path."""
        path = path if path is not None else self.checkpoint_path
        return None if path is None else PrivacyLedger(Path(path).with_name(LEDGER))

    def _book_privacy(self, rnd: int) -> None:
        """Record what the strategy has spent, through round ``rnd``, before that round's results are applied."""
        ledger = self._ledger()
        spent = privacy_state(self.strategy) if ledger is not None else None
        if ledger is not None and spent is not None:
            ledger.record(rnd, spent)

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
        if self.influence is not None and "influence" in state:
            self.influence.load_state_dict(state["influence"])

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the newest intact checkpoint of ``path`` (damaged ones are skipped with a warning).

        Falling back to an older checkpoint rolls the client state back with it, but not the privacy spent: the
        accountant continues from the run's privacy ledger when that is ahead of the checkpoint.
        """
        state, used = load_latest_checkpoint(path, keep=KEEP)
        self.load_state_dict(state)
        kept = [k for k in state.get("client_state_kept", []) if isinstance(k, dict)
                and all(isinstance(c, str) and type(v) is int for c, v in k.items())]
        own = self.client_state.index() if self.client_state is not None else {}
        self._kept = deque([*kept, own], maxlen=KEEP)
        ledger = self._ledger(path)
        spent = ledger.latest() if ledger is not None else None
        if spent is not None and carry_forward(self.strategy, spent):
            log.warning("resuming at round %d from %s, but privacy was spent through round %d: the accountant "
                        "keeps that spend (privacy is never rolled back)", self.round, used.name, spent["round"])
