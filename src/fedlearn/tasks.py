"""Tasks: what a model's outputs mean, which loss trains it and which metrics score it.

A task turns a dataset's stored labels into the targets its loss needs, supplies the default loss, and
scores evaluation with additive sums (counts, loss and error sums in float64), so federated evaluation
adds the clients' sums and gets the numbers that evaluating all their data in one place would give.

ROC AUC is not additive. For ``multilabel`` a client's sums also hold, per label, a histogram of its
logits on the fixed bins of :mod:`fedlearn.metrics` (width 1/8 on [-16, 16] plus two open bins) for
positives and for negatives. The pooled AUC of a label counts (positive, negative) pairs that share a
bin as half, so it is off the exact AUC of the pooled data by at most half the share of such pairs;
the mean of that bound over the labels averaged is reported beside the mean AUC as ``auc_max_error``.
Locally, where every logit is at hand, ``TaskScores.metrics`` gives the exact AUC instead.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from fedlearn.errors import ConfigError, DataError, ModelError
from fedlearn.metrics import NUM_BINS, MarginHistogram, margin_bins, roc_auc

TASKS = ("classification", "multilabel", "regression")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Metrics = dict[str, float | None]

__all__ = ["TASKS", "Task", "TaskScores", "add_sums", "get_task", "loss_from_user"]

_HIST_KEY = re.compile(r"label_(\d+)_(pos|neg)_bin_(\d+)")


# --- sums ------------------------------------------------------------------------------------------------------

def add_sums(payloads: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise total of several sums dicts (a key one lacks counts as 0); ValueError on a non-finite value."""
    total: dict[str, float] = {}
    for sums in payloads:
        for key, value in sums.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"sum {key!r} is {value!r}, not a finite number")
            total[key] = total.get(key, 0.0) + float(value)
    return total


def _count(sums: Mapping[str, float], key: str) -> int:
    """A count from a sums dict; ValueError when it is missing or not a whole non-negative number."""
    if key not in sums:
        raise ValueError(f"the sums lack {key!r}")
    value = sums[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or value < 0 or value != int(value)):
        raise ValueError(f"sum {key!r} is {value!r}, not a count")
    return int(value)


def _total(sums: Mapping[str, float], key: str) -> float:
    """A float sum from a sums dict; ValueError when it is missing or not a number. It may be inf or NaN: a
    diverged model's loss is (the server validates clients' sums before pooling them)."""
    if key not in sums:
        raise ValueError(f"the sums lack {key!r}")
    value = sums[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"sum {key!r} is {value!r}, not a number")
    return float(value)


def _ratio(numerator: float, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def _aligned(outputs: torch.Tensor, targets: torch.Tensor, task: str) -> torch.Tensor:
    """``targets`` in the shape of ``outputs`` (same count per example), else a one-line ModelError."""
    if targets.shape == outputs.shape:
        return targets
    if outputs.dim() >= 1 and targets.dim() >= 1 and targets.shape[0] == outputs.shape[0] \
            and targets.numel() == outputs.numel():
        return targets.reshape(outputs.shape)
    raise ModelError(f"the model outputs shape {tuple(outputs.shape)} but the {task} targets have shape "
                     f"{tuple(targets.shape)}; build the model with one output per target value")


# --- scores ----------------------------------------------------------------------------------------------------

class TaskScores(ABC):
    """Accumulates a task's evaluation over batches as additive sums (on the outputs' device until read)."""

    @abstractmethod
    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch of model outputs and its targets (as ``Task.targets`` made them)."""

    @abstractmethod
    def sums(self) -> dict[str, float]:
        """The additive sufficient statistics so far: what a client sends for federated evaluation."""

    @classmethod
    @abstractmethod
    def metrics_from_sums(cls, sums: Mapping[str, float]) -> Metrics:
        """Metrics from one (possibly pooled) sums dict; None where undefined (no data); ValueError if malformed."""

    @classmethod
    def pool(cls, payloads: Iterable[Mapping[str, float]]) -> Metrics:
        """Metrics of several clients' data together: their sums added, then ``metrics_from_sums``."""
        return cls.metrics_from_sums(add_sums(payloads))

    def metrics(self) -> Metrics:
        """Metrics of everything seen so far."""
        return self.metrics_from_sums(self.sums())


class ClassificationScores(TaskScores):
    """Mean cross-entropy and argmax accuracy; sums ``n``, ``loss_sum``, ``correct``."""

    def __init__(self) -> None:
        self._n = 0
        self._loss: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs, targets = outputs.detach(), targets.detach()
        loss = F.cross_entropy(outputs, targets, reduction="none").double().sum()
        correct = (outputs.argmax(dim=1) == targets).sum()
        self._loss = loss if self._loss is None else self._loss + loss
        self._correct = correct if self._correct is None else self._correct + correct
        self._n += int(targets.shape[0])

    def sums(self) -> dict[str, float]:
        loss = 0.0 if self._loss is None else float(self._loss)
        correct = 0 if self._correct is None else int(self._correct)
        return {"n": float(self._n), "loss_sum": loss, "correct": float(correct)}

    @classmethod
    def metrics_from_sums(cls, sums: Mapping[str, float]) -> Metrics:
        n = _count(sums, "n")
        return {"loss": _ratio(_total(sums, "loss_sum"), n), "accuracy": _ratio(_count(sums, "correct"), n)}


class MultilabelScores(TaskScores):
    """Mean BCE and per-label accuracy at logit > 0 over all (example, label) decisions, and mean per-label AUC.

    Sums: ``n`` examples, ``decisions`` (= n x labels), ``loss_sum``, ``correct`` and the sparse logit histograms
    ``label_<j>_pos_bin_<k>`` / ``label_<j>_neg_bin_<k>``. ``metrics`` gives the exact AUC; pooled sums give the
    histogram AUC and its bound ``auc_max_error`` (see the module docstring).
    """

    def __init__(self) -> None:
        self._n = 0
        self._labels: int | None = None
        self._loss: torch.Tensor | None = None
        self._correct: torch.Tensor | None = None
        self._pos: torch.Tensor | None = None
        self._neg: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs = outputs.detach()
        targets = _aligned(outputs, targets.detach(), "multilabel")
        if outputs.dim() != 2:
            raise ModelError(f"multilabel outputs must be (batch, labels), got shape {tuple(outputs.shape)}")
        labels = int(outputs.shape[1])
        if self._labels is None:
            self._labels = labels
        elif labels != self._labels:
            raise ModelError(f"a batch has {labels} labels but earlier ones had {self._labels}; use one model")
        loss = F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype), reduction="none")
        positive = targets > 0.5
        correct = ((outputs > 0) == positive).sum()
        # One bincount per class of example: label j's bin k is flat index j * NUM_BINS + k.
        flat = margin_bins(outputs) + torch.arange(labels, device=outputs.device) * NUM_BINS
        pos = torch.bincount(flat[positive], minlength=labels * NUM_BINS)
        neg = torch.bincount(flat[~positive], minlength=labels * NUM_BINS)
        if self._loss is None:
            self._loss, self._correct, self._pos, self._neg = loss.double().sum(), correct, pos, neg
        else:
            self._loss = self._loss + loss.double().sum()
            self._correct, self._pos, self._neg = self._correct + correct, self._pos + pos, self._neg + neg
        self._outputs.append(outputs.double())
        self._targets.append(positive)
        self._n += int(outputs.shape[0])

    def sums(self) -> dict[str, float]:
        if self._labels is None:
            return {"n": 0.0, "decisions": 0.0, "loss_sum": 0.0, "correct": 0.0}
        out = {"n": float(self._n), "decisions": float(self._n * self._labels), "loss_sum": float(self._loss),
               "correct": float(int(self._correct))}
        for kind, counts in (("pos", self._pos), ("neg", self._neg)):
            grid = counts.reshape(self._labels, NUM_BINS).cpu()
            where = torch.nonzero(grid)
            for (j, k), value in zip(where.tolist(), grid[where[:, 0], where[:, 1]].tolist()):
                out[f"label_{j}_{kind}_bin_{k}"] = float(value)
        return out

    @staticmethod
    def _common(sums: Mapping[str, float]) -> Metrics:
        """Loss and accuracy, both means over all (example, label) decisions."""
        _count(sums, "n")
        decisions = _count(sums, "decisions")
        loss, correct = _total(sums, "loss_sum"), _count(sums, "correct")
        return {"loss": _ratio(loss, decisions), "accuracy": _ratio(correct, decisions)}

    @classmethod
    def metrics_from_sums(cls, sums: Mapping[str, float]) -> Metrics:
        histograms: dict[int, tuple[list[int], list[int]]] = {}
        for key in sums:
            match = _HIST_KEY.fullmatch(key)
            if match is None:
                continue
            label, kind, index = int(match[1]), match[2], int(match[3])
            if index >= NUM_BINS:
                raise ValueError(f"histogram key {key!r} names bin {index} but there are {NUM_BINS}")
            pos, neg = histograms.setdefault(label, ([0] * NUM_BINS, [0] * NUM_BINS))
            (pos if kind == "pos" else neg)[index] += _count(sums, key)
        aucs, bounds = [], []
        for label in sorted(histograms):
            auc, bound = MarginHistogram(*(tuple(h) for h in histograms[label])).auc()
            if auc is not None:
                aucs.append(auc)
                bounds.append(bound)
        mean_auc = float(np.mean(aucs)) if aucs else None
        max_error = float(np.mean(bounds)) if bounds else None
        return {**cls._common(sums), "auc": mean_auc, "auc_max_error": max_error}

    def metrics(self) -> Metrics:
        """Loss and accuracy from the sums, AUC exact (``fedlearn.metrics.roc_auc`` per label, then the mean)."""
        out = self._common(self.sums())
        if not self._outputs:
            return {**out, "auc": None}
        outputs = torch.cat(self._outputs).cpu().numpy()
        targets = torch.cat(self._targets).cpu().numpy()
        aucs = [a for j in range(outputs.shape[1]) if (a := roc_auc(targets[:, j], outputs[:, j])) is not None]
        return {**out, "auc": float(np.mean(aucs)) if aucs else None}


class RegressionScores(TaskScores):
    """Mean squared and absolute error over all target values; sums ``n``, ``values``, ``sq_err_sum``,
    ``abs_err_sum``. ``loss`` is the mse; there is no accuracy."""

    def __init__(self) -> None:
        self._n = 0
        self._values = 0
        self._sq: torch.Tensor | None = None
        self._abs: torch.Tensor | None = None

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        outputs = outputs.detach()
        targets = _aligned(outputs, targets.detach(), "regression")
        error = outputs.double() - targets.double()
        sq, ab = error.square().sum(), error.abs().sum()
        self._sq = sq if self._sq is None else self._sq + sq
        self._abs = ab if self._abs is None else self._abs + ab
        self._n += int(outputs.shape[0])
        self._values += int(error.numel())

    def sums(self) -> dict[str, float]:
        sq = 0.0 if self._sq is None else float(self._sq)
        ab = 0.0 if self._abs is None else float(self._abs)
        return {"n": float(self._n), "values": float(self._values), "sq_err_sum": sq, "abs_err_sum": ab}

    @classmethod
    def metrics_from_sums(cls, sums: Mapping[str, float]) -> Metrics:
        _count(sums, "n")
        values = _count(sums, "values")
        mse = _ratio(_total(sums, "sq_err_sum"), values)
        return {"loss": mse, "mse": mse, "mae": _ratio(_total(sums, "abs_err_sum"), values)}


# --- tasks -----------------------------------------------------------------------------------------------------

class Task(ABC):
    """One kind of learning problem: targets, default loss, evaluation scores and the metric a run reports."""

    name: ClassVar[str]
    primary_metric: ClassVar[str]
    reported: ClassVar[tuple[str, ...]] = ("loss", "accuracy")  # the test_* fields every history row carries
    higher_is_better: ClassVar[bool]
    output_unit: ClassVar[str]  # what DatasetBundle.num_classes counts for this task
    scores_type: ClassVar[type[TaskScores]]

    @abstractmethod
    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """A label batch in the dtype and shape the loss needs."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The default training loss, averaged over the batch."""

    def scores(self) -> TaskScores:
        """A fresh accumulator for evaluating a model on this task."""
        return self.scores_type()

    def output_size(self, num_classes: int) -> int:
        """Model output width for a bundle's ``num_classes`` (classes, labels or output dimensions: one each)."""
        return int(num_classes)

    def __repr__(self) -> str:
        return f"get_task({self.name!r})"


class Classification(Task):
    """One class per example: long targets (N,), cross-entropy on logits, argmax accuracy."""

    name = "classification"
    primary_metric = "accuracy"
    higher_is_better = True
    output_unit = "classes"
    scores_type = ClassificationScores

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(-1).long()  # what iter_batches has always done; no copy for int64 (N,)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


class Multilabel(Task):
    """Any number of binary labels per example: float 0/1 targets (N, L), BCE on logits, per-label metrics."""

    name = "multilabel"
    primary_metric = "auc"
    reported = ("loss", "accuracy", "auc")
    higher_is_better = True
    output_unit = "labels"
    scores_type = MultilabelScores

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() != 2:
            raise DataError(f"multilabel targets must be (examples, labels) 0/1, got shape {tuple(y.shape)}; "
                            "use --task classification for one class per example")
        return y.float()

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _aligned(outputs, targets, self.name)
        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


class Regression(Task):
    """Real-valued targets: float (N, D), where (N,) becomes (N, 1) like a one-output model; mean squared error."""

    name = "regression"
    primary_metric = "mse"
    reported = ("loss", "mse", "mae")
    higher_is_better = False
    output_unit = "output dimensions"
    scores_type = RegressionScores

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        y = y.float()
        return y.unsqueeze(1) if y.dim() == 1 else y

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = _aligned(outputs, targets, self.name)
        return F.mse_loss(outputs, targets.to(outputs.dtype))


_REGISTRY: dict[str, Task] = {task.name: task for task in (Classification(), Multilabel(), Regression())}


SUM_PREFIX = "sum."  # a client's evaluation sums travel as "sum.<task>.<key>" metrics


def pool_task_sums(payloads: Iterable[Mapping[str, float]]) -> Metrics:
    """The exact pooled metrics from clients' ``sum.<task>.<key>`` evaluation metrics; {} when none sent any."""
    by_task: dict[str, list[dict[str, float]]] = {}
    for metrics in payloads:
        for name in {k.split(".", 2)[1] for k in metrics if k.startswith(SUM_PREFIX) and k.count(".") >= 2}:
            prefix = f"{SUM_PREFIX}{name}."
            by_task.setdefault(name, []).append({k[len(prefix):]: v for k, v in metrics.items()
                                                 if k.startswith(prefix)})
    if len(by_task) != 1:
        return {}
    (name, sums), = by_task.items()
    if name not in TASKS:
        return {}
    try:
        return get_task(name).scores_type.pool(sums)
    except ValueError:
        return {}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of TASKS); ConfigError for any other name."""
    task = _REGISTRY.get(str(name).strip().lower())
    if task is None:
        raise ConfigError(f"unknown task {name!r}; choose --task from: {', '.join(TASKS)}")
    return task


def loss_from_user(loss: LossFn | torch.nn.Module | None, task: Task) -> LossFn:
    """The user's loss (a function or module such as ``torch.nn.MSELoss()``) or, when None, the task's default."""
    if loss is None:
        return task.loss
    if isinstance(loss, type):
        raise ConfigError(f"the loss is the class {loss.__name__}, not a loss; pass an instance such as "
                          f"{loss.__name__}()")
    if not callable(loss):
        raise ConfigError(f"the loss must be callable as loss(outputs, targets), got {type(loss).__name__}; "
                          "pass a function or a torch.nn loss module such as torch.nn.MSELoss()")
    return loss
