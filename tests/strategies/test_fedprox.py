"""FedProx: mu = 0 is FedAvg bit for bit; mu > 0 keeps clients closer to the global model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg, FedProx, build_strategy
from fedlearn.strategies.base import ServerState, Strategy

torch.set_num_threads(1)

def prox(mu: float) -> FedProx:
    return FedProx(config=FedProx.Config(mu=mu), local=LOCAL)


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
    loop = RoundLoop(strategy, InProcessRuntime(ClientApp(trainer, clients())), trainer.vector.spec, start, seed=5)
    history = loop.run(rounds)
    return start, loop.weights, [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_fedprox_with_mu_zero_is_fedavg_bitwise() -> None:
    _, w_avg, h_avg = run(FedAvg(local=LOCAL), 2)
    _, w_prox, h_prox = run(prox(0.0), 2)
    assert torch.equal(w_avg, w_prox)
    # the rounds are the same row for row, except that FedProx's tasks also carry the prox hook request
    assert [{k: v for k, v in r.items() if k != "bytes_down"} for r in h_avg] == \
        [{k: v for k, v in r.items() if k != "bytes_down"} for r in h_prox]
    assert all(p["bytes_down"] > a["bytes_down"] for a, p in zip(h_avg, h_prox))


def test_fedprox_with_mu_positive_differs_and_moves_less() -> None:
    start, w_avg, _ = run(FedAvg(local=LOCAL), 1)
    _, w_prox, _ = run(prox(1.0), 1)
    assert not torch.allclose(w_avg, w_prox, atol=1e-4)
    assert (w_prox - start).norm() < (w_avg - start).norm()


def test_larger_mu_keeps_each_client_closer_to_the_global_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer = LocalTrainer(model, device="cpu")
    start = trainer.vector.read()
    data = clients()
    app = ClientApp(trainer, data)  # the client entry point: it builds the prox hook the task asks for
    for cid in data:
        norms = []
        for mu in (0.0, 0.3, 3.0):
            task = prox(mu).configure_train(1, ServerState(start), [cid], 5)[0]
            result = app(task)
            norms.append(float(result.arrays["update"].norm()))
        assert norms[0] > norms[1] > norms[2] > 0, (cid, norms)
        # update = trained weights - task weights (the model is reset from the task each time)
        torch.testing.assert_close(ModelVector(model).read(), start + result.arrays["update"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.01, 2.5])
def test_fedprox_sends_mu_to_clients(mu: float) -> None:
    for strategy in (prox(mu), build_strategy("fedprox", LOCAL, mu=mu)):
        tasks = strategy.configure_train(1, ServerState(torch.zeros(2)), ["a"], seed=0)
        assert tasks[0].config["hooks"] == {"prox": {"mu": mu}}
        assert tasks[0].config["lr"] == LOCAL.lr
    # FedAvg asks for no hook at all
    assert "hooks" not in FedAvg(local=LOCAL).configure_train(1, ServerState(torch.zeros(2)), ["a"], seed=0)[0].config
