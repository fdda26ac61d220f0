"""check_result: what the server refuses before anything touches the aggregate."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.server.validation import check_result

TASK = TrainTask(4, "c", {"weights": torch.zeros(8)}, {})
EXPECTED = {"update": 8}


def result(update=None, **changes) -> TrainResult:
    fields = {"round": 4, "client_id": "c", "num_examples": 10,
              "arrays": {"update": torch.ones(8) if update is None else update}}
    fields.update(changes)
    return TrainResult(**fields)


def test_accepts_a_valid_result_and_returns_its_arrays() -> None:
    r = result(torch.arange(8.0))
    out = check_result(r, TASK, EXPECTED)
    assert out is r.arrays
    assert out["update"] is r.arrays["update"]
    # several uplink arrays (SCAFFOLD's control delta travels with the update)
    two = result(arrays={"update": torch.ones(8), "control_delta": torch.zeros(8)})
    assert set(check_result(two, TASK, {"update": 8, "control_delta": 8})) == {"update", "control_delta"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 7])
def test_refuses_non_finite(bad: float, where: int) -> None:
    p = torch.ones(8)
    p[where] = bad
    with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
        check_result(result(p), TASK, EXPECTED)
    # a non-finite value in any uplink array is refused, not only in the update
    with pytest.raises(InvalidUpdateError, match="NaN or Inf"):
        check_result(result(arrays={"update": torch.ones(8), "control_delta": p}), TASK,
                      {"update": 8, "control_delta": 8})


@pytest.mark.parametrize("update", [torch.ones(7), torch.ones(9), torch.ones(2, 4), torch.ones(()), torch.ones(0)])
def test_refuses_wrong_size_or_rank(update: torch.Tensor) -> None:
    with pytest.raises(InvalidUpdateError):
        check_result(result(update), TASK, EXPECTED)


@pytest.mark.parametrize("rnd", [3, 5, 0, -4])
def test_refuses_wrong_round(rnd: int) -> None:
    with pytest.raises(InvalidUpdateError, match="round"):
        check_result(result(round=rnd), TASK, EXPECTED)


def test_refuses_result_without_a_task() -> None:
    with pytest.raises(InvalidUpdateError):
        check_result(result(), None, EXPECTED)
    with pytest.raises(InvalidUpdateError):
        check_result(result(client_id="other"), TASK, EXPECTED)


@pytest.mark.parametrize("n", [0, -1, -100, 2.5, "10", None, True])
def test_refuses_bad_num_examples(n) -> None:
    with pytest.raises(InvalidUpdateError, match="examples"):
        check_result(result(num_examples=n), TASK, EXPECTED)


# The uplink must be float32: a float64 update (accepted by the old flat-payload check) is refused now.
@pytest.mark.parametrize(
    "update",
    [torch.ones(8, dtype=torch.long), torch.ones(8, dtype=torch.bool), torch.ones(8, dtype=torch.float64),
     torch.ones(8, dtype=torch.float16), [1.0] * 8, None],
    ids=["long", "bool", "float64", "float16", "list", "none"],
)
def test_refuses_non_float32_update(update) -> None:
    r = result()
    r.arrays["update"] = update
    with pytest.raises(InvalidUpdateError):
        check_result(r, TASK, EXPECTED)


@pytest.mark.parametrize(
    "arrays",
    [{}, {"gradient": torch.ones(8)}, {"update": torch.ones(8), "extra": torch.ones(8)}, None, [torch.ones(8)]],
    ids=["none", "wrong-name", "extra-array", "null", "list"],
)
def test_refuses_arrays_other_than_the_expected_ones(arrays) -> None:
    r = result()
    r.arrays = arrays
    with pytest.raises(InvalidUpdateError):
        check_result(r, TASK, EXPECTED)


@pytest.mark.parametrize(
    "metrics",
    [{"train_loss": "low"}, {"train_loss": float("nan")}, {"train_loss": True}, ["train_loss", 0.1], {1: 0.5}],
    ids=["string", "nan", "bool", "list", "non-string-key"],
)
def test_refuses_metrics_that_are_not_finite_numbers_by_name(metrics) -> None:
    with pytest.raises(InvalidUpdateError, match="metrics"):
        check_result(result(metrics=metrics), TASK, EXPECTED)
