"""Tests for the client side: LocalTrainer.fit (delta, gradient, proximal), evaluation and batching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from fedlearn.client.app import ClientApp
from fedlearn.client.batches import iter_batches
from fedlearn.client.data import ClientData
from fedlearn.client.hooks import ProxHook
from fedlearn.client.trainer import LocalOutcome, LocalTrainer, evaluate_model
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import DataError
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.protocol.params import ModelVector

torch.set_num_threads(1)


def dataset(n: int, seed: int = 0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))


def task(weights: torch.Tensor, **config) -> TrainTask:
    return TrainTask(1, "c", {"weights": weights}, LocalConfig(**config).to_dict())


def update(outcome: LocalOutcome) -> torch.Tensor:
    return outcome.arrays["update"]


def gradient(outcome: LocalOutcome) -> torch.Tensor:
    return outcome.arrays["gradient"]


# -- delta mode --------------------------------------------------------------------------------


def test_delta_update_is_new_weights_minus_task_weights() -> None:
    model = net()
    trainer = LocalTrainer(model, device="cpu")
    start = trainer.vector.read() + 0.01  # differs from the model's current weights
    start_copy = start.clone()
    t = task(start, local_epochs=2, batch_size=7, lr=0.1, seed=3)
    outcome = trainer.fit(t, ClientData(dataset(30)))
    assert isinstance(outcome, LocalOutcome)
    assert set(outcome.arrays) == {"update"} and outcome.num_examples == 30 and outcome.state == {}
    new = trainer.vector.read()
    assert torch.equal(update(outcome), new - start)
    assert torch.equal(start, start_copy)  # the task's weights are never modified
    assert update(outcome).abs().max() > 1e-3
    assert update(outcome).dtype == torch.float32 and update(outcome).shape == start.shape
    assert outcome.metrics["train_loss"] > 0
    # the client entry point wraps the same outcome into the result that leaves the client
    result = ClientApp(LocalTrainer(net(), device="cpu"), {"c": ClientData(dataset(30))})(t)
    assert isinstance(result, TrainResult)
    assert result.round == 1 and result.client_id == "c" and result.num_examples == 30
    assert torch.equal(result.arrays["update"], update(outcome))
    assert result.metrics == outcome.metrics


def test_fit_is_deterministic_for_a_seed_even_with_dropout() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 10))
    trainer = LocalTrainer(model, device="cpu")
    start = trainer.vector.read()
    data = ClientData(dataset(40))
    a = trainer.fit(task(start, batch_size=8, lr=0.1, seed=11), data)
    torch.manual_seed(999)  # global RNG state must not matter
    b = trainer.fit(task(start, batch_size=8, lr=0.1, seed=11), data)
    c = trainer.fit(task(start, batch_size=8, lr=0.1, seed=12), data)
    assert torch.equal(update(a), update(b))
    assert a.metrics == b.metrics
    assert not torch.equal(update(a), update(c))


def test_client_batch_size_overrides_the_task() -> None:
    data = dataset(30)
    trainer = LocalTrainer(net(), device="cpu")
    start = trainer.vector.read()
    fixed = trainer.fit(task(start, batch_size=4, lr=0.1, seed=1), ClientData(data, batch_size=10))
    same = trainer.fit(task(start, batch_size=10, lr=0.1, seed=1), ClientData(data))
    other = trainer.fit(task(start, batch_size=4, lr=0.1, seed=1), ClientData(data))
    assert torch.equal(update(fixed), update(same))
    assert not torch.equal(update(fixed), update(other))


@pytest.mark.parametrize("mode", ["delta", "gradient"])
def test_empty_training_data_raises_data_error(mode: str) -> None:
    trainer = LocalTrainer(net(), device="cpu")
    empty = ArrayDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="no training samples"):
        trainer.fit(task(trainer.vector.read(), mode=mode), ClientData(empty))


# -- gradient mode -----------------------------------------------------------------------------


def autograd_gradient(weights: torch.Tensor, data: ArrayDataset) -> torch.Tensor:
    ref = net(seed=5)
    mv = ModelVector(ref)
    mv.load(weights)
    F.cross_entropy(ref(data.x), data.y).backward()
    return torch.cat([p.grad.reshape(-1) for p in ref.parameters()])


@pytest.mark.parametrize("eval_batch_size", [512, 37, 7, 1])
def test_gradient_mode_returns_mean_loss_gradient(eval_batch_size: int) -> None:
    data = dataset(37, seed=2)
    trainer = LocalTrainer(net(), device="cpu")
    start = trainer.vector.read()
    result = trainer.fit(task(start, mode="gradient", eval_batch_size=eval_batch_size, batch_size=2, lr=5.0),
                         ClientData(data))
    expected = autograd_gradient(start, data)
    assert result.num_examples == 37
    assert expected.abs().max() > 1e-3
    assert set(result.arrays) == {"gradient"}
    torch.testing.assert_close(gradient(result), expected, rtol=0, atol=1e-6)
    # the weights are not stepped in gradient mode
    assert torch.equal(trainer.vector.read(), start)
    with torch.no_grad():
        loss = F.cross_entropy(trainer.model(data.x), data.y).item()
    assert result.metrics["train_loss"] == pytest.approx(loss, abs=1e-6)


def test_gradient_chunking_equals_one_batch_and_leaves_no_grads() -> None:
    data = dataset(50, seed=4)
    trainer = LocalTrainer(net(), device="cpu")
    start = trainer.vector.read()
    whole = gradient(trainer.fit(task(start, mode="gradient", eval_batch_size=1000), ClientData(data)))
    chunked = gradient(trainer.fit(task(start, mode="gradient", eval_batch_size=6), ClientData(data)))
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in trainer.model.parameters())
    # a second call does not accumulate the first call's gradient
    again = gradient(trainer.fit(task(start, mode="gradient", eval_batch_size=1000), ClientData(data)))
    assert torch.equal(again, whole)


# -- FedProx proximal term ---------------------------------------------------------------------


def prox_reference(start: torch.Tensor, data: ArrayDataset, seed: int, epochs: int, batch_size: int, lr: float,
                   mu: float, momentum: float) -> torch.Tensor:
    ref = net(seed=7)
    mv = ModelVector(ref)
    mv.load(start)
    anchor = [p.detach().clone() for p in ref.parameters()]
    optimizer = torch.optim.SGD(ref.parameters(), lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(0, len(data), batch_size):
            idx = perm[s : s + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(ref(data.x[idx]), data.y[idx])
            prox = sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
            (loss + mu / 2 * prox).backward()
            optimizer.step()
    return mv.read()


@pytest.mark.parametrize(("epochs", "batch_size", "momentum"), [(2, 100, 0.0), (1, 4, 0.0), (2, 5, 0.9)])
def test_proximal_gradient_matches_autograd(epochs: int, batch_size: int, momentum: float) -> None:
    data = dataset(13, seed=9)
    trainer = LocalTrainer(net(), device="cpu")
    start = trainer.vector.read()
    mu, lr = 2.0, 0.3
    cfg = {"local_epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "seed": 21}
    prox = update(trainer.fit(task(start, **cfg), ClientData(data), hooks=[ProxHook(ProxHook.Config(mu=mu))]))
    plain = update(trainer.fit(task(start, **cfg), ClientData(data)))
    zero = update(trainer.fit(task(start, **cfg), ClientData(data), hooks=[ProxHook(ProxHook.Config(mu=0.0))]))
    expected = prox_reference(start, data, 21, epochs, batch_size, lr, mu, momentum)
    torch.testing.assert_close(start + prox, expected, rtol=0, atol=1e-6)
    # the proximal term made a visible difference (the first step has w == w_global, later ones do not)
    assert (prox - plain).abs().max() > 1e-4
    assert torch.equal(zero, plain)  # mu = 0 adds exactly nothing
    # through the client entry point, the task's hook request builds the same hook
    app = ClientApp(trainer, {"c": ClientData(data)})
    asked = app(TrainTask(1, "c", {"weights": start}, {**LocalConfig(**cfg).to_dict(), "hooks": {"prox": {"mu": mu}}}))
    assert torch.equal(asked.arrays["update"], prox)


# -- evaluation --------------------------------------------------------------------------------


class Oracle(nn.Module):
    """Predicts the class stored in the first input value, with logit margin ``margin``."""

    def __init__(self, margin: float = 3.0) -> None:
        super().__init__()
        self.margin = margin
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = x.reshape(x.shape[0], -1)[:, 0].long()
        return F.one_hot(pred, 4).float() * self.margin + self.dummy


def oracle_data(preds: list[int], labels: list[int]) -> ArrayDataset:
    x = torch.zeros(len(preds), 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.float32)
    return ArrayDataset(x, torch.tensor(labels))


@pytest.mark.parametrize("batch_size", [512, 3, 1])
def test_evaluate_model_accuracy_and_loss_on_controlled_predictions(batch_size: int) -> None:
    preds = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    labels = [0, 1, 2, 0, 1, 1, 3, 3, 0, 2]  # 6 of 10 right
    n, metrics = evaluate_model(Oracle(3.0), oracle_data(preds, labels), torch.device("cpu"), batch_size)
    loss, acc = metrics["loss"], metrics["accuracy"]
    assert n == 10
    assert acc == 0.6
    # CE with logits m*onehot: right -> log(e^m + 3) - m, wrong -> log(e^m + 3)
    m = torch.tensor(3.0, dtype=torch.float64)
    right = float(torch.log(torch.exp(m) + 3) - m)
    wrong = float(torch.log(torch.exp(m) + 3))
    assert loss == pytest.approx((6 * right + 4 * wrong) / 10, abs=1e-6)


def test_evaluate_model_empty_and_eval_mode() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(4, 4))
    model.train()
    data = oracle_data([0, 1, 2], [0, 1, 2])
    first = evaluate_model(model, data, torch.device("cpu"))
    assert not model.training
    assert evaluate_model(model, data, torch.device("cpu")) == first  # dropout off: deterministic
    empty = ArrayDataset(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.long))
    assert evaluate_model(model, empty, torch.device("cpu")) == (0, {})


def test_trainer_evaluate_uses_test_data_and_task_weights() -> None:
    model = Oracle(3.0)
    trainer = LocalTrainer(model, device="cpu")
    train = oracle_data([0, 1], [0, 1])
    test = oracle_data([0, 1, 2, 3], [0, 1, 1, 1])
    weights = torch.tensor([0.5])
    n, metrics = trainer.evaluate(EvalTask(4, "c", {"weights": weights}, {"eval_batch_size": 3}),
                                  ClientData(train, test))
    assert (n, metrics["accuracy"]) == (4, 0.5)
    assert model.dummy.item() == 0.5
    # the client entry point answers with an EvalResult for the task's round and client
    app = ClientApp(trainer, {"c": ClientData(train, test), "no-test": ClientData(train)})
    res = app(EvalTask(4, "c", {"weights": weights}, {"eval_batch_size": 3}))
    assert isinstance(res, EvalResult)
    assert (res.round, res.client_id, res.num_examples, res.accuracy) == (4, "c", 4, 0.5)
    # a client without test data answers with no examples and no metrics (never its training data)
    assert trainer.evaluate(EvalTask(4, "c", {"weights": weights}, {}), ClientData(train)) == (0, {})
    only_train = app(EvalTask(4, "no-test", {"weights": weights}, {}))
    assert (only_train.num_examples, only_train.metrics, only_train.accuracy) == (0, {}, None)


# -- batching ----------------------------------------------------------------------------------


class PlainDataset(Dataset):
    """Not tensor-backed: items built on the fly, labels as Python ints."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), float(i)), int(i % 10)


def ids_of(x: torch.Tensor) -> list[int]:
    return x.reshape(x.shape[0], -1)[:, 0].long().tolist()


def make_datasets(n: int) -> dict[str, Dataset]:
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n) % 10
    big_x = torch.cat([x, x + n])
    big_y = torch.cat([y, y])
    return {
        "array": ArrayDataset(x, y),
        "tensor": TensorDataset(x, y),
        "subset": Subset(ArrayDataset(big_x, big_y), list(range(n))),
        "plain": PlainDataset(n),
    }


@pytest.mark.parametrize("kind", ["array", "tensor", "subset", "plain"])
@pytest.mark.parametrize(("n", "batch_size"), [(23, 5), (20, 5), (7, 64), (1, 1)])
def test_iter_batches_yields_every_sample_once_per_epoch(kind: str, n: int, batch_size: int) -> None:
    dataset = make_datasets(n)[kind]
    g = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(3):
        seen = []
        sizes = []
        for xb, yb in iter_batches(dataset, batch_size, shuffle=True, generator=g):
            assert xb.shape[1:] == (1, 2, 2) and yb.dtype == torch.long and yb.dim() == 1
            ids = ids_of(xb)
            assert yb.tolist() == [i % 10 for i in ids]  # inputs and labels stay paired
            seen.extend(ids)
            sizes.append(len(ids))
        assert sorted(seen) == list(range(n))
        assert sizes == [min(batch_size, n - s) for s in range(0, n, batch_size)]
        orders.append(seen)
    if n >= 20:
        assert len({tuple(o) for o in orders}) == 3  # a new order each epoch

    ordered = [i for xb, _ in iter_batches(dataset, batch_size, shuffle=False) for i in ids_of(xb)]
    assert ordered == list(range(n))


@pytest.mark.parametrize("kind", ["array", "plain"])
def test_iter_batches_order_is_fixed_by_the_generator(kind: str) -> None:
    dataset = make_datasets(30)[kind]

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [i for xb, _ in iter_batches(dataset, 4, shuffle=True, generator=g) for i in ids_of(xb)]

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_tensor_backed_shuffle_is_one_randperm() -> None:
    # what the one-client FedAvg equivalence relies on: the order is randperm(n, generator)
    dataset = make_datasets(17)["array"]
    g = torch.Generator().manual_seed(42)
    got = [i for xb, _ in iter_batches(dataset, 4, shuffle=True, generator=g) for i in ids_of(xb)]
    assert got == torch.randperm(17, generator=torch.Generator().manual_seed(42)).tolist()


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int16, torch.int64], ids=["int32", "int16", "int64"])
def test_labels_come_out_int64_for_every_dataset_kind(label_dtype: torch.dtype) -> None:
    # a user's TensorDataset with int32 labels must train just like the same data behind a generic Dataset
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    tensor_ds = TensorDataset(x, y.to(label_dtype))

    class Generic(Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int):
            return x[i], y.to(label_dtype)[i]

    trainer = LocalTrainer(net(), device="cpu")
    start = trainer.vector.read()
    reference = trainer.fit(task(start, batch_size=5, lr=0.1, seed=2), ClientData(ArrayDataset(x, y)))
    result = trainer.fit(task(start, batch_size=5, lr=0.1, seed=2), ClientData(tensor_ds))
    torch.testing.assert_close(update(result), update(reference), rtol=0, atol=1e-6)
    for ds in (Generic(), tensor_ds):
        batches = list(iter_batches(ds, 5, shuffle=False))
        assert all(yb.dtype == torch.int64 for _, yb in batches)
        assert torch.equal(torch.cat([yb for _, yb in batches]), y)
