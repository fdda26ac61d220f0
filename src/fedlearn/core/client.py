"""`FedClient`: one party's model and data, as the seed document's API names it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlearn.client.data import ClientData
from fedlearn.errors import ConfigError


class FedClient:
    """A party holding a model and its own train (and optional test) dataset.

    Any ``torch.utils.data.Dataset`` works, torchvision datasets included. The server trains all
    clients on one model instance (the first client's), so extra clients cost no model memory.
    ``loss`` is any callable of (outputs, targets) giving a mean (e.g. ``torch.nn.MSELoss()``);
    ``task`` (classification, multilabel, regression) sets the targets' type, the default loss and
    the metrics.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset,
        test_dataset: Dataset | None = None,
        client_id: str | None = None,
        batch_size: int = 64,
        device: str | torch.device | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        task: str = "classification",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"FedClient model must be a torch.nn.Module, got {type(model).__name__}")
        if batch_size < 1:
            raise ConfigError(f"FedClient batch_size must be a positive integer, got {batch_size}")
        from fedlearn.tasks import get_task

        if loss is not None and not callable(loss):
            raise ConfigError(f"FedClient loss must be callable on (outputs, targets), e.g. torch.nn.MSELoss(); "
                              f"got {loss!r}")
        get_task(task)
        self.loss = loss
        self.task = task
        self.model = model
        self.train_dataset = train_dataset
        self.test_dataset = test_dataset
        self.client_id = client_id
        self.batch_size = batch_size
        self.device = device

    def data(self) -> ClientData:
        """What the in-process runtime needs of this client."""
        return ClientData(self.train_dataset, self.test_dataset, self.batch_size)
