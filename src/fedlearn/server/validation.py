"""Checks on what a client sends back, before anything of it touches the aggregate or the run's metrics.

Every field is hostile until checked: the round and client must match the task, counts must be plain
integers within what the server knows of the client (a result's weight is clamped to it), arrays
must be finite float32 vectors of the declared lengths, and metrics finite numbers within their
ranges, with evaluation sums consistent with the count they claim.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace

from fedlearn.errors import InvalidUpdateError
from fedlearn.metrics import COUNT_KEYS, ConfusionCounts, MarginHistogram
from fedlearn.protocol.messages import MAX_EXAMPLES_PER_CLIENT, EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.strategies.base import check_arrays
from fedlearn.tasks import SUM_PREFIX

log = logging.getLogger(__name__)

UNIT_METRICS = frozenset({"accuracy", "auc", "sensitivity", "specificity", "balanced_accuracy", "auc_max_error"})
NON_NEGATIVE_METRICS = frozenset({"loss", "mse", "mae", "train_loss"})
MAX_METRIC = 1e15  # no honest metric or sum comes near it (10**7 examples x a loss of 10**8); a larger one overflows


def check_count(client_id: str, count: object, what: str, *, ceiling: int, minimum: int = 0) -> int:
    """A plain integer count in [minimum, ceiling] (a bool, float or string is refused)."""
    if isinstance(count, bool) or not isinstance(count, int) or not minimum <= count <= ceiling:
        raise InvalidUpdateError(f"result from {client_id} claims {count!r} {what}; expected an integer from "
                                 f"{minimum} to {ceiling}")
    return count


def check_result(result: TrainResult, task: TrainTask | None, expected: Mapping[str, int], *,
                 known: int | None = None, ceiling: int = MAX_EXAMPLES_PER_CLIENT, finite: bool = True) -> TrainResult:
    """The result with its arrays checked and its weight clamped to ``known`` (the client's training count as the
    server knows it), or InvalidUpdateError saying why it is refused. ``finite=False``: the caller scans the
    arrays for NaN/Inf itself (see ``check_arrays``)."""
    if task is None or result.round != task.round or result.client_id != task.client_id:
        raise InvalidUpdateError(f"result from {result.client_id} is for round {result.round}, which it was not given")
    count = check_count(result.client_id, result.num_examples, "training examples", ceiling=ceiling, minimum=1)
    check_metrics(result.client_id, result.metrics)
    check_arrays(result, expected, finite=finite)
    if known is not None and known < 1:
        raise InvalidUpdateError(f"result from {result.client_id}, which declared no training examples")
    if known is not None and count > known:
        log.warning("round %d: %s claims %d training examples but declared %d; weighting it by %d", result.round,
                    result.client_id, count, known, known)
        return replace(result, num_examples=known)
    return result


def check_eval_result(result: EvalResult, task: EvalTask | None, *, known: int | None = None,
                      ceiling: int = MAX_EXAMPLES_PER_CLIENT, binary: bool | None = None) -> EvalResult:
    """An evaluation answer whose count is within what the client holds and whose metrics and sums are
    consistent with it, or InvalidUpdateError (the answer is left out of the federated metrics). ``binary``
    False (the model does not have two outputs) refuses binary confusion counts and histograms."""
    if task is None or result.round != task.round or result.client_id != task.client_id:
        raise InvalidUpdateError(f"evaluation from {result.client_id} is for round {result.round}, which it was "
                                 "not given")
    limit = ceiling if known is None else min(known, ceiling)
    n = check_count(result.client_id, result.num_examples, "test examples", ceiling=limit)
    check_metrics(result.client_id, result.metrics)
    if n == 0 and result.metrics:
        raise InvalidUpdateError(f"evaluation from {result.client_id} reports metrics for 0 examples")
    _check_sums(result.client_id, result.metrics, n, binary)
    return result


def _plain_number(value: object) -> bool:
    """An int or float (not bool) of magnitude at most MAX_METRIC; a huge int is refused before float() sees it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return abs(value) <= MAX_METRIC if isinstance(value, int) else math.isfinite(value) and abs(value) <= MAX_METRIC


def check_metrics(client_id: str, metrics: object) -> None:
    """Metrics must be finite numbers by name (at most MAX_METRIC in size); rates within [0, 1], losses >= 0."""
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and _plain_number(v) for k, v in metrics.items()):
        raise InvalidUpdateError(f"result from {client_id} has metrics that are not finite numbers by name "
                                 f"(of size at most {MAX_METRIC:g})")
    for key, value in metrics.items():
        if (key in UNIT_METRICS and not 0 <= value <= 1) or (key in NON_NEGATIVE_METRICS and value < 0):
            raise InvalidUpdateError(f"result from {client_id} reports {key} = {value}, outside its range")


def histogram_sent(metrics: Mapping[str, float]) -> bool:
    """Whether ``metrics`` carries margin-histogram bins (a binary task's federated AUC)."""
    empty = MarginHistogram()
    try:
        return MarginHistogram.from_metrics(metrics) != empty
    except ValueError:
        return True


def _check_sums(client_id: str, metrics: Mapping[str, float], n: int, binary: bool | None = None) -> None:
    """Evaluation sums (``sum.<task>.*``, binary confusion counts and margin histograms) are whole where they
    count, not negative, and add up to the ``n`` examples the answer claims."""
    sums = {key.split(".", 2)[-1]: value for key, value in metrics.items() if key.startswith(SUM_PREFIX)}
    if any(value < 0 for value in sums.values()):
        raise InvalidUpdateError(f"evaluation from {client_id} reports a negative sum")
    if sums:
        decisions = sums.get("decisions", n)
        if sums.get("n") != n or sums.get("correct", 0) > decisions or (n and decisions % n):
            raise InvalidUpdateError(f"evaluation from {client_id} has sums inconsistent with its {n} examples")
    try:
        counts = ConfusionCounts.from_metrics(metrics)
        histogram = MarginHistogram.from_metrics(metrics) if counts is not None else None
    except ValueError as exc:
        raise InvalidUpdateError(f"evaluation from {client_id} has malformed binary counts: {exc}") from None
    if binary is False and (any(k in metrics for k in COUNT_KEYS) or histogram_sent(metrics)):
        raise InvalidUpdateError(f"evaluation from {client_id} sends binary-task counts, but the model is not binary")
    if counts is not None and histogram is not None:
        positives, total = counts.tp + counts.fn, counts.tp + counts.fp + counts.tn + counts.fn
        if total != n or sum(histogram.positives) != positives or sum(histogram.negatives) != n - positives:
            raise InvalidUpdateError(f"evaluation from {client_id} has binary counts that do not add up to {n}")
