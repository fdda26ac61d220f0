"""The round loop: rejection of bad updates, min_clients, determinism, resume, byte accounting."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.state import ClientStateStore
from fedlearn.client.trainer import LocalTrainer, evaluate_model
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import CheckpointError, InvalidUpdateError
from fedlearn.protocol.codec import encode, wire_size
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Message, TrainResult, TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.checkpoint import checkpoint_files, load_checkpoint
from fedlearn.server.evaluation import CentralEvaluator
from fedlearn.server.ledger import LEDGER, PrivacyLedger
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg, FedProx, FedSGD, Scaffold
from fedlearn.strategies.base import Sampler, Strategy

torch.set_num_threads(1)

LOCAL = LocalConfig(local_epochs=2, batch_size=8, lr=0.1, momentum=0.9, weight_decay=1e-4)


def linear() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 10))


def dataset(n: int, seed: int, nan: bool = False) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    if nan:
        x[n // 2, 0, 3, 3] = float("nan")
    return ArrayDataset(x, torch.randint(0, 10, (n,), generator=g))


def clients(names: Sequence[str], nan: Sequence[str] = ()) -> dict[str, ClientData]:
    test = dataset(40, 1000)
    return {
        name: ClientData(dataset(10 + 7 * i, i, nan=name in nan), test if i % 2 else dataset(15, 500 + i))
        for i, name in enumerate(names)
    }


def build(
    names: Sequence[str] = ("a", "b", "c", "d", "e", "f"),
    *,
    nan: Sequence[str] = (),
    strategy: Strategy | None = None,
    model_fn: Callable[[], nn.Module] = linear,
    wrap: Callable | None = None,
    drop: Sequence[str] = (),
    fraction: float = 1.0,
    min_clients: int = 1,
    state: ClientStateStore | None = None,
    **loop_kwargs,
) -> RoundLoop:
    """A loop over in-process clients; ``fraction`` and ``min_clients`` go to the strategy's sampler (and
    ``min_clients`` also to the loop's aggregation threshold, as the old loop used it for both)."""
    torch.manual_seed(0)
    model = model_fn()
    trainer = LocalTrainer(model, device="cpu")
    data = clients(names, nan)
    for name in drop:
        data.pop(name)
    app = ClientApp(trainer, data, state=state)
    runtime = InProcessRuntime(app)
    if wrap is not None:
        runtime = wrap(runtime)
    evaluator = CentralEvaluator(model_fn(), dataset(50, 2000), device="cpu")
    strategy = strategy or FedAvg(local=LOCAL)
    strategy.sampler = Sampler(fraction, min_clients)
    return RoundLoop(strategy, runtime, trainer.vector.spec, trainer.vector.read(), evaluator=evaluator,
                     min_clients=min_clients, client_state=app.state, **loop_kwargs)


def rows(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


# -- rejected and missing clients --------------------------------------------------------------


def test_nan_client_is_rejected_and_the_others_aggregate_as_without_it() -> None:
    with_bad = build(("a", "b", "bad", "c"), nan=("bad",))
    without = build(("a", "b", "bad", "c"), drop=("bad",))
    row = with_bad.run_round()
    ref = without.run_round()
    assert row["clients_sampled"] == 4
    assert row["clients_succeeded"] == 3
    assert row["failed_clients"] == ["bad"]
    assert row["aggregated"] is True
    assert torch.equal(with_bad.weights, without.weights)
    assert torch.isfinite(with_bad.weights).all()
    assert row["train_loss"] == ref["train_loss"]
    assert ref["clients_succeeded"] == 3 and ref["failed_clients"] == []


def test_clients_refused_for_one_reason_take_two_log_lines_not_one_each(caplog) -> None:
    bad = tuple(f"bad{i}" for i in range(8))
    loop = build(("a", *bad), nan=bad)
    with caplog.at_level("WARNING", logger="fedlearn.server.collect"):
        row = loop.run_round()
    assert sorted(row["failed_clients"]) == sorted(bad)
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 2, lines
    first = lines[0].split("result from ", 1)[1].split()[0]  # the helper's NaN client also reports a NaN loss
    others = sorted(set(bad) - {first})
    assert lines[0].startswith(f"round 1: rejected train task: result from {first} has metrics that are not finite")
    assert lines[1] == (f"round 1: rejected 7 more train tasks like {first}'s: {', '.join(others[:5])} and 2 more")


def test_min_clients_not_reached_leaves_weights_unchanged() -> None:
    loop = build(("a", "bad1", "bad2"), nan=("bad1", "bad2"), min_clients=2)
    start = loop.weights.clone()
    row = loop.run_round()
    assert row["aggregated"] is False
    assert row["clients_succeeded"] == 1
    assert sorted(row["failed_clients"]) == ["bad1", "bad2"]
    assert torch.equal(loop.weights, start)
    assert loop.round == 1 and len(loop.history) == 1
    # with min_clients met the same round does move the weights
    ok = build(("a", "bad1", "bad2"), nan=("bad1", "bad2"), min_clients=1)
    assert ok.run_round()["aggregated"] is True
    assert not torch.equal(ok.weights, start)


def test_no_client_succeeds() -> None:
    loop = build(("bad",), nan=("bad",))
    start = loop.weights.clone()
    row = loop.run_round()
    assert row["aggregated"] is False and row["clients_succeeded"] == 0
    assert row["train_loss"] is None
    assert torch.equal(loop.weights, start)


class FailingRuntime:
    """Wraps a runtime: reports some clients as failed, silently drops others, tampers with some."""

    def __init__(self, inner, failing=(), silent=(), tamper: dict | None = None) -> None:
        self.inner = inner
        self.failing = set(failing)
        self.silent = set(silent)
        self.tamper = tamper or {}

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        for answer in self.inner.deliver(tasks):
            cid = answer.client_id
            if not isinstance(answer, TrainResult):  # only training answers are failed or tampered with
                yield answer
            elif cid in self.failing:
                yield ClientFailure(cid, "connection lost")
            elif cid in self.silent:
                continue
            elif cid in self.tamper:
                yield self.tamper[cid](answer)
            else:
                yield answer

    def close(self) -> None:
        pass


def test_client_failure_is_listed_once_and_others_aggregate() -> None:
    loop = build(("a", "b", "c"), wrap=lambda rt: FailingRuntime(rt, failing=("b",)))
    ref = build(("a", "b", "c"), drop=("b",))
    row = loop.run_round()
    ref.run_round()
    assert row["clients_succeeded"] == 2 and row["aggregated"]
    assert row["failed_clients"] == ["b"]
    assert torch.equal(loop.weights, ref.weights)


def test_client_that_never_answers_is_listed_as_failed() -> None:
    loop = build(("a", "b", "c"), wrap=lambda rt: FailingRuntime(rt, silent=("c",)))
    ref = build(("a", "b", "c"), drop=("c",))
    row = loop.run_round()
    ref.run_round()
    assert row["failed_clients"] == ["c"] and row["clients_succeeded"] == 2
    assert torch.equal(loop.weights, ref.weights)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda r: TrainResult(r.round + 1, r.client_id, r.num_examples, r.arrays, r.metrics),
        lambda r: TrainResult(r.round, r.client_id, 0, r.arrays, r.metrics),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {"update": r.arrays["update"][:-1]}, r.metrics),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {"update": r.arrays["update"] * float("inf")},
                              r.metrics),
        lambda r: TrainResult(r.round, "stranger", r.num_examples, r.arrays, r.metrics),
        # what a remote client controls after decode: metrics that are not numbers, arrays it names itself
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, r.arrays, {"train_loss": "low"}),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, r.arrays, ["train_loss", 0.1]),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {}, r.metrics),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {"gradient": r.arrays["update"]}, r.metrics),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {**r.arrays, "extra": r.arrays["update"]},
                              r.metrics),
        lambda r: TrainResult(r.round, r.client_id, r.num_examples, {"update": r.arrays["update"].double()},
                              r.metrics),
    ],
    ids=["wrong-round", "zero-examples", "wrong-size", "inf", "unknown-client", "metrics-string", "metrics-list",
         "no-update", "wrong-array-name", "extra-array", "float64"],
)
def test_invalid_results_are_rejected_not_aggregated(tamper) -> None:
    loop = build(("a", "b", "c"), wrap=lambda rt: FailingRuntime(rt, tamper={"b": tamper}))
    ref = build(("a", "b", "c"), drop=("b",))
    row = loop.run_round()
    ref.run_round()
    assert row["clients_succeeded"] == 2
    assert "b" in row["failed_clients"] or "stranger" in row["failed_clients"]
    assert torch.equal(loop.weights, ref.weights)


# -- determinism and resume --------------------------------------------------------------------


def test_same_seed_gives_identical_history_and_weights() -> None:
    a = build(seed=5, fraction=0.5, federated_eval=True)
    b = build(seed=5, fraction=0.5, federated_eval=True)
    ha, hb = a.run(3), b.run(3)
    assert rows(ha) == rows(hb)
    assert torch.equal(a.weights, b.weights)
    assert all(row["clients_sampled"] == 3 for row in ha)
    other = build(seed=6, fraction=0.5, federated_eval=True)
    other.run(3)
    assert not torch.equal(other.weights, a.weights)


@pytest.mark.parametrize(
    "make_strategy",
    [lambda: FedAvg(local=LOCAL), lambda: FedProx(config=FedProx.Config(mu=0.1), local=LOCAL),
     lambda: FedSGD(local=LocalConfig(lr=0.5)), lambda: Scaffold(local=LOCAL)],
    ids=["fedavg", "fedprox", "fedsgd", "scaffold"],
)
def test_resume_equals_a_straight_run(tmp_path, make_strategy) -> None:
    kwargs = {"seed": 9, "fraction": 0.5, "min_clients": 2, "federated_eval": True}
    straight = build(strategy=make_strategy(), checkpoint_path=tmp_path / "straight.pt", **kwargs)
    straight.run(1)
    straight.strategy.set_local(lr=0.03)  # strategy state that only the checkpoint can carry over
    straight.run(4)

    path = tmp_path / "ckpt.pt"
    first = build(strategy=make_strategy(), checkpoint_path=path, **kwargs)
    first.run(1)
    first.strategy.set_local(lr=0.03)
    first.run(2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == ["ckpt.1.pt", "ckpt.pt"]
    saved = load_checkpoint(path)
    assert saved["round"] == 2 and torch.equal(saved["weights"], first.weights)
    del first

    # everything new: model, trainer, runtime, strategy; the seed comes from the checkpoint
    second = build(strategy=make_strategy(), checkpoint_path=path, **{**kwargs, "seed": 12345})
    second.resume(path)
    assert second.round == 2 and second.seed == 9 and second.strategy.local.lr == 0.03
    history = second.run(4)
    assert second.round == 4
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert torch.equal(second.weights, straight.weights)
    assert rows(history) == rows(straight.history)
    assert load_checkpoint(path)["round"] == 4


def test_a_damaged_newest_checkpoint_falls_back_and_rolls_client_state_back(tmp_path) -> None:
    """SCAFFOLD's controls live in per-round client-state files: falling back to round 2 must use round 2's."""
    kwargs = {"seed": 9, "fraction": 0.5, "min_clients": 2, "federated_eval": True}
    straight = build(strategy=Scaffold(local=LOCAL), **kwargs)
    straight.run(5)

    path, folder = tmp_path / "checkpoint.pt", tmp_path / "client_state"
    first = build(strategy=Scaffold(local=LOCAL), checkpoint_path=path, state=ClientStateStore(folder), **kwargs)
    first.run(3)
    assert [load_checkpoint(p)["round"] for p in checkpoint_files(path)] == [3, 2, 1]
    versions = {int(p.stem.split("-")[1]) for p in folder.glob("*.pt")}
    assert versions >= {1, 2, 3}  # the files the older checkpoints name are kept
    del first
    path.write_bytes(path.read_bytes()[:200])  # the newest checkpoint is cut short

    second = build(strategy=Scaffold(local=LOCAL), checkpoint_path=path, state=ClientStateStore(folder),
                   **{**kwargs, "seed": 1})
    second.resume(path)
    assert second.round == 2 and second.seed == 9
    assert max(int(p.stem.split("-")[1]) for p in folder.glob("*.pt")) <= 2  # round 3's state is not used
    history = second.run(5)
    assert torch.equal(second.weights, straight.weights)
    assert rows(history) == rows(straight.history)
    assert [load_checkpoint(p)["round"] for p in checkpoint_files(path)] == [5, 4, 3]


def test_falling_back_never_rolls_the_privacy_accountant_back(tmp_path) -> None:
    from fedlearn.privacy.accountant import PrivacyAccountant
    from fedlearn.strategies.dp import CentralDP

    def dp() -> CentralDP:
        return CentralDP(FedAvg(local=LOCAL), clip_norm=1.0, noise_multiplier=1.0, delta=1e-5, noise_seed=0)

    path = tmp_path / "checkpoint.pt"
    first = build(strategy=dp(), checkpoint_path=path, seed=3)
    first.run(3)
    ledger = PrivacyLedger(tmp_path / LEDGER)
    assert ledger.latest()["round"] == 3 and ledger.latest()["accountant"]["steps"] == 3
    path.write_bytes(b"")  # the newest checkpoint is lost

    second = build(strategy=dp(), checkpoint_path=path, seed=3)
    second.resume(path)
    assert second.round == 2
    assert second.strategy.accountant.steps == 3  # round 3 was spent, though the run goes back to round 2
    history = second.run(4)
    reference = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=second.strategy.sampler.rate, delta=1e-5)
    assert second.strategy.accountant.steps == 5
    assert history[-1]["epsilon"] == pytest.approx(reference.epsilon_after(5), rel=1e-12)
    assert history[-1]["epsilon"] > first.history[-1]["epsilon"]


def test_checkpoint_from_a_different_architecture_is_refused(tmp_path) -> None:
    path = tmp_path / "ckpt.pt"
    build(model_fn=linear, checkpoint_path=path).run(1)
    other = build(model_fn=conv)
    start = other.weights.clone()
    with pytest.raises(CheckpointError, match="different model"):
        other.resume(path)
    assert other.round == 0 and torch.equal(other.weights, start) and other.history == []
    # same architecture, different algorithm
    with pytest.raises(CheckpointError):
        build(strategy=FedSGD()).resume(path)
    with pytest.raises(CheckpointError):
        build().resume(tmp_path / "missing.pt")


# -- bookkeeping -------------------------------------------------------------------------------


class RecordingRuntime:
    def __init__(self, inner) -> None:
        self.inner = inner
        self.tasks: list[list[TrainTask]] = []
        self.results: list[list[TrainResult]] = []

    def client_ids(self) -> list[str]:
        return self.inner.client_ids()

    def deliver(self, tasks):
        if not all(isinstance(t, TrainTask) for t in tasks):
            yield from self.inner.deliver(tasks)
            return
        self.tasks.append(list(tasks))
        self.results.append([])
        for answer in self.inner.deliver(tasks):
            self.results[-1].append(answer)
            yield answer

    def close(self) -> None:
        pass


def test_bytes_up_and_down_are_the_wire_size_of_the_messages() -> None:
    recorder: list[RecordingRuntime] = []

    def wrap(rt):
        recorder.append(RecordingRuntime(rt))
        return recorder[0]

    loop = build(("a", "b", "bad", "c", "d"), nan=("bad",), wrap=wrap, fraction=0.8, seed=3)
    history = loop.run(3)
    rec = recorder[0]
    assert len(rec.tasks) == 3
    for row, tasks, results in zip(history, rec.tasks, rec.results):
        assert len(tasks) == 4 and len(results) == 4
        assert row["bytes_down"] == sum(wire_size(t) for t in tasks) == sum(len(encode(t)) for t in tasks)
        # every answer crossed the wire, including a rejected one
        assert row["bytes_up"] == sum(wire_size(r) for r in results) == sum(len(encode(r)) for r in results)
        assert row["bytes_down"] > 4 * 650 * 4 and row["bytes_up"] > 4 * 650 * 4


def test_history_row_and_central_evaluation() -> None:
    loop = build(("a", "b"))
    initial = loop.weights.clone()
    seen = []
    loop.callbacks.append(seen.append)
    row = loop.run_round()
    assert seen == [row] and loop.history == [row]
    assert set(row) == {"round", "train_loss", "clients_sampled", "clients_succeeded", "failed_clients",
                        "aggregated", "bytes_up", "bytes_down", "test_accuracy", "test_loss", "seconds"}
    ref = linear()
    ModelVector(ref).load(loop.weights)
    n, metrics = evaluate_model(ref, dataset(50, 2000), torch.device("cpu"), pooled=False)
    assert n == 50
    assert row["test_loss"] == metrics["loss"] and row["test_accuracy"] == metrics["accuracy"]
    assert row["seconds"] >= 0
    assert not torch.equal(loop.weights, initial)


def test_loop_does_not_modify_the_callers_weights_and_refuses_wrong_size() -> None:
    torch.manual_seed(0)
    trainer = LocalTrainer(linear(), device="cpu")
    start = trainer.vector.read()
    copy = start.clone()
    loop = RoundLoop(FedAvg(local=LOCAL), InProcessRuntime(ClientApp(trainer, clients(("a",)))),
                     trainer.vector.spec, start)
    loop.run(1)
    assert torch.equal(start, copy)
    assert not torch.equal(loop.weights, start)
    with pytest.raises(InvalidUpdateError):
        RoundLoop(FedAvg(), InProcessRuntime(ClientApp(trainer, {})), trainer.vector.spec, torch.zeros(649))


def test_federated_evaluation_row_is_sample_weighted() -> None:
    loop = build(("a", "b", "c"), federated_eval=True)
    loop.evaluator = None
    row = loop.run_round()
    results = list(loop.runtime.deliver(loop.strategy.configure_evaluate(1, loop.state, ["a", "b", "c"])))
    n = sum(r.num_examples for r in results)
    assert n == 15 + 40 + 15
    assert row["fed_accuracy"] == pytest.approx(sum(r.accuracy * r.num_examples for r in results) / n, abs=1e-12)
    assert row["fed_loss"] == pytest.approx(sum(r.loss * r.num_examples for r in results) / n, abs=1e-12)
    assert row["test_accuracy"] == row["fed_accuracy"]


def test_a_refused_evaluation_answer_is_recorded_in_the_row() -> None:
    """A client whose evaluation the server refuses (here: more test examples than it holds) is named in the
    row's fed_failed_clients and left out of the pooled figures, as a refused train result is."""
    from dataclasses import replace as changed

    from fedlearn.protocol.messages import EvalResult

    class Inflating:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def deliver(self, tasks):
            for answer in self.inner.deliver(tasks):
                if isinstance(answer, EvalResult) and answer.client_id == "b":
                    answer = changed(answer, num_examples=answer.num_examples * 1000)
                yield answer

    row = build(("a", "b", "c"), wrap=Inflating, federated_eval=True).run_round()
    assert row["fed_failed_clients"] == ["b"]
    honest = build(("a", "c"), federated_eval=True).run_round()
    assert honest["fed_failed_clients"] == []
