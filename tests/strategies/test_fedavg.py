"""FedAvg end to end: with one client it is exactly plain local training (same batches, same steps)."""

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
from fedlearn.seeding import derive_seed
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg

torch.set_num_threads(1)

RUN_SEED = 1234


def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def dataset(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def hand_written_training(model: nn.Module, data: ArrayDataset, seed: int, epochs: int, batch_size: int,
                          lr: float, momentum: float, weight_decay: float) -> list[float]:
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            loss.backward()
            optimizer.step()
            losses.append((loss.item(), len(idx)))
    return losses


@pytest.mark.parametrize("make_model", [linear, conv])
@pytest.mark.parametrize("n", [50, 48])
def test_fedavg_with_one_client_equals_plain_local_training(make_model, n: int) -> None:
    data = dataset(n, seed=n)
    torch.manual_seed(0)
    fed_model = make_model()
    torch.manual_seed(0)
    ref_model = make_model()
    start = ModelVector(fed_model).read()
    assert torch.equal(start, ModelVector(ref_model).read())

    local = LocalConfig(local_epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-4)
    trainer = LocalTrainer(fed_model, device="cpu")
    runtime = InProcessRuntime(ClientApp(trainer, {"solo": ClientData(data)}))
    loop = RoundLoop(FedAvg(local=local), runtime, trainer.vector.spec, start, seed=RUN_SEED)
    row = loop.run_round()

    seed = derive_seed(RUN_SEED, 1, "solo")
    losses = hand_written_training(ref_model, data, seed, epochs=2, batch_size=8, lr=0.1, momentum=0.9,
                                   weight_decay=1e-4)
    expected = ModelVector(ref_model).read()
    assert (expected - start).abs().max() > 1e-2  # training moved the weights
    torch.testing.assert_close(loop.weights, expected, rtol=0, atol=1e-6)
    assert row["aggregated"] and row["clients_succeeded"] == 1 and row["failed_clients"] == []
    mean_loss = sum(loss * k for loss, k in losses) / sum(k for _, k in losses)
    assert row["train_loss"] == pytest.approx(mean_loss, abs=1e-5)


def test_one_client_with_a_different_seed_takes_different_batches() -> None:
    # guards the test above: the batch order really depends on derive_seed(run_seed, round, client)
    data = dataset(50, seed=1)
    torch.manual_seed(0)
    model = linear()
    start = ModelVector(model).read()
    local = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)
    outs = []
    for run_seed in (RUN_SEED, RUN_SEED + 1):
        trainer = LocalTrainer(model, device="cpu")
        loop = RoundLoop(FedAvg(local=local), InProcessRuntime(ClientApp(trainer, {"solo": ClientData(data)})),
                         trainer.vector.spec, start, seed=run_seed)
        loop.run_round()
        outs.append(loop.weights)
    assert (outs[0] - outs[1]).abs().max() > 1e-5


def test_fedavg_two_clients_is_weighted_mean_of_local_models() -> None:
    datas = {"a": dataset(12, seed=1), "b": dataset(36, seed=2)}
    torch.manual_seed(0)
    model = linear()
    start = ModelVector(model).read()
    local = LocalConfig(local_epochs=1, batch_size=5, lr=0.2)
    trainer = LocalTrainer(model, device="cpu")
    loop = RoundLoop(FedAvg(local=local),
                     InProcessRuntime(ClientApp(trainer, {k: ClientData(v) for k, v in datas.items()})),
                     trainer.vector.spec, start, seed=RUN_SEED)
    loop.run_round()
    locals_ = {}
    for cid, data in datas.items():
        ref = linear()
        ModelVector(ref).load(start)
        hand_written_training(ref, data, derive_seed(RUN_SEED, 1, cid), 1, 5, 0.2, 0.0, 0.0)
        locals_[cid] = ModelVector(ref).read()
    expected = (12 * locals_["a"].double() + 36 * locals_["b"].double()) / 48
    torch.testing.assert_close(loop.weights, expected.float(), rtol=0, atol=1e-6)
