"""SCAFFOLD: zero controls make a round FedAvg's; it removes client drift; resume restores the controls."""

from __future__ import annotations

import json

import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ModelVector
from fedlearn.run.config import RunConfig
from fedlearn.run.runner import run
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import build_strategy


def _drift_problem(clients: int = 4, n: int = 40, d: int = 5, seed: int = 0):
    """Least squares where every client has its own optimum and its own input scaling (drift-prone)."""
    g = torch.Generator().manual_seed(seed)
    data, xs, ys = {}, [], []
    for k in range(clients):
        scale = torch.linspace(0.2, 2.0, d)[torch.randperm(d, generator=g)]
        x = torch.randn(n, d, generator=g) * scale
        w_k = torch.randn(d, generator=g) * 2
        y = x @ w_k
        data[f"c{k}"] = ClientData(ArrayDataset(x, y))
        xs.append(x.double())
        ys.append(y.double())
    x, y = torch.cat(xs), torch.cat(ys)
    optimum = torch.linalg.solve(x.T @ x, x.T @ y)
    return data, optimum


def _loop(name: str, data: dict, local: LocalConfig, seed: int = 0) -> RoundLoop:
    torch.manual_seed(seed)
    model = nn.Linear(5, 1, bias=False)
    app = ClientApp(LocalTrainer(model, "cpu", task="regression"), data)
    vector = ModelVector(model)
    return RoundLoop(build_strategy(name, local), InProcessRuntime(app), vector.spec, vector.read(), seed=seed,
                     client_state=app.state)


def test_first_round_with_zero_controls_equals_fedavg():
    data, _ = _drift_problem()
    local = LocalConfig(local_epochs=2, batch_size=8, lr=0.02)
    fedavg, scaffold = _loop("fedavg", data, local), _loop("scaffold", data, local)
    fedavg.run_round()
    scaffold.run_round()
    assert torch.equal(fedavg.weights, scaffold.weights)
    assert scaffold.state.extras["control"].abs().sum() > 0  # the server control moved
    assert all(len(scaffold.client_state.get(c)) == 1 for c in data)  # every client stored its own control


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts():
    data, optimum = _drift_problem()
    local = LocalConfig(local_epochs=5, batch_size=40, lr=0.05)  # full-batch local GD, 5 steps per round
    distances = {}
    for name in ("fedavg", "scaffold"):
        loop = _loop(name, data, local)
        loop.run(60)
        distances[name] = float(torch.linalg.vector_norm(loop.weights.double() - optimum))
    assert distances["scaffold"] < 1e-3
    assert distances["fedavg"] > 20 * distances["scaffold"]


def test_resume_equals_a_straight_run_with_client_controls_restored(tmp_path):
    base = dict(dataset="digits", clients=4, rounds=4, local_epochs=1, algorithm="scaffold", seed=3,
                lr=0.05)
    straight = run(RunConfig(**base, output=str(tmp_path / "straight")))
    run(RunConfig(**{**base, "rounds": 2}, output=str(tmp_path / "resumed")))
    controls = list((tmp_path / "resumed" / "client_state").glob("*.pt"))
    assert len(controls) == 8  # one control per client for each kept checkpoint (rounds 1 and 2)
    resumed = run(resume=tmp_path / "resumed", rounds=4)
    assert resumed["final_accuracy"] == straight["final_accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(rows, again):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_deployed_client_keeps_its_control_across_a_restart(tmp_path):
    """A `fedlearn client` keeps c_i in its own folder: a restarted process answers round 2 exactly as one that
    never stopped (and differently from a client that lost its control)."""
    from fedlearn.client.state import ClientStateStore
    from fedlearn.strategies.base import ServerState

    data, _ = _drift_problem(clients=1)
    local = LocalConfig(local_epochs=2, batch_size=8, lr=0.02)
    strategy = build_strategy("scaffold", local)
    torch.manual_seed(0)
    start = ModelVector(nn.Linear(5, 1, bias=False)).read()
    state = ServerState(start, {"control": torch.full_like(start, 0.01)})

    def app(folder):
        torch.manual_seed(0)
        return ClientApp(LocalTrainer(nn.Linear(5, 1, bias=False), "cpu", task="regression"), data,
                         state=ClientStateStore.open_latest(folder), commit_state=True)

    def task(rnd):
        return strategy.configure_train(rnd, state, ["c0"], seed=0)[0]

    steady = app(tmp_path / "steady")
    steady.train(task(1))
    expected = steady.train(task(2))

    first = app(tmp_path / "restarted")
    first.train(task(1))
    del first  # the process dies; only its folder survives
    again = app(tmp_path / "restarted").train(task(2))
    forgot = app(tmp_path / "empty").train(task(2))
    assert torch.equal(again.arrays["control_delta"], expected.arrays["control_delta"])
    assert torch.equal(again.arrays["update"], expected.arrays["update"])
    assert not torch.equal(forgot.arrays["update"], expected.arrays["update"])


def test_under_central_dp_the_server_control_does_not_depend_on_how_many_answered():
    """The control is sent to every client: it must scale by the expected count, as the noisy mean does."""
    from fedlearn.protocol.messages import TrainResult
    from fedlearn.strategies.base import Sampler, ServerState
    from fedlearn.strategies.dp import CentralDP

    inner = build_strategy("scaffold", LocalConfig(), sampler=Sampler(0.5))
    strategy = CentralDP(inner, clip_norm=1e6, noise_multiplier=0.0, delta=1e-5, population=4)
    weights = torch.zeros(6)
    state = ServerState(weights, {"control": torch.zeros(6)})
    strategy.sampler.sample([f"c{i}" for i in range(4)], 1, 0)
    delta = torch.arange(6, dtype=torch.float32)
    controls = []
    for answered in (1, 3):
        aggregator = strategy.aggregator(1, state)
        for i in range(answered):
            arrays = {"update": torch.zeros(6), "control_delta": delta / answered}
            aggregator.add(TrainResult(1, f"c{i}", 5, arrays), arrays)
        controls.append(strategy.apply(state, aggregator.result(), aggregator.count).extras["control"])
    # the same summed control delta, whoever answered: control = (qK / K) * sum / (qK)
    assert torch.allclose(controls[0], controls[1])
    assert torch.allclose(controls[0], delta / 4)
