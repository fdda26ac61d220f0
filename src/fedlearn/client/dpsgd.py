"""Sample-level DP-SGD inside local training (Abadi et al., 2016), with torch.func per-example gradients.

Each step takes a Poisson sample of the client's examples (each with probability q = B / n, as
the accountant assumes), clips every example's gradient to L2 norm C, sums them, adds
N(0, (z C)^2) and divides by the expected batch size B.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import Dataset

from fedlearn.data.arrays import as_tensors


def poisson_batches(dataset: Dataset, batch_size: int, epochs: int, generator: torch.Generator,
                    device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """epochs * round(n / B) batches, each example joining each batch with probability B / n."""
    tensors = as_tensors(dataset)
    if tensors is None:
        items = [dataset[i] for i in range(len(dataset))]
        tensors = torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])
    x, y = tensors[0], tensors[1].long()
    n = y.shape[0]
    rate = min(1.0, batch_size / n)
    for _ in range(epochs * max(1, round(n / batch_size))):
        chosen = torch.nonzero(torch.rand(n, generator=generator) < rate).flatten()
        yield x[chosen].to(device), y[chosen].to(device)


def steps_per_round(num_examples: int, batch_size: int, epochs: int) -> int:
    """How many DP-SGD steps (sampled Gaussian releases) one round of local training takes."""
    return epochs * max(1, round(num_examples / batch_size))


def private_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, clip_norm: float,
                      noise_multiplier: float, expected_batch: float, generator: torch.Generator) -> float:
    """Set each trainable parameter's .grad to the clipped, noised mean gradient; return the batch loss sum."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def example_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if x.shape[0] > 0:
        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)
        norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per_example.values()))
        scale = (clip_norm / (norms + 1e-12)).clamp(max=1.0)
        with torch.no_grad():
            loss_sum = float(F.cross_entropy(model(x), y, reduction="sum"))
    else:
        per_example, scale, loss_sum = None, None, 0.0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * clip_norm)
        total = noise.to(p.dtype).to(p.device)
        if per_example is not None:
            g = per_example[name]
            total = total + (g * scale.view(-1, *([1] * (g.dim() - 1)))).sum(0)
        p.grad = total / expected_batch
    return loss_sum
