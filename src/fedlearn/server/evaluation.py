"""Centralized evaluation: the server's own model copy scored on a server-side test set."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.trainer import evaluate_model, resolve_device
from fedlearn.metrics import BinaryScores
from fedlearn.protocol.params import ModelVector


class CentralEvaluator:
    """Scores global weights on ``dataset`` with a model instance the clients never touch."""

    def __init__(self, model: nn.Module, dataset: Dataset, device: str | torch.device | None = None,
                 batch_size: int = 512) -> None:
        self.device = resolve_device(device)
        self.vector = ModelVector(model.to(self.device))
        self.dataset = dataset
        self.batch_size = batch_size

    def __call__(self, weights: torch.Tensor) -> tuple[float, float]:
        """(mean loss, accuracy) of ``weights`` on the server's test set."""
        scores = self.score(weights)
        return scores["loss"], scores["accuracy"]

    def score(self, weights: torch.Tensor) -> dict[str, float | None]:
        """Loss and accuracy, plus exact ROC AUC, sensitivity, specificity and balanced accuracy when the
        model has two outputs (positive class 1); ``fedlearn.metrics`` defines them."""
        self.vector.load(weights.to(self.device))
        binary = BinaryScores()
        loss, accuracy, _ = evaluate_model(self.vector.module, self.dataset, self.device, self.batch_size,
                                           scores=binary)
        return {"loss": loss, "accuracy": accuracy, **binary.metrics()}
