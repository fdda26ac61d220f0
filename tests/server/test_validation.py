"""check_result: what the server refuses before anything touches the aggregate."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.server.validation import check_eval_result, check_result

TASK = TrainTask(4, "c", {"weights": torch.zeros(8)}, {})
EXPECTED = {"update": 8}


def result(update=None, **changes) -> TrainResult:
    fields = {"round": 4, "client_id": "c", "num_examples": 10,
              "arrays": {"update": torch.ones(8) if update is None else update}}
    fields.update(changes)
    return TrainResult(**fields)


def test_accepts_a_valid_result_and_returns_it() -> None:
    r = result(torch.arange(8.0))
    out = check_result(r, TASK, EXPECTED)
    assert out is r  # nothing copied on the way to the aggregator
    # several uplink arrays (SCAFFOLD's control delta travels with the update)
    two = result(arrays={"update": torch.ones(8), "control_delta": torch.zeros(8)})
    assert set(check_result(two, TASK, {"update": 8, "control_delta": 8}).arrays) == {"update", "control_delta"}


def test_a_count_above_what_the_server_knows_is_clamped_to_it() -> None:
    """Claiming 10**12 examples made the global model the attacker's vector: the weight is the declared count."""
    assert check_result(result(num_examples=10**6), TASK, EXPECTED, known=40, ceiling=10**9).num_examples == 40
    assert check_result(result(num_examples=30), TASK, EXPECTED, known=40).num_examples == 30
    assert check_result(result(num_examples=30), TASK, EXPECTED, known=None).num_examples == 30
    with pytest.raises(InvalidUpdateError, match="declared no training examples"):  # a weight of 0 crashed
        check_result(result(num_examples=30), TASK, EXPECTED, known=0)


@pytest.mark.parametrize("n", [10**12, 10**400, 2**63])
def test_a_count_above_the_ceiling_is_refused_without_overflowing(n) -> None:
    with pytest.raises(InvalidUpdateError, match="integer from 1 to 1000"):
        check_result(result(num_examples=n), TASK, EXPECTED, known=40, ceiling=1000)


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


@pytest.mark.parametrize("metrics", [{"train_loss": -1.0}, {"accuracy": 1.5}, {"auc": -0.1}],
                         ids=["negative-loss", "accuracy-above-1", "negative-auc"])
def test_refuses_metrics_outside_their_range(metrics) -> None:
    with pytest.raises(InvalidUpdateError, match="outside its range"):
        check_result(result(metrics=metrics), TASK, EXPECTED)


# ----- evaluation answers ------------------------------------------------------------------------------------------
EVAL = EvalTask(4, "c", {"weights": torch.zeros(8)}, {})


def honest_eval(n: int = 20, correct: int = 14) -> EvalResult:
    sums = {"sum.classification.n": float(n), "sum.classification.loss_sum": 9.0,
            "sum.classification.correct": float(correct)}
    return EvalResult(4, "c", n, {"loss": 0.45, "accuracy": correct / n, **sums})


def binary_eval() -> EvalResult:
    counts = {"tp": 3.0, "fp": 1.0, "tn": 4.0, "fn": 2.0}
    histogram = {"pos_bin_130": 3.0, "pos_bin_120": 2.0, "neg_bin_100": 5.0}
    r = honest_eval(10, 7)
    return EvalResult(4, "c", 10, {**r.metrics, **counts, **histogram})


def test_an_honest_evaluation_is_accepted_and_a_pooled_run_uses_it() -> None:
    assert check_eval_result(honest_eval(), EVAL, known=20) is not None
    assert check_eval_result(binary_eval(), EVAL, known=10) is not None
    assert check_eval_result(EvalResult(4, "c", 0, {}), EVAL, known=0) is not None  # no test data


@pytest.mark.parametrize("change", [
    {"num_examples": 21},                                           # more than the client holds
    {"num_examples": 10**400},                                      # a count that overflows a float
    {"num_examples": "20"},                                         # a string count crashed the server
    {"metrics": {"accuracy": 0.99999992, "sum.classification.n": 10**9, "sum.classification.correct": 10**9 - 1}},
    {"metrics": {"accuracy": float("nan")}},                        # NaN reached summary.json
    {"metrics": {"accuracy": 0.5, "sum.classification.n": 20.0, "sum.classification.correct": 25.0}},
    {"metrics": {"accuracy": 0.5, "sum.classification.n": 19.0, "sum.classification.correct": 5.0}},
    {"metrics": {"accuracy": 0.5, "sum.classification.n": 20.0, "sum.classification.loss_sum": -3.0}},
    {"round": 3},
], ids=["above-known", "huge", "string", "inflated-sums", "nan", "correct-above-n", "n-mismatch", "negative-sum",
        "other-round"])
def test_a_hostile_evaluation_is_refused(change) -> None:
    honest = honest_eval()
    fields = {"round": honest.round, "client_id": "c", "num_examples": honest.num_examples,
              "metrics": honest.metrics, **change}
    with pytest.raises(InvalidUpdateError):
        check_eval_result(EvalResult(**fields), EVAL, known=20)


@pytest.mark.parametrize("key,value", [("tp", 30.0), ("fn", 2.5), ("pos_bin_130", 9.0), ("neg_bin_100", -1.0)])
def test_binary_counts_must_add_up_to_the_claimed_examples(key: str, value: float) -> None:
    r = binary_eval()
    with pytest.raises(InvalidUpdateError):
        check_eval_result(EvalResult(4, "c", 10, {**r.metrics, key: value}), EVAL, known=10)


@pytest.mark.parametrize("value", [10**400, 1e308, -(10**16)], ids=["huge-int", "huge-float", "huge-negative"])
def test_a_metric_too_large_to_add_is_refused_without_overflowing(value) -> None:
    """10**400 crashed the server (math.isfinite raised OverflowError); 1e308 made the round's loss inf."""
    with pytest.raises(InvalidUpdateError, match="finite numbers by name"):
        check_result(result(metrics={"train_loss": value}), TASK, EXPECTED)
    with pytest.raises(InvalidUpdateError, match="finite numbers by name"):
        check_eval_result(EvalResult(4, "c", 20, {"loss": value}), EVAL, known=20)


def test_binary_counts_in_a_model_that_is_not_binary_are_refused() -> None:
    """One client forged final_auc and friends into a ten-class run's summary."""
    with pytest.raises(InvalidUpdateError, match="not binary"):
        check_eval_result(binary_eval(), EVAL, known=10, binary=False)
    assert check_eval_result(binary_eval(), EVAL, known=10, binary=True) is not None
    with pytest.raises(InvalidUpdateError, match="not binary"):  # a histogram alone is refused too
        check_eval_result(EvalResult(4, "c", 10, {"pos_bin_3": 10.0}), EVAL, known=10, binary=False)
    assert check_eval_result(honest_eval(), EVAL, known=20, binary=False) is not None


def test_a_check_that_breaks_on_hostile_input_refuses_that_answer_and_the_round_goes_on() -> None:
    from fedlearn.server.collect import collect

    class Runtime:
        def deliver(self, tasks):
            yield from (EvalResult(t.round, t.client_id, 1, {}) for t in tasks)

    accepted = []

    def accept(task, answer):
        if answer.client_id == "bad":
            raise OverflowError("a bug in a check")
        accepted.append(answer.client_id)

    tasks = [EvalTask(4, cid, {"weights": torch.zeros(8)}, {}) for cid in ("a", "bad", "b")]
    traffic = collect(Runtime(), tasks, accept, 4, "evaluation")
    assert accepted == ["a", "b"] and traffic.failed == ["bad"]
