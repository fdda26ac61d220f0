"""Metrics for imbalanced binary tasks (positive class = 1): ROC AUC, sensitivity, specificity, balanced accuracy.

Central evaluation sees every score and computes ROC AUC exactly (the Mann-Whitney statistic with
mid-ranks for ties, what ``sklearn.metrics.roc_auc_score`` computes). Federated evaluation only
sees what clients send: their confusion counts, summed exactly, and a histogram of their score
margins on fixed bins, summed exactly. The pooled histogram gives ROC AUC with pairs that share a
bin counted as half, so it is off by at most half the share of (positive, negative) pairs in one
bin; that bound is reported beside it as ``auc_max_error``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

BINARY_KEYS = ("auc", "sensitivity", "specificity", "balanced_accuracy")
FEDERATED_KEYS = (*BINARY_KEYS, "auc_max_error")
COUNT_KEYS = ("tp", "fp", "tn", "fn")

# Federated AUC bins: width 1/8 in logit margin (logit_1 - logit_0) on [-16, 16], plus one open bin
# below and one above. A margin of 16 is a probability of 1 - 1e-7: beyond it ranking hardly matters.
MARGIN_LIMIT = 16.0
BINS_PER_UNIT = 8
NUM_BINS = int(2 * MARGIN_LIMIT * BINS_PER_UNIT) + 2
_POS, _NEG = "pos_bin_", "neg_bin_"

log = logging.getLogger(__name__)


def _count(value: object) -> int:
    """A client-sent count as an int; ValueError unless it is a finite, non-negative whole number."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or value != int(value)):
        raise ValueError(f"{value!r} is not a count")
    return int(value)


def roc_auc(labels: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float | None:
    """Exact ROC AUC of ``scores`` for 0/1 ``labels`` (ties count half); None when a class is absent."""
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    positives = int(y.sum())
    negatives = y.size - positives
    if positives == 0 or negatives == 0:
        return None
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # Tied scores share the mean of the 1-based ranks they span.
    first_rank = np.cumsum(counts) - counts + 1
    mid_rank = first_rank + (counts - 1) / 2.0
    rank_sum = float(mid_rank[inverse.reshape(-1)][y].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


@dataclass(frozen=True)
class ConfusionCounts:
    """True/false positives and negatives for positive class 1; sums exactly across clients."""

    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @classmethod
    def from_predictions(cls, labels: torch.Tensor, predictions: torch.Tensor) -> ConfusionCounts:
        """Count outcomes of 0/1 ``predictions`` against 0/1 ``labels``."""
        y = labels.reshape(-1).bool()
        p = predictions.reshape(-1).bool()
        return cls(tp=int((y & p).sum()), fp=int((~y & p).sum()), tn=int((~y & ~p).sum()), fn=int((y & ~p).sum()))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> ConfusionCounts | None:
        """The counts a client put in ``EvalResult.metrics``, or None when it sent none (not a binary task);
        ValueError when one is not a whole non-negative number."""
        if not all(k in metrics for k in COUNT_KEYS):
            return None
        return cls(*(_count(metrics[k]) for k in COUNT_KEYS))

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn, self.fn + other.fn)

    def to_metrics(self) -> dict[str, float]:
        return {"tp": float(self.tp), "fp": float(self.fp), "tn": float(self.tn), "fn": float(self.fn)}

    @property
    def sensitivity(self) -> float | None:
        """Recall of the positive class, TP / (TP + FN); None without positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def specificity(self) -> float | None:
        """Recall of the negative class, TN / (TN + FP); None without negatives."""
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else None

    @property
    def balanced_accuracy(self) -> float | None:
        """Mean of sensitivity and specificity; None unless both classes are present."""
        sens, spec = self.sensitivity, self.specificity
        return None if sens is None or spec is None else (sens + spec) / 2


def margin_bins(margins: torch.Tensor) -> torch.Tensor:
    """Fixed histogram bin (0 .. NUM_BINS - 1) of each logit margin; the same edges on every client."""
    inner = torch.floor((margins.double() + MARGIN_LIMIT) * BINS_PER_UNIT).long() + 1
    return inner.clamp_(0, NUM_BINS - 1)


@dataclass(frozen=True)
class MarginHistogram:
    """Counts of positives and of negatives per margin bin; sums exactly across clients."""

    positives: tuple[int, ...] = (0,) * NUM_BINS
    negatives: tuple[int, ...] = (0,) * NUM_BINS

    @classmethod
    def from_scores(cls, labels: torch.Tensor, margins: torch.Tensor) -> MarginHistogram:
        bins = margin_bins(margins.reshape(-1))
        y = labels.reshape(-1).bool()
        pos = torch.bincount(bins[y], minlength=NUM_BINS)
        neg = torch.bincount(bins[~y], minlength=NUM_BINS)
        return cls(tuple(int(v) for v in pos), tuple(int(v) for v in neg))

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> MarginHistogram:
        """Rebuild from the sparse ``pos_bin_<k>`` / ``neg_bin_<k>`` entries of ``EvalResult.metrics``
        (ValueError when a count is not a whole non-negative number)."""
        pos, neg = [0] * NUM_BINS, [0] * NUM_BINS
        for key, value in metrics.items():
            for prefix, target in ((_POS, pos), (_NEG, neg)):
                suffix = key[len(prefix):]
                if key.startswith(prefix) and suffix.isdigit():
                    index = int(suffix)
                    if index < NUM_BINS:
                        target[index] += _count(value)
        return cls(tuple(pos), tuple(neg))

    def __add__(self, other: MarginHistogram) -> MarginHistogram:
        return MarginHistogram(tuple(a + b for a, b in zip(self.positives, other.positives)),
                               tuple(a + b for a, b in zip(self.negatives, other.negatives)))

    def to_metrics(self) -> dict[str, float]:
        """Only non-empty bins, so a small test set sends a few entries, not NUM_BINS."""
        out = {f"{_POS}{k}": float(v) for k, v in enumerate(self.positives) if v}
        out.update({f"{_NEG}{k}": float(v) for k, v in enumerate(self.negatives) if v})
        return out

    def auc(self) -> tuple[float | None, float | None]:
        """(ROC AUC with same-bin pairs counted half, the most it can differ from the exact AUC).

        Counted in Python ints (exact at any size) and returned as Python floats: a metric is a plain value, so
        a history holding it stays loadable by ``torch.load(weights_only=True)``.
        """
        pairs = sum(self.positives) * sum(self.negatives)
        if pairs == 0:
            return None, None
        tied = wins = negatives_below = 0
        for pos, neg in zip(self.positives, self.negatives, strict=True):
            tied += pos * neg
            wins += pos * negatives_below
            negatives_below += neg
        return (wins + 0.5 * tied) / pairs, 0.5 * tied / pairs


class BinaryScores:
    """Collects logit margins and labels batch by batch while a model is evaluated.

    It records only when the model has exactly two outputs (a binary task); for any other
    width ``is_binary`` stays False and nothing is kept.
    """

    def __init__(self) -> None:
        self._margins: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self.is_binary = False

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one batch; the margin logit_1 - logit_0 ranks like P(class 1) without saturating at 1.0."""
        if logits.dim() != 2 or logits.shape[1] != 2:
            return
        self.is_binary = True
        margin = logits[:, 1].double() - logits[:, 0].double()
        self._margins.append(margin.detach().cpu())
        self._labels.append(labels.detach().reshape(-1).cpu())

    def _arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._margins:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        return torch.cat(self._margins), torch.cat(self._labels)

    def counts(self) -> ConfusionCounts:
        """Confusion counts of the argmax prediction (margin > 0 means class 1; a tie is class 0, as argmax)."""
        margins, labels = self._arrays()
        return ConfusionCounts.from_predictions(labels, margins > 0)

    def metrics(self) -> dict[str, float | None]:
        """Exact AUC, sensitivity, specificity and balanced accuracy; empty when the task is not binary."""
        if not self.is_binary:
            return {}
        margins, labels = self._arrays()
        return binary_metrics(self.counts(), roc_auc(labels.numpy(), margins.numpy()))

    def federated_payload(self) -> dict[str, float]:
        """What a client sends for exact pooled counts and the histogram AUC; empty when not binary."""
        if not self.is_binary:
            return {}
        margins, labels = self._arrays()
        return {**self.counts().to_metrics(), **MarginHistogram.from_scores(labels, margins).to_metrics()}


def binary_metrics(counts: ConfusionCounts, auc: float | None) -> dict[str, float | None]:
    """The four reported numbers from confusion counts and an AUC."""
    return {"auc": auc, "sensitivity": counts.sensitivity, "specificity": counts.specificity,
            "balanced_accuracy": counts.balanced_accuracy}


def pool_federated(payloads: Iterable[Mapping[str, float]]) -> dict[str, float | None]:
    """Sum clients' counts and histograms exactly and derive the metrics; empty when no client sent counts."""
    total: ConfusionCounts | None = None
    histogram = MarginHistogram()
    for metrics in payloads:
        try:
            counts = ConfusionCounts.from_metrics(metrics)
            client_histogram = MarginHistogram.from_metrics(metrics) if counts is not None else None
        except ValueError as exc:
            log.warning("a client's binary-metric counts are malformed (%s); it is left out of the pooled metrics", exc)
            continue
        if counts is None or client_histogram is None:
            continue
        total = counts if total is None else total + counts
        histogram = histogram + client_histogram
    if total is None:
        return {}
    auc, max_error = histogram.auc()
    return {**binary_metrics(total, auc), "auc_max_error": max_error}
