"""Tests for the running weighted mean and the FedAvg/FedSGD aggregation formula."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import ConfigError
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainResult
from fedlearn.strategies import FedAvg, FedProx, FedSGD, ServerState, Strategy, algorithms, build_strategy
from fedlearn.strategies.aggregate import WeightedMean

torch.set_num_threads(1)


def explicit_mean(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    num = sum(w * v.double() for v, w in zip(vectors, weights))
    return (num / sum(weights)).float()


@pytest.mark.parametrize("seed", range(5))
def test_weighted_mean_equals_explicit_average(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, 9, (1,), generator=g))
    vectors = [torch.randn(257, generator=g) * 10 for _ in range(k)]
    weights = [int(w) for w in torch.randint(1, 1000, (k,), generator=g)]
    wm = WeightedMean()
    for v, w in zip(vectors, weights):
        wm.add(v, w)
    out = wm.mean()
    assert out.dtype == torch.float32 and out.shape == (257,)
    assert wm.count == k and wm.total_weight == sum(weights)
    torch.testing.assert_close(out, explicit_mean(vectors, weights), rtol=0, atol=1e-6)


def test_weighted_mean_with_weights_of_very_different_magnitudes() -> None:
    g = torch.Generator().manual_seed(7)
    vectors = [torch.randn(100, generator=g) for _ in range(4)]
    weights = [1, 10**9, 3, 10**5]
    wm = WeightedMean()
    for v, w in zip(vectors, weights):
        wm.add(v, w)
    torch.testing.assert_close(wm.mean(), explicit_mean(vectors, weights), rtol=0, atol=1e-6)
    # the small-weight clients still count: the result is not just the big client's vector
    assert not torch.equal(wm.mean(), vectors[1])
    # a weight-1 client against a 2**30 one still shifts the mean by exactly its share
    small = WeightedMean()
    small.add(torch.zeros(1), 2**30)
    small.add(torch.ones(1), 1)
    expected = 1 / (2**30 + 1)
    assert abs(float(small.mean()) - expected) < 1e-7 * expected


def test_weighted_mean_single_vector_and_order_independence() -> None:
    g = torch.Generator().manual_seed(1)
    v = torch.randn(10, generator=g)
    wm = WeightedMean()
    wm.add(v, 17)
    torch.testing.assert_close(wm.mean(), v, rtol=0, atol=1e-7)
    vs = [torch.randn(10, generator=g) for _ in range(3)]
    ws = [5, 50, 500]
    a, b = WeightedMean(), WeightedMean()
    for v_, w_ in zip(vs, ws):
        a.add(v_, w_)
    for v_, w_ in reversed(list(zip(vs, ws))):
        b.add(v_, w_)
    torch.testing.assert_close(a.mean(), b.mean(), rtol=0, atol=1e-7)


def test_weighted_mean_does_not_mutate_inputs() -> None:
    v = torch.ones(3, dtype=torch.float64)
    wm = WeightedMean()
    wm.add(v, 2)
    wm.add(v, 3)
    assert torch.equal(v, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(wm.mean(), torch.ones(3))


def test_weighted_mean_refuses_nonpositive_weight_and_empty_mean() -> None:
    wm = WeightedMean()
    with pytest.raises(ValueError):
        wm.mean()
    for bad in (0, -1, -0.5):
        with pytest.raises(ValueError):
            wm.add(torch.ones(2), bad)
    assert wm.count == 0


def result(cid: str, n: int, array: torch.Tensor, name: str = "update") -> TrainResult:
    return TrainResult(1, cid, n, {name: array}, {"train_loss": 0.0})


def run_round(strategy: Strategy, weights: torch.Tensor, results: list[TrainResult],
              arrays: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
    """Fold ``results`` (or the given checked ``arrays``) into the strategy's aggregator and apply it."""
    state = ServerState(weights)
    agg = strategy.aggregator(1, state)
    for r, a in zip(results, arrays or [r.arrays for r in results]):
        agg.add(r, a)
    assert agg.count == len(results)
    return strategy.apply(state, agg.result(), agg.count).weights


def test_fedavg_aggregation_formula() -> None:
    g = torch.Generator().manual_seed(3)
    global_w = torch.randn(50, generator=g)
    global_copy = global_w.clone()
    ns = [10, 250, 3, 1000]
    deltas = [torch.randn(50, generator=g) for _ in ns]
    new = run_round(FedAvg(), global_w, [result(f"c{i}", n, d) for i, (n, d) in enumerate(zip(ns, deltas))])
    n = sum(ns)
    expected = global_w.double() + sum((nk / n) * d.double() for nk, d in zip(ns, deltas))
    torch.testing.assert_close(new, expected.float(), rtol=0, atol=1e-6)
    # the global vector is not modified in place
    assert not torch.equal(new, global_w)
    assert torch.equal(global_w, global_copy)


def test_fedavg_aggregator_streams_and_returns_the_mean_update_not_weights() -> None:
    # the aggregator's result is the weighted mean update; applying it is the server optimizer's job
    g = torch.Generator().manual_seed(8)
    ds = [torch.randn(6, generator=g) for _ in range(3)]
    ns = [2, 5, 11]
    agg = FedAvg().aggregator(1, ServerState(torch.full((6,), 7.0)))
    for i, (n, d) in enumerate(zip(ns, ds)):
        agg.add(result(f"c{i}", n, d), {"update": d})
    out = agg.result()
    assert set(out) == {"update"}
    torch.testing.assert_close(out["update"], explicit_mean(ds, ns), rtol=0, atol=1e-7)


def test_fedavg_uses_the_checked_arrays_not_the_results_own() -> None:
    # the server checks results' arrays before folding them in: the aggregation must use the checked arrays
    global_w = torch.zeros(3)
    results = [result("a", 1, torch.full((3,), 100.0)), result("b", 3, torch.full((3,), 100.0))]
    new = run_round(FedAvg(), global_w, results, [{"update": torch.ones(3)}, {"update": torch.full((3,), 5.0)}])
    torch.testing.assert_close(new, torch.full((3,), (1 + 15) / 4))


def test_fedsgd_aggregation_is_a_gradient_step() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(20, generator=g)
    grads = [torch.randn(20, generator=g) for _ in range(3)]
    ns = [7, 70, 700]
    strategy = FedSGD(local=LocalConfig(lr=0.05))
    assert strategy.uplink == ("gradient",)
    new = run_round(strategy, w, [result(f"c{i}", n, gr, "gradient") for i, (n, gr) in enumerate(zip(ns, grads))])
    expected = w.double() - 0.05 * sum((nk / sum(ns)) * gk.double() for nk, gk in zip(ns, grads))
    torch.testing.assert_close(new, expected.float(), rtol=0, atol=1e-6)


def test_fedprox_aggregates_like_fedavg() -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, generator=g)
    ds = [torch.randn(8, generator=g) for _ in range(3)]
    outs = []
    for strategy in (FedAvg(), FedProx(config=FedProx.Config(mu=0.5)), build_strategy("fedprox", mu=0.5)):
        outs.append(run_round(strategy, w, [result(f"c{i}", i + 1, d) for i, d in enumerate(ds)]))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2])


def test_build_strategy_names() -> None:
    local = LocalConfig(lr=0.3, local_epochs=4)
    avg = build_strategy("fedavg", local)
    assert type(avg) is FedAvg and avg.local == local
    sgd = build_strategy("fedsgd", local)
    assert type(sgd) is FedSGD and sgd.local.mode == "gradient" and sgd.local.lr == 0.3
    prox = build_strategy("fedprox", local, mu=0.2)
    assert type(prox) is FedProx and prox.config.mu == 0.2 and prox.local.local_epochs == 4
    assert prox.hooks() == {"prox": {"mu": 0.2}}
    assert build_strategy("fedavg").local == LocalConfig()


def test_every_registered_algorithm_builds_under_its_own_name() -> None:
    local = LocalConfig(lr=0.3, local_epochs=4)
    assert {"fedavg", "fedsgd", "fedprox"} <= set(algorithms())
    for name in algorithms():
        strategy = build_strategy(name, local)
        assert strategy.name == name
        assert strategy.local.lr == 0.3 and strategy.local.local_epochs == 4


@pytest.mark.parametrize("name", ["FedAvg", "", "fed avg"])
def test_build_strategy_unknown_name_raises_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="fedavg"):
        build_strategy(name)


def test_fedprox_refuses_negative_mu() -> None:
    with pytest.raises(ConfigError, match="mu"):
        build_strategy("fedprox", mu=-0.1)
    with pytest.raises(ConfigError, match="mu"):
        FedProx(config=FedProx.Config(mu=-0.1))
    assert build_strategy("fedprox", mu=0.0).config.mu == 0.0  # zero is allowed: it is FedAvg


def test_task_config_carries_local_and_derived_seed() -> None:
    from fedlearn.seeding import derive_seed

    strategy = FedAvg(local=LocalConfig(lr=0.2, batch_size=4))
    w = torch.zeros(3)
    tasks = strategy.configure_train(5, ServerState(w), ["a", "b"], seed=9)
    assert [t.client_id for t in tasks] == ["a", "b"]
    assert all(t.round == 5 and t.weights is w for t in tasks)
    assert tasks[0].config["seed"] == derive_seed(9, 5, "a")
    assert tasks[1].config["seed"] == derive_seed(9, 5, "b")
    assert tasks[0].config["seed"] != tasks[1].config["seed"]
    assert tasks[0].config["lr"] == 0.2 and tasks[0].config["batch_size"] == 4
    assert LocalConfig.from_dict(tasks[0].config) == LocalConfig(lr=0.2, batch_size=4, seed=derive_seed(9, 5, "a"))
    # FedSGD keeps gradient mode even when the local config is changed
    sgd = FedSGD()
    sgd.set_local(lr=0.7, mode="delta")
    assert sgd.local.mode == "gradient" and sgd.local.lr == 0.7
    assert sgd.configure_train(1, ServerState(w), ["a"], seed=0)[0].config["mode"] == "gradient"
