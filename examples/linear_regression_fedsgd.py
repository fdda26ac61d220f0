"""Seed 003's example: 100 devices with 10 samples each fit one linear regression model by gradient averaging.

FedSGD: every round each device computes the gradient of its mean squared error at the global weights,
and the server steps w_new = w - alpha * (1/N) * sum_i grad_i (all devices hold 10 samples, so the
sample-weighted mean FedLearn computes is the seed's plain mean). Run: python examples/linear_regression_fedsgd.py
"""

from __future__ import annotations

import torch
from torch import nn

from fedlearn.core import FedClient, FedServer
from fedlearn.data.arrays import ArrayDataset

DEVICES, SAMPLES, FEATURES = 100, 10, 3


def make_devices(seed: int = 0) -> tuple[list[ArrayDataset], torch.Tensor]:
    """Each device's (x, y) with y = x w* + b* + small noise; returns the datasets and the true [w*, b*]."""
    g = torch.Generator().manual_seed(seed)
    true = torch.tensor([2.0, -1.0, 0.5, 3.0])  # three weights, then the bias
    sets = []
    for _ in range(DEVICES):
        x = torch.randn(SAMPLES, FEATURES, generator=g)
        y = x @ true[:FEATURES] + true[FEATURES] + 0.01 * torch.randn(SAMPLES, generator=g)
        sets.append(ArrayDataset(x, y))
    return sets, true


def build_server(alpha: float = 0.1, seed: int = 0) -> FedServer:
    sets, _ = make_devices(seed)
    torch.manual_seed(seed)
    model = nn.Linear(FEATURES, 1)
    clients = [FedClient(model=model if i == 0 else nn.Linear(FEATURES, 1), train_dataset=s,
                         loss=torch.nn.MSELoss(), task="regression", batch_size=SAMPLES)
               for i, s in enumerate(sets)]
    server = FedServer(clients, strategy="fedsgd")
    server.strategy.set_local(lr=alpha)
    return server


def main(rounds: int = 100, alpha: float = 0.1) -> None:
    server = build_server(alpha)
    _, true = make_devices()
    for r in range(1, rounds + 1):
        row = server.train(num_epochs=1, lr=alpha)
        if r % 20 == 0:
            print(f"round {r}: mean device loss {row['train_loss']:.5f}")
    model = server.model
    learned = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    print("learned [w, b]:", [round(v, 3) for v in learned.tolist()], " true:", true.tolist())


if __name__ == "__main__":
    main()
