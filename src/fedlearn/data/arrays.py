"""In-memory image datasets and the fast path that lets training slice tensors directly.

Built-in datasets are held as one normalized float tensor; clients hold index tensors into it,
so 10,000 simulated clients cost 10,000 small index tensors, not 10,000 copies of the data.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset, TensorDataset


class ArrayDataset(Dataset):
    """Images ``x`` (N, C, H, W) float32, already normalized, and labels ``y`` (N,) int64."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]

    @property
    def targets(self) -> torch.Tensor:
        return self.y


def indexed_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """(inputs, labels, index) of a tensor-backed dataset without gathering it: the dataset's rows are
    ``inputs[index]`` (all of them when ``index`` is None). None when it is not tensor-backed.

    Training gathers each mini-batch straight from the full tensors through ``index``, so a client's share is
    never copied out first (one pass over its rows fewer, and no per-client allocation).
    """
    if isinstance(dataset, Subset):
        inner = indexed_tensors(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return inner[0], inner[1], index if inner[2] is None else inner[2][index]
    tensors = as_tensors(dataset)
    return None if tensors is None else (tensors[0], tensors[1], None)


def as_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Return (inputs, labels) tensors when the dataset is tensor-backed, else None.

    Handles ArrayDataset, a two-tensor TensorDataset and (nested) Subsets of them, so the
    trainer can batch by indexing instead of paying a DataLoader's per-item Python cost.
    """
    if isinstance(dataset, ArrayDataset):
        return dataset.x, dataset.y
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    if isinstance(dataset, Subset):
        inner = as_tensors(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return inner[0][index], inner[1][index]
    return None
