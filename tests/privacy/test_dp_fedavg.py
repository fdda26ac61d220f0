"""DP-FedAvg: clipping bounds, calibrated noise, exact reduction to FedAvg, accounting in the run's metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedlearn.cli import main
from fedlearn.client.app import ClientApp, ClientPolicy, TaskRefused
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.core.client import FedClient
from fedlearn.core.server import FedServer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.privacy.dp import clip_by_norm, gaussian_noise, noise_generator
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAdamStrategy, FedAvg, FedProx, PoissonSampler, Sampler, ServerState, build_strategy
from fedlearn.strategies.dp import DPSGD, CentralDP, DPFedAvg, LocalDP, NoisySum
from fedlearn.transforms import Clip, GaussianNoise, TransformContext, joint_norm


def test_no_clipped_update_exceeds_the_bound() -> None:
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.5, 1.0, 3.0, 1e4):
        update = torch.randn(1000, generator=g) * scale
        clipped, norm = clip_by_norm(update, 1.0)
        assert float(torch.linalg.vector_norm(clipped.double())) <= 1.0 + 1e-6
        assert norm == pytest.approx(float(torch.linalg.vector_norm(update.double())))
        if norm <= 1.0:
            assert torch.equal(clipped, update)  # below the bound nothing changes
        else:  # clipping only rescales
            assert torch.allclose(clipped * (norm / 1.0), update, rtol=1e-5, atol=1e-6)
        # the client's clip transform bounds every uplink array jointly, the same way
        control = torch.randn(10, generator=g) * scale
        metrics: dict[str, float] = {}
        out = Clip(Clip.Config(1.0)).client({"update": update, "control_delta": control}, metrics,
                                            TransformContext("c", 1))
        assert joint_norm(out) <= 1.0 + 1e-6
        assert metrics["below_clip"] == float(joint_norm({"u": update, "c": control}) <= 1.0)


def test_noise_has_the_configured_standard_deviation() -> None:
    """sum + N(0, (z C)^2), divided by the expected count: a statistical check with a fixed seed."""
    z, clip, expected = 1.3, 0.7, 4.0
    agg = NoisySum({"update": 200_000}, clip, z * clip, expected, noise_generator(1234))
    out = agg.result()["update"].double()
    assert abs(float(out.mean())) < 5 * (z * clip / expected) / math.sqrt(out.numel())
    assert float(out.std()) == pytest.approx(z * clip / expected, rel=0.01)


def test_server_clips_again_and_divides_by_the_expected_count() -> None:
    agg = NoisySum({"update": 3}, 1.0, 0.0, expected=4.0, generator=noise_generator(0))
    a, b = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])  # a has norm 5
    agg.add(TrainResult(1, "a", 10, {"update": a}), {"update": a})
    agg.add(TrainResult(1, "b", 10, {"update": b}), {"update": b})
    assert agg.count == 2
    assert torch.allclose(agg.result()["update"], torch.tensor([0.6, 0.8, 0.5]) / 4.0)


def _equal_clients(k: int = 4, n: int = 24) -> dict[str, ClientData]:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(k * n, 1, 4, 4, generator=g), torch.randint(0, 3, (k * n,), generator=g)
    return {f"c{i}": ClientData(ArrayDataset(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n])) for i in range(k)}


def _loop(strategy, policy: ClientPolicy | None = None) -> RoundLoop:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    vector = ModelVector(model)
    app = ClientApp(LocalTrainer(model, "cpu"), _equal_clients(), policy=policy)
    return RoundLoop(strategy, InProcessRuntime(app), vector.spec, vector.read(), seed=3)


def _run(strategy, rounds: int = 3) -> torch.Tensor:
    loop = _loop(strategy)
    loop.run(rounds)
    return loop.weights


LOCAL = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)


@pytest.mark.parametrize(("name", "values"),
                         [("fedavg", {}), ("fedadam", {"server_lr": 0.05}), ("fedprox", {"mu": 0.1})])
def test_zero_noise_and_a_large_clip_norm_equal_the_wrapped_algorithm(name: str, values: dict) -> None:
    """With equal client sizes (DP-FedAvg weighs clients uniformly) and q = 1, central DP is the inner algorithm
    exactly, whatever its server optimizer or client hooks."""
    plain = _run(build_strategy(name, LOCAL, **values))
    dp = _run(CentralDP(build_strategy(name, LOCAL, **values), clip_norm=1e6, noise_multiplier=0.0, delta=1e-5))
    assert torch.equal(dp, plain)
    if name == "fedavg":
        convenience = DPFedAvg(LOCAL, clip_norm=1e6, noise_multiplier=0.0, num_clients=4, sampling_rate=1.0,
                               delta=1e-5)
        assert torch.equal(_run(convenience), plain)


def test_poisson_sampling_flips_a_coin_per_client() -> None:
    ids = [f"c{i}" for i in range(200)]
    sampler = PoissonSampler(0.1)
    assert (sampler.kind, sampler.rate) == ("poisson", 0.1)
    sizes = [len(sampler.sample(ids, r, seed=5)) for r in range(1, 201)]
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # the count itself is random
    assert sampler.sample(ids, 3, seed=5) != sampler.sample(ids, 3, seed=5)  # secret coins, not the seed's
    assert sampler.population == 200 and sampler.expected() == pytest.approx(20)


def test_central_dp_samples_with_poisson_at_the_inner_rate_and_accounts_that_rate() -> None:
    strategy = CentralDP(FedAvg(sampler=Sampler(0.3)), clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    assert isinstance(strategy.sampler, PoissonSampler) and strategy.sampler.rate == 0.3
    assert strategy.inner.sampler is strategy.sampler  # one sampler: the one that samples is the one accounted
    assert (strategy.accountant.sampling_rate, strategy.accountant.sampling) == (0.3, "poisson")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


FAST = ["--quiet", "--model", "mcmahan-2nn", "--local-epochs", "1", "--clients", "20", "--partition", "iid"]


def test_run_reports_epsilon_every_round_from_the_accountant(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "1.1", "--clip-norm",
                 "0.5", "--rounds", "4", "--output", str(out)]) == 0
    rows = _rows(out)
    delta = 1e-5
    reference = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.5, delta=delta, kind="rdp")
    assert [r["epsilon"] for r in rows] == pytest.approx([reference.epsilon_after(k) for k in range(1, 5)], abs=1e-9)
    assert rows[0]["epsilon"] < rows[-1]["epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    assert (summary["delta"], summary["noise_multiplier"], summary["clip_norm"], summary["accountant"]) == (
        pytest.approx(delta), 1.1, 0.5, "rdp")
    # Nothing unnoised is published: no train loss, no realised cohort size or ids, no label histograms.
    withheld = {"train_loss", "clients_sampled", "clients_succeeded", "failed_clients", "bytes_up", "bytes_down",
                "seconds"}  # bytes and seconds count the cohort as surely as its size
    assert all(not withheld & set(r) for r in rows) and "test_accuracy" in rows[-1]
    assert set(summary["not_published"]) >= withheld and "epsilon_covers" in summary
    assert not {"bytes_up", "bytes_down", "round_seconds"} & set(summary)
    partition = json.loads((out / "partition.json").read_text())
    assert len(partition) == 20 and not any("label_counts" in p or "test_label_counts" in p for p in partition)


def test_target_epsilon_calibrates_the_noise(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--target-epsilon", "4", "--rounds", "5",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] <= 4.0 and summary["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert "noise_multiplier: 1.0\n" not in (out / "config.yaml").read_text()  # the calibrated z is recorded


def test_target_epsilon_can_stop_the_run_before_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "2.0",
                 "--target-epsilon", "3", "--target-mode", "stop", "--rounds", "50", "--output", str(out)]) == 0
    rows = _rows(out)
    assert 0 < len(rows) < 50
    assert rows[-1]["epsilon"] <= 3.0
    nxt = PrivacyAccountant(noise_multiplier=2.0, sampling_rate=0.5, delta=1e-5).epsilon_after(len(rows) + 1)
    assert nxt > 3.0  # one more round would have exceeded the budget


def test_a_budget_below_one_round_is_refused_instead_of_running_no_round(tmp_path: Path, capsys) -> None:
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "0.8",
                 "--target-epsilon", "3", "--target-mode", "stop", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "below one round's epsilon (5.24" in err and "raise --noise-multiplier" in err
    assert not (tmp_path / "run").exists()


def test_dp_refuses_a_strategy_that_breaks_the_guarantee(tmp_path: Path, capsys) -> None:
    assert main(["run", "--quiet", "--dp", "central", "--algorithm", "fedsgd", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--dp works with algorithms whose clients send model updates" in err and "fedsgd" in err


def test_adaptive_clipping_moves_the_norm_geometrically_towards_the_quantile() -> None:
    """C <- C exp(-eta (b - gamma)), b the privatized fraction of updates within C (Andrew et al. 2021)."""
    strategy = DPFedAvg(LocalConfig(), clip_norm=4.0, noise_multiplier=0.0, num_clients=10, sampling_rate=1.0,
                        delta=1e-5, adaptive_quantile=0.5, clip_learning_rate=0.2, clipped_count_stddev=1e-12,
                        noise_seed=0)
    state = ServerState(torch.zeros(2))
    assert strategy.configure_train(1, state, ["c0"], 0)[0].config["transforms"] == [{"name": "clip", "norm": 4.0}]
    agg = strategy.aggregator(1, state)
    for k, norm in enumerate([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]):  # 3 of 10 within C = 4
        update = torch.tensor([norm, 0.0])
        agg.add(TrainResult(1, f"c{k}", 1, {"update": update}, {"below_clip": float(norm <= 4.0)}), {"update": update})
    strategy.apply(state, agg.result(), agg.count)
    assert strategy.clip_norm == pytest.approx(4.0 * math.exp(-0.2 * (0.3 - 0.5)), rel=1e-9)
    # the next round's clients are asked to clip to the new norm
    task = strategy.configure_train(2, state, ["c0"], 0)[0]
    assert task.config["transforms"] == [{"name": "clip", "norm": strategy.clip_norm}]
    assert strategy.round_metrics()["clip_norm"] == 4.0  # the norm this round used


def test_adaptive_clipping_in_a_run_is_accounted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "0.05", "--clip-norm",
                 "20", "--adaptive-clip-quantile", "0.5", "--rounds", "10", "--output", str(out)]) == 0
    rows = _rows(out)
    norms = [r["clip_norm"] for r in rows]
    assert norms[0] == 20 and norms[-1] < norms[0] * 0.6  # far above every update norm, C comes down
    reference = PrivacyAccountant(noise_multiplier=0.05, sampling_rate=0.5, delta=1e-5,
                                  clipped_count_stddev=0.5 * 20 / 20)
    assert rows[-1]["epsilon"] == pytest.approx(reference.epsilon_after(10), rel=1e-9)


def test_local_dp_clients_noise_their_own_updates() -> None:
    """What leaves a client is clip(update) + N(0, (z C)^2): the server never sees the clean update."""
    strategy = LocalDP(FedAvg(local=LOCAL), clip_norm=0.5, noise_multiplier=2.0, delta=1e-5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    trainer = LocalTrainer(model, "cpu")
    weights = trainer.vector.read()
    data = {"c0": _equal_clients(k=1, n=64)["c0"]}
    task = strategy.configure_train(1, ServerState(weights), ["c0"], seed=1)[0]
    assert task.config["transforms"] == [{"name": "clip", "norm": 0.5}, {"name": "gaussian", "std": 1.0}]
    noisy = ClientApp(trainer, data, seeded_privacy=11)(task)
    clip_only = {**task.config, "transforms": [{"name": "clip", "norm": 0.5}]}
    clean = ClientApp(trainer, data)(TrainTask(1, "c0", task.arrays, clip_only))
    assert float(torch.linalg.vector_norm(clean.arrays["update"].double())) <= 0.5 + 1e-6
    noise = (noisy.arrays["update"] - clean.arrays["update"]).double()
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.15)  # 51 values: a loose statistical bound
    assert "below_clip" not in noisy.metrics
    # the simulation-only seeded switch makes the client's noise reproducible, and only it
    again = ClientApp(trainer, data, seeded_privacy=11)(task)
    other = ClientApp(trainer, data, seeded_privacy=12)(task)
    assert torch.equal(again.arrays["update"], noisy.arrays["update"])
    assert not torch.equal(other.arrays["update"], noisy.arrays["update"])
    # per client, every round, sensitivity 2C: noise multiplier z / 2 without sampling
    reference = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=1.0, delta=1e-5)
    strategy.aggregator(1, ServerState(weights))
    assert strategy.round_metrics()["epsilon"] == pytest.approx(reference.epsilon_after(1))


def test_a_dpsgd_client_runs_its_own_dp_sgd_and_keeps_its_train_loss() -> None:
    """The server's task asks for no DP-SGD, or for less noise: the client's own policy (from its own config)
    trains with DP-SGD anyway, or refuses; what it sends carries no unnoised train loss."""
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import client_policy

    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), "cpu")
    data = {"c0": _equal_clients(k=1, n=64)["c0"]}
    policy = client_policy(RunConfig(dp="dpsgd", clip_norm=0.5, noise_multiplier=1.5, clients=4))
    plain_task = FedAvg(local=LOCAL).configure_train(1, ServerState(trainer.vector.read()), ["c0"], seed=1)[0]
    assert "hooks" not in plain_task.config
    from fedlearn.protocol.codec import decode, encode

    app = ClientApp(trainer, data, policy=policy)
    wire = encode(app(plain_task))
    sent = decode(wire)
    # DP-SGD ran (its steps are in the client's own state); nothing that is a function of the client's 64
    # examples crosses: no count (it weighs 1), no train loss, no epsilon or step count
    assert int(app.state.get("c0")["dpsgd_steps"]) == round(64 / LOCAL.batch_size)
    assert sent.num_examples == 1 and sent.metrics == {}
    assert all(word not in wire for word in (b"train_loss", b"epsilon", b"dpsgd_steps"))
    plain = ClientApp(trainer, data)(plain_task)
    assert "train_loss" in plain.metrics and "epsilon" not in plain.metrics and plain.num_examples == 64
    # Local DP too: what crosses to the server (the encoded result) carries no train loss.

    local = client_policy(RunConfig(dp="local", clip_norm=0.5, noise_multiplier=1.0, clients=4))
    sent = decode(encode(ClientApp(trainer, data, policy=local)(plain_task)))
    assert sent.metrics.keys() <= {"below_clip"} and b"train_loss" not in encode(sent)
    weaker = TrainTask(1, "c0", plain_task.arrays, {**plain_task.config, "hooks": {"dpsgd": {
        "clip": 0.5, "noise_multiplier": 0.1, "delta": 1e-5, "accountant": "rdp"}}})
    with pytest.raises(TaskRefused, match="weaker"):
        ClientApp(trainer, data, policy=policy)(weaker)


def test_local_dp_noise_is_the_clients_own_policy() -> None:
    """A client whose policy requires local DP noises its update even when the server asks for nothing,
    and refuses a task asking for less noise than its policy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    trainer = LocalTrainer(model, "cpu")
    weights = trainer.vector.read()
    data = {"c0": _equal_clients(k=1, n=64)["c0"]}
    policy = ClientPolicy([Clip(Clip.Config(0.5)), GaussianNoise(GaussianNoise.Config(1.0))])
    plain_task = FedAvg(local=LOCAL).configure_train(1, ServerState(weights), ["c0"], seed=1)[0]
    assert "transforms" not in plain_task.config
    own = ClientApp(trainer, data, policy=policy, seeded_privacy=3)(plain_task)
    clipped = ClientApp(trainer, data, policy=ClientPolicy([Clip(Clip.Config(0.5))]))(plain_task)
    noise = (own.arrays["update"] - clipped.arrays["update"]).double()
    assert float(noise.std()) == pytest.approx(1.0, rel=0.15)
    weaker = TrainTask(1, "c0", plain_task.arrays, {**plain_task.config, "transforms": [{"name": "gaussian",
                                                                                        "std": 0.1}]})
    with pytest.raises(TaskRefused, match="weaker"):
        ClientApp(trainer, data, policy=policy)(weaker)


def test_local_dp_run_reports_a_per_client_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "local", "--target-epsilon", "20", "--rounds", "3", "--clip-norm", "1",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] == "local" and summary["epsilon"] == pytest.approx(20, rel=0.01)


def test_dpsgd_clips_each_example_and_adds_calibrated_noise() -> None:
    """With z = 0 the step uses the mean of per-example gradients clipped to C; with z > 0 noise is added."""
    from fedlearn.privacy.dpsgd import private_gradients

    loss = nn.functional.cross_entropy
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(6, 1, 4, 4) * 10, torch.tensor([0, 1, 2, 0, 1, 2])
    private_gradients(model, x, y, clip_norm=0.1, noise_multiplier=0.0, expected_batch=6,
                      generator=noise_generator(0), loss=loss)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = torch.zeros_like(got)
    for i in range(6):  # the same by hand: one example at a time, clipped, averaged
        model.zero_grad()
        loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        expected += g * min(1.0, 0.1 / float(g.norm())) / 6
    assert torch.allclose(got, expected, atol=1e-6)
    private_gradients(model, x[:0], y[:0], clip_norm=0.1, noise_multiplier=2.0, expected_batch=6,
                      generator=noise_generator(1), loss=loss)  # an empty Poisson batch still releases noise
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(noise.std()) == pytest.approx(2.0 * 0.1 / 6, rel=0.35)  # 51 values


def test_dpsgd_run_accounts_each_clients_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "dpsgd", "--clip-norm", "1", "--noise-multiplier", "1.0", "--rounds", "2",
                 "--batch-size", "16", "--clients", "4", "--output", str(out)]) == 0
    rows = _rows(out)
    partition = json.loads((out / "partition.json").read_text())
    delta = min(1e-5, 1 / 1437 ** 1.1)  # DP-SGD protects examples: the 1,437 digits of the training split
    worst = max(PrivacyAccountant(noise_multiplier=1.0, sampling_rate=16 / p["num_train"], delta=delta)
                .epsilon_after(2 * round(p["num_train"] / 16)) for p in partition)
    assert rows[-1]["epsilon"] == pytest.approx(worst, rel=1e-9)
    assert rows[-1]["test_accuracy"] > 0.3  # noisy, but it learns


# ----- the accountant reads the sampler that sampled, and the mechanism that ran ---------------------------------


def _fed_clients(k: int, n: int, batch_size: int = 8) -> list[FedClient]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(11)
    return [FedClient(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)),
                      TensorDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)),
                      client_id=f"c{i}", batch_size=batch_size) for i in range(k)]


def test_fed_server_refuses_a_fraction_that_disagrees_with_the_dp_sampler() -> None:
    def dp() -> CentralDP:
        return DPFedAvg(LOCAL, clip_norm=1.0, noise_multiplier=1.1, sampling_rate=0.1, num_clients=10, delta=1e-5,
                        noise_seed=0)

    with pytest.raises(ConfigError, match="fraction"):
        FedServer(_fed_clients(10, 8), strategy=dp(), fraction=1.0)

    strategy = dp()
    server = FedServer(_fed_clients(10, 8), strategy=strategy, seed=4)
    rows = [server.train(num_epochs=1, lr=0.1) for _ in range(5)]
    # the loop samples with the strategy's own sampler, and the accountant reads that sampler's rate
    assert server.loop.strategy.sampler is strategy.sampler and strategy.inner.sampler is strategy.sampler
    assert strategy.accountant.sampling_rate == strategy.sampler.rate == 0.1
    assert strategy.accountant.sampling == strategy.sampler.kind == "poisson"
    assert all(0 <= r["clients_sampled"] <= 10 for r in rows)
    fresh = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=strategy.sampler.rate, delta=1e-5)
    assert [r["epsilon"] for r in rows] == [fresh.epsilon_after(k) for k in range(1, 6)]
    assert rows[-1]["epsilon"] == PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.1,
                                                    delta=1e-5).epsilon_after(5)


def test_dpsgd_epsilon_uses_the_batch_the_client_trained_with() -> None:
    """A FedClient's own batch size (64 of 256 examples) sets the Poisson rate its DP-SGD ran at, not the
    strategy's local batch (32): the hook reports its own accountant (bug B5 accounted at 32 / 256)."""
    strategy = DPSGD(FedAvg(local=LocalConfig(batch_size=32)), clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    server = FedServer(_fed_clients(2, 256, batch_size=64), strategy=strategy)
    rows = [server.train(num_epochs=1, lr=0.1) for _ in range(3)]
    steps = 3 * 4  # round(256 / 64) Poisson batches per epoch, one epoch a round, three rounds
    assert all(int(server.app.state.get(cid)["dpsgd_steps"]) == steps for cid in ("c0", "c1"))
    ran = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=64 / 256, delta=1e-5)
    assert rows[-1]["epsilon"] == pytest.approx(ran.epsilon_after(steps), rel=1e-12)
    assert [r["epsilon"] for r in rows] == pytest.approx([ran.epsilon_after(4 * k) for k in (1, 2, 3)], rel=1e-12)
    wrong = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=32 / 256, delta=1e-5)
    assert all(rows[-1]["epsilon"] != pytest.approx(wrong.epsilon_after(s), rel=1e-3) for s in (12, 24))


@pytest.mark.parametrize(("algorithm", "values"), [("fedadam", {"server_lr": 0.05}), ("fedprox", {"mu": 0.1})])
def test_dp_central_composes_with_other_algorithms(tmp_path: Path, algorithm: str, values: dict) -> None:
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import strategy_for
    from fedlearn.run.runner import run

    config = RunConfig(model="mcmahan-2nn", clients=20, partition="iid", local_epochs=1, rounds=2, dp="central",
                       algorithm=algorithm, fraction=0.5, noise_multiplier=1.1, clip_norm=0.5, seeded_privacy=True,
                       output=str(tmp_path / "run")).updated(values)
    strategy = strategy_for(config)
    assert isinstance(strategy, CentralDP) and strategy.name == algorithm
    if algorithm == "fedadam":
        assert isinstance(strategy.inner, FedAdamStrategy)
        assert strategy.optimizer.registered_name == "adam" and strategy.optimizer.config.lr == 0.05
    else:
        assert isinstance(strategy.inner, FedProx) and strategy.hooks() == {"prox": {"mu": 0.1}}
    summary = run(config)
    reference = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.5, delta=1e-5)
    rows = _rows(tmp_path / "run")
    assert [r["epsilon"] for r in rows] == pytest.approx([reference.epsilon_after(1), reference.epsilon_after(2)],
                                                         rel=1e-12)
    assert summary["epsilon"] == pytest.approx(reference.epsilon_after(2), rel=1e-12)
    assert summary["dp"] == "central" and summary["algorithm"] == algorithm
    # the Python composition directly, on the same reference
    local = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)
    direct = CentralDP(build_strategy(algorithm, local, sampler=Sampler(0.5), **values), clip_norm=0.5,
                       noise_multiplier=1.1,
                       delta=1e-5, noise_seed=0)
    loop = _loop(direct)
    history = loop.run(2)
    assert [r["epsilon"] for r in history] == pytest.approx([reference.epsilon_after(1), reference.epsilon_after(2)],
                                                            rel=1e-12)


def test_a_dp_round_where_every_client_fails_still_releases_noise() -> None:
    """aggregates_empty_rounds: the weights move by N(0, (z C)^2) / (q K) alone, so no answer count leaks."""
    refusing = ClientPolicy([Clip(Clip.Config(0.01))])  # the server's clip request (1.0) is weaker: refused

    def dp(seed: int) -> CentralDP:
        return CentralDP(FedAvg(local=LOCAL), clip_norm=1.0, noise_multiplier=0.8, delta=1e-5, noise_seed=seed)

    strategy = dp(5)
    assert strategy.aggregates_empty_rounds
    loop = _loop(strategy, refusing)
    start = loop.weights.clone()
    row = loop.run_round()
    assert row["clients_sampled"] == 4 and row["clients_succeeded"] == 0 and not row["aggregated"]
    assert sorted(row["failed_clients"]) == ["c0", "c1", "c2", "c3"]
    noise = gaussian_noise(start.numel(), 0.8 * 1.0, noise_generator(5))
    expected = (start.double() + (noise / (1.0 * 4)).to(torch.float32).double()).to(torch.float32)
    assert torch.equal(loop.weights, expected)
    assert (loop.weights - start).abs().max() > 1e-3
    assert row["epsilon"] == PrivacyAccountant(noise_multiplier=0.8, sampling_rate=1.0, delta=1e-5).epsilon_after(1)
    # the seeded noise is reproducible, and a different seed moves the weights differently
    again, other = _loop(dp(5), refusing), _loop(dp(6), refusing)
    again.run_round()
    other.run_round()
    assert torch.equal(again.weights, loop.weights) and not torch.equal(other.weights, loop.weights)
    # without DP, a round nobody answered leaves the weights alone
    plain = _loop(FedAvg(local=LOCAL), refusing)
    plain_start = plain.weights.clone()
    plain.strategy.transforms.append(Clip(Clip.Config(1.0)))
    assert not plain.run_round()["aggregated"]
    assert torch.equal(plain.weights, plain_start)


def test_adaptive_clipping_can_raise_the_norm_without_clients_refusing(tmp_path: Path, caplog) -> None:
    # Clients under central DP trust the server's clip: a client-side floor once refused every raised norm.
    out = tmp_path / "run"
    with caplog.at_level("WARNING"):
        assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "1.0",
                     "--clip-norm", "0.01", "--adaptive-clip-quantile", "0.9", "--rounds", "3",
                     "--output", str(out)]) == 0
    norms = [r["clip_norm"] for r in _rows(out)]
    assert norms[0] == 0.01 and norms[-1] > norms[0]  # far below every update norm, C goes up
    assert "weaker than this client's policy" not in caplog.text


def test_a_dpsgd_simulation_publishes_the_epsilon_of_its_clients_counts(tmp_path: Path) -> None:
    """The clients send no count and no epsilon; the simulation's server computes each client's epsilon from its
    partition (rate B / n, a round's steps per task given) and publishes the largest."""
    from fedlearn.privacy.dpsgd import steps_per_round
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import build_experiment

    config = RunConfig(model="mcmahan-2nn", clients=4, partition="dirichlet", alpha=0.5, rounds=2, fraction=0.5,
                       dp="dpsgd", noise_multiplier=1.2, clip_norm=1.0, batch_size=16, seeded_privacy=True)
    experiment = build_experiment(config)
    rows = experiment.loop.run(2)
    strategy = experiment.loop.strategy
    given = strategy.tasks
    assert sum(given.values()) == sum(r["clients_sampled"] for r in rows)
    epochs = strategy.local.local_epochs

    def epsilon(client: str, tasks: int) -> float:
        n = len(experiment.clients[client].train)
        return PrivacyAccountant(noise_multiplier=1.2, sampling_rate=min(1.0, 16 / n),
                                 delta=strategy.delta).epsilon_after(tasks * steps_per_round(n, 16, epochs))

    expected = max(epsilon(c, k) for c, k in given.items())
    assert rows[-1]["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert rows[0]["epsilon"] <= rows[-1]["epsilon"]


def test_dpsgd_target_epsilon_calibrates_each_clients_noise_to_its_own_data_size() -> None:
    from fedlearn.privacy.dpsgd import DPSGDHook, calibrated_noise, steps_per_round
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import build_experiment, client_policy

    config = RunConfig(model="mcmahan-2nn", clients=3, partition="dirichlet", alpha=0.5, rounds=2, fraction=1.0,
                       dp="dpsgd", target_epsilon=3.0, clip_norm=1.0, batch_size=16, local_epochs=1,
                       seeded_privacy=True)
    experiment = build_experiment(config)
    sizes = {cid: len(c.train) for cid, c in experiment.clients.items()}
    assert len(set(sizes.values())) == 3  # three data sizes: three noise levels
    hook = client_policy(config).hooks["dpsgd"]
    noise = {cid: hook.noise_for(n, 16, 1) for cid, n in sizes.items()}
    assert len(set(noise.values())) == 3
    for cid, n in sizes.items():  # each within the target over every round, and not far below it
        spent = PrivacyAccountant(noise_multiplier=noise[cid], sampling_rate=16 / n,
                                  delta=experiment.loop.strategy.delta).epsilon_after(2 * steps_per_round(n, 16, 1))
        assert 2.85 < spent <= 3.0, (cid, n, noise[cid], spent)
    rows = experiment.loop.run(2)
    assert 2.85 < rows[-1]["epsilon"] <= 3.0  # the server's figure, from the clients' own calibration
    assert noise == {cid: calibrated_noise(3.0, n, 16, 1, 2, experiment.loop.strategy.delta, "rdp")
                     for cid, n in sizes.items()}
    # a task asking for a looser budget (or a fixed noise instead of this client's budget) is weaker: refused
    looser = DPSGDHook(DPSGDHook.Config(target_epsilon=6.0, rounds=2, delta=hook.config.delta))
    fixed = DPSGDHook(DPSGDHook.Config(noise_multiplier=5.0, delta=hook.config.delta))
    assert looser.weaker_than(hook) and fixed.weaker_than(hook) and not hook.weaker_than(hook)
