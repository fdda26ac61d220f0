"""Checks on what a client sends back, before anything of it touches the aggregate."""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import Arrays, TrainResult, TrainTask
from fedlearn.strategies.base import check_arrays


def check_result(result: TrainResult, task: TrainTask | None, expected: Mapping[str, int]) -> Arrays:
    """The result's uplink arrays, or InvalidUpdateError saying why the result is refused."""
    if task is None or result.round != task.round or result.client_id != task.client_id:
        raise InvalidUpdateError(f"result from {result.client_id} is for round {result.round}, which it was not given")
    if isinstance(result.num_examples, bool) or not isinstance(result.num_examples, int) or result.num_examples <= 0:
        raise InvalidUpdateError(f"result from {result.client_id} claims {result.num_examples!r} examples")
    check_metrics(result.client_id, result.metrics)
    return check_arrays(result, expected)


def check_metrics(client_id: str, metrics: object) -> None:
    """Metrics must be finite numbers by name."""
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for k, v in metrics.items()
    ):
        raise InvalidUpdateError(f"result from {client_id} has metrics that are not finite numbers by name")
