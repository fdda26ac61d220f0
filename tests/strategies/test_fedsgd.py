"""FedSGD with full-batch clients is one centralized gradient-descent step on the union of their data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedSGD

torch.set_num_threads(1)

SIZES = (5, 17, 40)


def model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 10))


def client_data() -> dict[str, ArrayDataset]:
    g = torch.Generator().manual_seed(0)
    return {
        f"c{i}": ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
        for i, n in enumerate(SIZES)
    }


def centralized_step(start: torch.Tensor, datas: dict[str, ArrayDataset], lr: float) -> torch.Tensor:
    ref = model()
    mv = ModelVector(ref)
    mv.load(start)
    x = torch.cat([d.x for d in datas.values()])
    y = torch.cat([d.y for d in datas.values()])
    assert len(y) == sum(SIZES)
    F.cross_entropy(ref(x), y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    return mv.read()


@pytest.mark.parametrize("eval_batch_size", [512, 4])
def test_fedsgd_equals_one_centralized_gd_step(eval_batch_size: int) -> None:
    datas = client_data()
    torch.manual_seed(0)
    net = model()
    start = ModelVector(net).read()
    lr = 0.5
    trainer = LocalTrainer(net, device="cpu")
    runtime = InProcessRuntime(ClientApp(trainer, {k: ClientData(v) for k, v in datas.items()}))
    strategy = FedSGD(local=LocalConfig(lr=lr, eval_batch_size=eval_batch_size, local_epochs=3, batch_size=2))
    loop = RoundLoop(strategy, runtime, trainer.vector.spec, start, seed=3)
    row = loop.run_round()
    expected = centralized_step(start, datas, lr)
    assert (expected - start).abs().max() > 1e-3
    torch.testing.assert_close(loop.weights, expected, rtol=0, atol=1e-6)
    assert row["clients_succeeded"] == 3 and row["aggregated"]

    # the reported train loss is the mean loss over the union at the starting weights
    ref = model()
    ModelVector(ref).load(start)
    with torch.no_grad():
        x = torch.cat([d.x for d in datas.values()])
        y = torch.cat([d.y for d in datas.values()])
        assert row["train_loss"] == pytest.approx(F.cross_entropy(ref(x), y).item(), abs=1e-5)


def test_fedsgd_two_rounds_are_two_gd_steps() -> None:
    datas = client_data()
    torch.manual_seed(1)
    net = model()
    start = ModelVector(net).read()
    trainer = LocalTrainer(net, device="cpu")
    runtime = InProcessRuntime(ClientApp(trainer, {k: ClientData(v) for k, v in datas.items()}))
    loop = RoundLoop(FedSGD(local=LocalConfig(lr=0.3)), runtime, trainer.vector.spec, start, seed=3)
    loop.run(2)
    expected = centralized_step(centralized_step(start, datas, 0.3), datas, 0.3)
    torch.testing.assert_close(loop.weights, expected, rtol=0, atol=1e-6)
