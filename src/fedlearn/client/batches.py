"""Mini-batches from any Dataset, slicing tensors directly when the data is tensor-backed."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fedlearn.data.arrays import indexed_tensors

Batch = tuple[torch.Tensor, torch.Tensor]


def iter_batches(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Batch]:
    """Yield (inputs, labels) batches on ``device``; the order is fixed by ``generator``.

    ``targets`` (e.g. ``Task.targets``) turns each label batch into what the loss needs before it moves to
    ``device``; without it labels become int64 class indices (N,), as classification needs.

    Tensor-backed datasets are shuffled with one ``randperm`` and indexed, which is what a
    hand-written PyTorch loop does; other datasets (e.g. torchvision with transforms) go
    through a single-process DataLoader using the same generator.
    """
    source = indexed_tensors(dataset)
    if source is not None:
        x, y, rows = source
        n = y.shape[0] if rows is None else rows.shape[0]
        order = torch.randperm(n, generator=generator) if shuffle else None
        if rows is not None:  # one gather of the index per epoch, then each batch is a slice of it
            order = rows if order is None else rows[order]
        for start in range(0, n, batch_size):
            if order is None:
                xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            else:
                idx = order[start : start + batch_size]
                xb, yb = x[idx], y[idx]
            yb = yb.long() if targets is None else targets(yb)  # no copy when already int64
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        return
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)
    for xb, yb in loader:
        yb = torch.as_tensor(yb)
        yb = yb.reshape(-1).long() if targets is None else targets(yb)
        yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
