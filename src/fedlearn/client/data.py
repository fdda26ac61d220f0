"""What one simulated client holds: its own training and test data."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset


@dataclass
class ClientData:
    """A client's local datasets; ``batch_size`` overrides the task's when the client fixes its own."""

    train: Dataset
    test: Dataset | None = None
    batch_size: int | None = None
