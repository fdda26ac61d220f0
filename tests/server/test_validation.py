"""check_result: what the server refuses before anything touches the aggregate."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec
from fedlearn.server.validation import check_result

SPEC = ParamSpec(("w", "b"), ((3, 2), (2,)), ("float32", "float32"))
TASK = TrainTask(4, "c", torch.zeros(8), {})


def result(payload=None, **changes) -> TrainResult:
    fields = {"round": 4, "client_id": "c", "num_examples": 10, "payload": torch.ones(8)}
    if payload is not None:
        fields["payload"] = payload
    fields.update(changes)
    return TrainResult(**fields)


def test_accepts_a_valid_result_and_returns_its_payload() -> None:
    r = result(torch.arange(8.0))
    out = check_result(r, TASK, SPEC)
    assert out is r.payload
    assert check_result(result(torch.zeros(8, dtype=torch.float64)), TASK, SPEC).dtype == torch.float64


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 7])
def test_refuses_non_finite(bad: float, where: int) -> None:
    p = torch.ones(8)
    p[where] = bad
    with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
        check_result(result(p), TASK, SPEC)


@pytest.mark.parametrize("payload", [torch.ones(7), torch.ones(9), torch.ones(2, 4), torch.ones(()), torch.ones(0)])
def test_refuses_wrong_size_or_rank(payload: torch.Tensor) -> None:
    with pytest.raises(InvalidUpdateError):
        check_result(result(payload), TASK, SPEC)


@pytest.mark.parametrize("rnd", [3, 5, 0, -4])
def test_refuses_wrong_round(rnd: int) -> None:
    with pytest.raises(InvalidUpdateError, match="round"):
        check_result(result(round=rnd), TASK, SPEC)


def test_refuses_result_without_a_task() -> None:
    with pytest.raises(InvalidUpdateError):
        check_result(result(), None, SPEC)


@pytest.mark.parametrize("n", [0, -1, -100, 2.5, "10", None])
def test_refuses_bad_num_examples(n) -> None:
    with pytest.raises(InvalidUpdateError, match="examples"):
        check_result(result(num_examples=n), TASK, SPEC)


@pytest.mark.parametrize("payload", [torch.ones(8, dtype=torch.long), torch.ones(8, dtype=torch.bool), [1.0] * 8, None])
def test_refuses_non_float_payload(payload) -> None:
    r = result()
    r.payload = payload
    with pytest.raises(InvalidUpdateError):
        check_result(r, TASK, SPEC)
