"""FedProx: mu = 0 is FedAvg bit for bit; mu > 0 keeps clients closer to the global model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlearn.client.config import LocalConfig
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.messages import TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg, FedProx
from fedlearn.strategies.base import Strategy

torch.set_num_threads(1)

LOCAL = LocalConfig(local_epochs=3, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-4)


def clients() -> dict[str, ClientData]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, n in enumerate((20, 33, 47)):
        # each client has a skewed label distribution, so local models drift apart
        y = (torch.randint(0, 3, (n,), generator=g) + 3 * i) % 10
        out[f"c{i}"] = ClientData(ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), y))
    return out


def run(strategy: Strategy, rounds: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer = LocalTrainer(model, device="cpu")
    start = trainer.vector.read()
    loop = RoundLoop(strategy, InProcessRuntime(trainer, clients()), trainer.vector.spec, start, seed=5)
    history = loop.run(rounds)
    return start, loop.weights, [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_fedprox_with_mu_zero_is_fedavg_bitwise() -> None:
    _, w_avg, h_avg = run(FedAvg(LOCAL), 2)
    _, w_prox, h_prox = run(FedProx(LOCAL, mu=0.0), 2)
    assert torch.equal(w_avg, w_prox)
    assert h_avg == h_prox


def test_fedprox_with_mu_positive_differs_and_moves_less() -> None:
    start, w_avg, _ = run(FedAvg(LOCAL), 1)
    _, w_prox, _ = run(FedProx(LOCAL, mu=1.0), 1)
    assert not torch.allclose(w_avg, w_prox, atol=1e-4)
    assert (w_prox - start).norm() < (w_avg - start).norm()


def test_larger_mu_keeps_each_client_closer_to_the_global_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer = LocalTrainer(model, device="cpu")
    start = trainer.vector.read()
    for cid, data in clients().items():
        norms = []
        for mu in (0.0, 0.3, 3.0):
            config = FedProx(LOCAL, mu=mu).task_config(1, cid, 5)
            result = trainer.fit(TrainTask(1, cid, start, config), data)
            norms.append(float(result.payload.norm()))
        assert norms[0] > norms[1] > norms[2] > 0, (cid, norms)
        # payload = trained weights - task weights (the model is reset from the task each time)
        torch.testing.assert_close(ModelVector(model).read(), start + result.payload, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.01, 2.5])
def test_fedprox_sends_mu_to_clients(mu: float) -> None:
    tasks = FedProx(LOCAL, mu=mu).configure_train(1, torch.zeros(2), ["a"], seed=0)
    assert tasks[0].config["mu"] == mu
    assert tasks[0].config["lr"] == LOCAL.lr
