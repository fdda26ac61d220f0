"""The in-process runtime: one reused model for every client, shared test sets scored once."""

from __future__ import annotations

import gc

import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg

torch.set_num_threads(1)


class CountedNet(nn.Module):
    """A model class of its own, so live instances can be counted."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(x))


def live() -> tuple[int, int]:
    """Live (CountedNet, nn.Linear) instances."""
    gc.collect()
    objects = gc.get_objects()
    return sum(1 for o in objects if type(o) is CountedNet), sum(1 for o in objects if type(o) is nn.Linear)


def data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_all_clients_train_on_one_model_instance(monkeypatch) -> None:
    torch.manual_seed(0)
    model = CountedNet()
    trainer = LocalTrainer(model, device="cpu")
    shared_test = data(20, 999)
    clients = {f"c{i:02d}": ClientData(data(4 + i % 5, i), shared_test) for i in range(50)}
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    model_id, fc_id, weight_id = id(trainer.model), id(trainer.model.fc), id(trainer.model.fc.weight)
    before = live()
    assert before[0] >= 1 and before[1] >= 1

    seen_models: set[int] = set()
    original_fit = trainer.fit

    def spying_fit(task, client, hooks=(), state=None):
        seen_models.add(id(trainer.model))
        return original_fit(task, client, hooks, state)

    trainer.fit = spying_fit
    # deepcopy and pickling rebuild modules through __setstate__ and parameters through __deepcopy__
    rebuilt: list[str] = []
    original_setstate = nn.Module.__setstate__
    original_param_copy = nn.Parameter.__deepcopy__

    def counting_setstate(self, state):
        rebuilt.append(type(self).__name__)
        return original_setstate(self, state)

    def counting_param_copy(self, memo):
        rebuilt.append("Parameter")
        return original_param_copy(self, memo)

    monkeypatch.setattr(nn.Module, "__setstate__", counting_setstate)
    monkeypatch.setattr(nn.Parameter, "__deepcopy__", counting_param_copy)
    loop = RoundLoop(FedAvg(local=LocalConfig(batch_size=2, lr=0.05)), runtime, trainer.vector.spec,
                     trainer.vector.read(), seed=1, federated_eval=True)
    history = loop.run(2)

    assert all(row["clients_succeeded"] == 50 for row in history)
    assert len(seen_models) == 1 and history[-1]["fed_accuracy"] is not None  # the spy saw every fit
    assert rebuilt == []
    assert seen_models == {model_id}
    assert trainer.model is model and id(trainer.model) == model_id
    assert id(trainer.model.fc) == fc_id and id(trainer.model.fc.weight) == weight_id
    assert trainer.vector.module is model
    assert live() == before
    # the loop's global weights are its own tensor, not a view of the shared model's storage
    assert loop.weights.data_ptr() != trainer.model.fc.weight.data_ptr()


def test_train_yields_one_result_per_task_in_order() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(CountedNet(), device="cpu")
    clients = {c: ClientData(data(6, i)) for i, c in enumerate("abc")}
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    assert runtime.client_ids() == ["a", "b", "c"]
    w = trainer.vector.read()
    tasks = [TrainTask(3, c, {"weights": w}, LocalConfig(seed=i).to_dict()) for i, c in enumerate("ca")]
    results = list(runtime.deliver(tasks))
    assert [type(r) for r in results] == [TrainResult, TrainResult]
    assert [(r.client_id, r.round, r.num_examples) for r in results] == [("c", 3, 6), ("a", 3, 6)]
    assert all(list(r.arrays) == ["update"] for r in results)
    # each client trained on its own data from the same start, unaffected by who ran before it
    solo = trainer.fit(tasks[1], clients["a"])
    assert torch.equal(solo.arrays["update"], results[1].arrays["update"])
    assert solo.num_examples == 6 and solo.metrics == results[1].metrics
    assert not torch.equal(results[0].arrays["update"], results[1].arrays["update"])


def test_deliver_answers_mixed_tasks_in_order_and_refuses_a_client_it_does_not_host() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(CountedNet(), device="cpu")
    clients = {c: ClientData(data(6, i), data(5, 10 + i)) for i, c in enumerate("ab")}
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    w = trainer.vector.read()
    tasks = [EvalTask(2, "b", {"weights": w}, {}), TrainTask(2, "stranger", {"weights": w}, LocalConfig().to_dict()),
             TrainTask(2, "a", {"weights": w}, LocalConfig().to_dict())]
    answers = list(runtime.deliver(tasks))
    assert [type(a) for a in answers] == [EvalResult, ClientFailure, TrainResult]
    assert [a.client_id for a in answers] == ["b", "stranger", "a"]
    assert "stranger" in answers[1].reason
    assert answers[0].num_examples == 5 and answers[2].num_examples == 6


def test_evaluation_dedupe_shares_results_for_a_shared_test_set() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(CountedNet(), device="cpu")
    shared = data(30, 100)
    other = data(11, 101)
    clients = {
        "a": ClientData(data(5, 1), shared),
        "b": ClientData(data(5, 2), shared),
        "c": ClientData(data(5, 3), other),
        "d": ClientData(data(5, 4), shared),
    }
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    calls: list[str] = []
    original = trainer.evaluate

    def counting(task, client, state=None):
        calls.append(task.client_id)
        return original(task, client, state)

    trainer.evaluate = counting
    w = trainer.vector.read()
    tasks = [EvalTask(7, cid, {"weights": w}, {"eval_batch_size": 4}) for cid in clients]
    results = list(runtime.deliver(tasks))
    assert all(isinstance(r, EvalResult) for r in results)
    by_id = {r.client_id: r for r in results}
    assert [r.client_id for r in results] == ["a", "b", "c", "d"]
    assert all(r.round == 7 for r in results)
    for cid in ("b", "d"):
        assert (by_id[cid].loss, by_id[cid].accuracy, by_id[cid].num_examples) == (
            by_id["a"].loss, by_id["a"].accuracy, by_id["a"].num_examples)
    assert by_id["a"].num_examples == 30 and by_id["c"].num_examples == 11
    assert by_id["c"].loss != by_id["a"].loss
    # the shared set was scored once, and the answer is what scoring it directly gives
    assert calls == ["a", "c"]
    n, metrics = original(EvalTask(7, "b", {"weights": w}, {"eval_batch_size": 4}), clients["b"])
    assert (metrics["loss"], metrics["accuracy"], n) == (by_id["b"].loss, by_id["b"].accuracy, by_id["b"].num_examples)
    assert metrics == by_id["b"].metrics


def test_evaluation_with_different_weights_is_not_deduped() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(CountedNet(), device="cpu")
    shared = data(30, 100)
    runtime = InProcessRuntime(ClientApp(trainer, {"a": ClientData(data(5, 1), shared),
                                                   "b": ClientData(data(5, 2), shared)}))
    w1 = trainer.vector.read()
    w2 = w1 + 0.5
    r1, r2 = runtime.deliver([EvalTask(1, "a", {"weights": w1}, {}), EvalTask(1, "b", {"weights": w2}, {})])
    assert r1.loss != r2.loss


def test_client_without_test_data_answers_with_zero_examples() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(CountedNet(), device="cpu")
    empty = ArrayDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.long))
    clients = {"none": ClientData(data(5, 1)), "empty": ClientData(data(5, 2), empty),
               "ok": ClientData(data(5, 3), data(6, 4))}
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    w = trainer.vector.read()
    results = list(runtime.deliver([EvalTask(1, c, {"weights": w}, {}) for c in clients]))
    # a client without test data answers (0 examples, no metrics) as it does over gRPC, not a failure
    assert all(isinstance(r, EvalResult) for r in results)
    assert [r.client_id for r in results] == ["none", "empty", "ok"]
    assert [(r.num_examples, r.metrics) for r in results[:2]] == [(0, {}), (0, {})]
    assert results[0].loss is None and results[0].accuracy is None
    assert results[2].num_examples == 6 and results[2].accuracy is not None

    # federated evaluation in the loop leaves them out and weights by the clients that have test data
    loop = RoundLoop(FedAvg(), runtime, trainer.vector.spec, w)
    fed = loop.evaluate_federated()
    assert fed["num_examples"] == 6
    assert fed["accuracy"] == results[2].accuracy
