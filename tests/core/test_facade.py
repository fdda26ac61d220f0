"""The seed document's API: FedClient / FedServer, and the seed's own program."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from fedlearn.core.client import FedClient
from fedlearn.core.server import FedServer
from fedlearn.data import load_dataset
from fedlearn.errors import ConfigError, ModelError
from fedlearn.models import build_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _clients(digits, n: int = 3, **kwargs) -> list[FedClient]:
    torch.manual_seed(0)
    size = len(digits.train) // n
    return [
        FedClient(
            model=build_model("seed-cnn", digits.input_shape, digits.num_classes),
            train_dataset=Subset(digits.train, range(i * size, (i + 1) * size)),
            test_dataset=Subset(digits.test, range(i * 100, i * 100 + 50 + 25 * i)),
            **kwargs,
        )
        for i in range(n)
    ]


def test_train_runs_one_round_and_accuracy_rises(digits) -> None:
    server = FedServer(_clients(digits, batch_size=10))
    before = server.evaluate()
    for expected_round in (1, 2, 3, 4, 5):
        row = server.train(num_epochs=1, lr=0.1)
        assert row["round"] == expected_round and len(server.history) == expected_round
    after = server.evaluate()
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    assert after > max(before + 0.3, 0.8)


def test_evaluate_is_sample_weighted_over_client_test_sets(digits) -> None:
    clients = _clients(digits)
    server = FedServer(clients)
    server.train(num_epochs=1, lr=0.05)
    model = server.model
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for client in clients:
            x = torch.stack([client.test_dataset[i][0] for i in range(len(client.test_dataset))])
            y = torch.stack([client.test_dataset[i][1] for i in range(len(client.test_dataset))])
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    assert server.evaluate() == pytest.approx(correct / total, abs=1e-12)


def test_every_client_may_hold_the_same_dataset(digits) -> None:
    """The seed hands all clients the same full training set; that must work."""
    torch.manual_seed(0)
    clients = [FedClient(model=build_model("seed-cnn", (1, 8, 8), 10), train_dataset=digits.train,
                         test_dataset=digits.test, batch_size=32) for _ in range(3)]
    server = FedServer(clients)
    server.train(num_epochs=1, lr=0.1)
    assert server.evaluate() > 0.5


def test_generic_dataset_and_fraction(digits) -> None:
    """A plain (non tensor-backed) Dataset goes through a DataLoader; fraction samples clients."""

    class Plain(torch.utils.data.Dataset):
        def __init__(self, base):
            self.base = base

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            x, y = self.base[i]
            return x, int(y)

    clients = [FedClient(build_model("mcmahan-2nn", (1, 8, 8), 10), Plain(Subset(digits.train, range(i, 1437, 4))),
                         Plain(Subset(digits.test, range(i, 360, 4))), client_id=f"site-{i}") for i in range(4)]
    server = FedServer(clients, fraction=0.5, seed=3)
    row = server.train(num_epochs=1, lr=0.1)
    assert row["clients_sampled"] == 2 and row["clients_succeeded"] == 2
    assert 0.0 <= server.evaluate() <= 1.0


def test_mismatched_models_and_bad_arguments_are_refused(digits) -> None:
    a = FedClient(build_model("seed-cnn", (1, 8, 8), 10), digits.train)
    b = FedClient(build_model("mcmahan-2nn", (1, 8, 8), 10), digits.train)
    with pytest.raises(ModelError):
        FedServer([a, b])
    with pytest.raises(ConfigError):
        FedServer([])
    with pytest.raises(ConfigError):
        FedClient(model="cnn", train_dataset=digits.train)
    server = FedServer([a])
    with pytest.raises(ConfigError):
        server.train(num_epochs=0)
    no_test = FedServer([FedClient(nn.Linear(2, 2), TensorDataset(torch.zeros(4, 2), torch.zeros(4).long()))])
    with pytest.raises(ConfigError, match="test_dataset"):
        no_test.evaluate()


def test_seed_quickstart_runs_as_written(shared_dataset, tmp_path, monkeypatch, capsys) -> None:
    """Run examples/seed_quickstart.py unchanged on real MNIST files, on a 100/200-image slice.

    Only torchvision's MNIST class is wrapped to return the first images, so the test takes
    seconds instead of the hour the full program needs on two cores.
    """
    import torchvision.datasets

    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in shared_dataset("mnist").glob("*.gz"):
        (raw / f.name).symlink_to(f)
    real_mnist = torchvision.datasets.MNIST

    def small_mnist(*args, **kwargs):
        full = real_mnist(*args, **kwargs)
        return Subset(full, range(100 if kwargs.get("train", True) else 200))

    monkeypatch.setattr(torchvision.datasets, "MNIST", small_mnist)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(REPO / "examples" / "seed_quickstart.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    accuracies = [float(m.group(1)) for m in map(re.compile(r"global model accuracy: ([\d.]+)$").search, lines) if m]
    assert len(accuracies) == 10
    # The seed's lr=0.01 without momentum learns slowly on 100 images; it must still rise.
    assert accuracies[-1] >= accuracies[0] + 0.15
    assert accuracies[-1] >= max(accuracies[:5])


def test_train_refuses_unknown_or_per_client_settings(digits) -> None:
    server = FedServer(_clients(digits, n=2))
    with pytest.raises(ConfigError, match="per client"):
        server.train(num_epochs=1, lr=0.1, batch_size=8)
    with pytest.raises(ConfigError, match="learning_rate"):
        server.train(num_epochs=1, lr=0.1, learning_rate=0.5)
    assert server.history == []  # nothing ran


def _tiny_clients(k: int = 3) -> list[FedClient]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return [FedClient(nn.Linear(4, 3), TensorDataset(torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,),
                                                                                                    generator=g)),
                      client_id=f"c{i}", batch_size=4) for i in range(k)]


def test_train_mu_sets_the_fedprox_coefficient_clients_receive() -> None:
    from fedlearn.strategies import build_strategy
    from fedlearn.strategies.dp import CentralDP

    server = FedServer(_tiny_clients(), strategy="fedprox")
    server.train(num_epochs=1, lr=0.1, mu=0.5)
    assert server.strategy.hooks() == {"prox": {"mu": 0.5}}
    assert server.strategy.configure_train(2, server.loop.state, ["c0"], 0)[0].config["hooks"] == {"prox": {"mu": 0.5}}
    with pytest.raises(ConfigError, match="mu"):
        server.train(num_epochs=1, lr=0.1, mu=-1.0)
    assert server.strategy.hooks() == {"prox": {"mu": 0.5}}  # a refused mu is not kept for the next round
    assert len(server.history) == 1
    with pytest.raises(ConfigError, match="mu"):
        FedServer(_tiny_clients(), strategy="fedavg").train(num_epochs=1, lr=0.1, mu=0.5)
    # a privacy wrapper hands mu to the FedProx it wraps: its hook is what clients run
    wrapped = CentralDP(build_strategy("fedprox", mu=0.1), clip_norm=1.0, noise_multiplier=0.5, delta=1e-5)
    FedServer(_tiny_clients(), strategy=wrapped).train(num_epochs=1, lr=0.1, mu=0.7)
    assert wrapped.inner.config.mu == 0.7 and wrapped.hooks() == {"prox": {"mu": 0.7}}


def test_a_strategy_instance_brings_its_own_sampler() -> None:
    from fedlearn.strategies import FedAvg, Sampler

    strategy = FedAvg(sampler=Sampler(0.5))
    with pytest.raises(ConfigError, match="fraction"):
        FedServer(_tiny_clients(4), strategy=strategy, fraction=1.0)
    server = FedServer(_tiny_clients(4), strategy=strategy, fraction=0.5)  # agreeing is fine
    assert server.train(num_epochs=1, lr=0.1)["clients_sampled"] == 2
    assert FedServer(_tiny_clients(4), strategy=FedAvg(sampler=Sampler(0.5))).train()["clients_sampled"] == 2
