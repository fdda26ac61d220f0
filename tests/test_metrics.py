"""Binary-task metrics against scikit-learn on fixed data, and the exactness of their federated pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score, roc_auc_score

from fedlearn.metrics import (
    NUM_BINS,
    BinaryScores,
    ConfusionCounts,
    MarginHistogram,
    margin_bins,
    pool_federated,
    roc_auc,
)


def fixed_data(n: int, seed: int, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels (about 30% positive) and informative scores rounded to force many ties."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(np.int64)
    scores = np.round(rng.normal(size=n) + 1.2 * labels, decimals)
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [0, 1, 6])
def test_roc_auc_equals_sklearn_exactly_with_and_without_ties(seed: int, decimals: int) -> None:
    labels, scores = fixed_data(500, seed, decimals)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_auc_hand_computed_and_undefined_cases() -> None:
    # positives 0.8 and 0.4; negatives 0.4 and 0.1: pairs (win, tie, win, win) -> 3.5 / 4
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == 0.875
    assert roc_auc([0, 1], [1.0, 0.0]) == 0.0
    assert roc_auc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert roc_auc([0, 0], [0.1, 0.2]) is None


def test_confusion_counts_match_sklearn() -> None:
    labels, scores = fixed_data(400, 3)
    predictions = (scores > 0.6).astype(np.int64)
    counts = ConfusionCounts.from_predictions(torch.as_tensor(labels), torch.as_tensor(predictions))
    tn, fp, fn, tp = confusion_matrix(labels, predictions).ravel()
    assert (counts.tp, counts.fp, counts.tn, counts.fn) == (tp, fp, tn, fn)
    assert counts.sensitivity == pytest.approx(recall_score(labels, predictions), abs=1e-15)
    assert counts.specificity == pytest.approx(recall_score(labels, predictions, pos_label=0), abs=1e-15)
    assert counts.balanced_accuracy == pytest.approx(balanced_accuracy_score(labels, predictions), abs=1e-15)


def test_confusion_counts_without_a_class_leave_its_rate_undefined() -> None:
    only_positive = ConfusionCounts(tp=3, fn=1)
    assert only_positive.sensitivity == 0.75
    assert only_positive.specificity is None and only_positive.balanced_accuracy is None
    assert ConfusionCounts().sensitivity is None


def logits_for(margins: np.ndarray) -> torch.Tensor:
    """Two-column logits whose margin logit_1 - logit_0 is ``margins`` (with an arbitrary common offset)."""
    m = torch.as_tensor(margins, dtype=torch.float32)
    return torch.stack([0.5 - m / 2, 0.5 + m / 2], dim=1)


def test_binary_scores_over_batches_equal_sklearn_on_the_whole() -> None:
    labels, margins = fixed_data(300, 4)
    scores = BinaryScores()
    for start in range(0, 300, 64):
        part = slice(start, start + 64)
        scores.update(logits_for(margins[part]), torch.as_tensor(labels[part]))
    predictions = logits_for(margins).argmax(dim=1).numpy()  # what evaluate_model's accuracy counts
    metrics = scores.metrics()
    assert scores.is_binary
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, margins), abs=1e-12)
    assert metrics["sensitivity"] == pytest.approx(recall_score(labels, predictions), abs=1e-15)
    assert metrics["specificity"] == pytest.approx(recall_score(labels, predictions, pos_label=0), abs=1e-15)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions), abs=1e-15)


def test_a_tie_between_the_two_logits_is_class_zero_like_argmax() -> None:
    scores = BinaryScores()
    scores.update(torch.tensor([[1.0, 1.0], [0.0, 2.0]]), torch.tensor([1, 1]))
    assert scores.counts() == ConfusionCounts(tp=1, fn=1)


def test_more_than_two_outputs_is_not_binary() -> None:
    scores = BinaryScores()
    scores.update(torch.randn(8, 10), torch.randint(0, 10, (8,)))
    assert not scores.is_binary
    assert scores.metrics() == {} and scores.federated_payload() == {}


def test_margin_bins_are_monotone_and_cover_every_real_margin() -> None:
    margins = torch.tensor([-1e9, -16.01, -16.0, -0.07, 0.0, 0.07, 15.99, 16.0, 1e9])
    bins = margin_bins(margins)
    assert bins[0] == 0 and bins[1] == 0 and bins[-1] == NUM_BINS - 1
    assert torch.all(bins[1:] >= bins[:-1])
    assert bins[3] != bins[4] and bins[4] == bins[5]  # width 1/8: 0 and 0.07 share a bin, -0.07 does not


def test_histogram_auc_is_exact_when_no_pair_shares_a_bin() -> None:
    rng = np.random.default_rng(5)
    margins = rng.permutation(np.arange(-10.0, 10.0, 0.5))  # 40 distinct bins
    labels = (rng.random(margins.size) < 0.4).astype(np.int64)
    auc, max_error = MarginHistogram.from_scores(torch.as_tensor(labels), torch.as_tensor(margins)).auc()
    assert max_error == 0.0
    assert auc == pytest.approx(roc_auc_score(labels, margins), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_histogram_auc_stays_within_its_reported_bound(seed: int) -> None:
    labels, margins = fixed_data(1000, seed, decimals=6)
    auc, max_error = MarginHistogram.from_scores(torch.as_tensor(labels), torch.as_tensor(margins)).auc()
    exact = roc_auc_score(labels, margins)
    assert 0 < max_error < 0.02
    assert abs(auc - exact) <= max_error + 1e-12


def test_every_metric_is_a_plain_python_number() -> None:
    """A numpy float64 in a history row made the checkpoint fail weights_only loading on --resume."""
    labels, margins = fixed_data(300, 9, decimals=2)
    histogram = MarginHistogram.from_scores(torch.as_tensor(labels), torch.as_tensor(margins))
    assert [type(v) for v in histogram.auc()] == [float, float]
    scores = BinaryScores()
    scores.update(logits_for(margins), torch.as_tensor(labels))
    local = scores.metrics()
    pooled = pool_federated([scores.federated_payload()])
    for key, value in {**local, **{f"fed_{k}": v for k, v in pooled.items()}}.items():
        assert type(value) is float, (key, type(value))
    assert pooled["auc"] == pytest.approx(local["auc"], abs=pooled["auc_max_error"] + 1e-12)


def split_payloads(labels: np.ndarray, margins: np.ndarray, cuts: list[int]) -> list[dict[str, float]]:
    """What clients holding consecutive slices of the data would send."""
    payloads = []
    for part_labels, part_margins in zip(np.split(labels, cuts), np.split(margins, cuts)):
        scores = BinaryScores()
        scores.update(logits_for(part_margins), torch.as_tensor(part_labels))
        payloads.append(scores.federated_payload())
    return payloads


def test_pooling_sums_counts_exactly_instead_of_averaging_client_rates() -> None:
    labels, margins = fixed_data(600, 6)
    labels[:100] = 1  # the first client sees almost only positives, so averaging its rates would be far off
    payloads = split_payloads(labels, margins, [100, 350])
    pooled = pool_federated(payloads)
    predictions = (margins > 0).astype(np.int64)
    whole = ConfusionCounts.from_predictions(torch.as_tensor(labels), torch.as_tensor(predictions))
    first, second, third = (ConfusionCounts.from_metrics(p) for p in payloads)
    assert first + second + third == whole
    assert pooled["sensitivity"] == recall_score(labels, predictions)
    assert pooled["specificity"] == recall_score(labels, predictions, pos_label=0)
    assert pooled["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions), abs=1e-15)
    # The pooled histogram is the histogram of all the data, so its AUC is the same as one site holding it all.
    whole_histogram = MarginHistogram.from_scores(torch.as_tensor(labels), torch.as_tensor(margins))
    assert (pooled["auc"], pooled["auc_max_error"]) == whole_histogram.auc()
    assert abs(pooled["auc"] - roc_auc_score(labels, margins)) <= pooled["auc_max_error"]
    rates = [second.specificity, third.specificity]
    assert abs(np.mean(rates) - pooled["specificity"]) > 1e-3  # averaging per-client rates is not the same


def test_pooling_ignores_clients_without_counts_and_is_empty_for_multiclass() -> None:
    labels, margins = fixed_data(200, 7)
    payloads = split_payloads(labels, margins, [120])
    assert pool_federated([*payloads, {}]) == pool_federated(payloads)
    assert pool_federated([{}, {"below_clip": 1.0}]) == {}


def test_payload_is_sparse_and_round_trips() -> None:
    labels, margins = fixed_data(50, 8)
    payload = split_payloads(labels, margins, [])[0]
    histogram = MarginHistogram.from_scores(torch.as_tensor(labels), torch.as_tensor(margins))
    assert len(payload) <= 4 + 2 * 50
    assert MarginHistogram.from_metrics(payload) == histogram
    assert MarginHistogram.from_metrics({"pos_bin_x": 3.0, "neg_bin_-1": 2.0, f"pos_bin_{NUM_BINS}": 1.0}) \
        == MarginHistogram()


@pytest.mark.parametrize("bad", [{"tp": float("nan")}, {"fn": -1.0}, {"tn": 2.5}, {"pos_bin_3": float("inf")},
                                 {"neg_bin_7": -4.0}])
def test_a_malformed_client_payload_is_left_out_with_a_warning(bad: dict, caplog) -> None:
    labels, margins = fixed_data(200, 9)
    payloads = split_payloads(labels, margins, [80])
    broken = {**payloads[1], **bad}
    with caplog.at_level("WARNING", logger="fedlearn.metrics"):
        assert pool_federated([payloads[0], broken]) == pool_federated([payloads[0]])
    assert "malformed" in caplog.text
