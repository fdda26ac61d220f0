"""Centralized evaluation: the server's own model copy scored on a server-side test set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.trainer import evaluate_model, resolve_device
from fedlearn.protocol.params import ModelVector
from fedlearn.tasks import Task


class CentralEvaluator:
    """Scores global weights on ``dataset`` with a model instance the clients never touch."""

    def __init__(self, model: nn.Module, dataset: Dataset, device: str | torch.device | None = None,
                 batch_size: int = 512, *, task: str | Task = "classification",
                 personal: Sequence[str] = ()) -> None:
        self.device = resolve_device(device)
        # With personal layers the server scores the shared layers with the layers' initial values.
        self.vector = ModelVector(model.to(self.device), personal)
        self.dataset = dataset
        self.batch_size = batch_size
        self.task = task

    def score(self, weights: torch.Tensor) -> dict[str, Any]:
        """The task's metrics (classification: loss, accuracy; two classes add exact ROC AUC, sensitivity,
        specificity and balanced accuracy with positive class 1, as ``fedlearn.metrics`` defines them)."""
        self.vector.load(weights.to(self.device))
        _, metrics = evaluate_model(self.vector.module, self.dataset, self.device, self.batch_size, task=self.task,
                                    pooled=False)
        return metrics
