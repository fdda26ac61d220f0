"""DP-FedAvg: clipping bounds, calibrated noise, exact reduction to FedAvg, accounting in the run's metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fedlearn.cli import main
from fedlearn.client.config import LocalConfig
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.privacy.accountant import PrivacyAccountant
from fedlearn.privacy.dp import clip_by_norm, noise_generator
from fedlearn.protocol.messages import TrainResult
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.sampling import poisson_sample
from fedlearn.strategies import FedAvg
from fedlearn.strategies.dp_fedavg import DPFedAvg, NoisySum


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


def test_noise_has_the_configured_standard_deviation() -> None:
    """sum + N(0, (z C)^2), divided by the expected count: a statistical check with a fixed seed."""
    z, clip, expected = 1.3, 0.7, 4.0
    weights = torch.zeros(200_000)
    agg = NoisySum(weights, clip, z * clip, expected, noise_generator(1234))
    out = agg.finish().double()
    assert abs(float(out.mean())) < 5 * (z * clip / expected) / math.sqrt(out.numel())
    assert float(out.std()) == pytest.approx(z * clip / expected, rel=0.01)


def test_server_clips_again_and_divides_by_the_expected_count() -> None:
    weights = torch.zeros(3)
    agg = NoisySum(weights, 1.0, 0.0, expected_clients=4.0, generator=noise_generator(0))
    agg.add(TrainResult(1, "a", 10, torch.tensor([3.0, 4.0, 0.0])), torch.tensor([3.0, 4.0, 0.0]))  # norm 5
    agg.add(TrainResult(1, "b", 10, torch.tensor([0.0, 0.0, 0.5])), torch.tensor([0.0, 0.0, 0.5]))
    assert torch.allclose(agg.finish(), torch.tensor([0.6, 0.8, 0.5]) / 4.0)


def _equal_clients(k: int = 4, n: int = 24) -> dict[str, ClientData]:
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(k * n, 1, 4, 4, generator=g), torch.randint(0, 3, (k * n,), generator=g)
    return {f"c{i}": ClientData(ArrayDataset(x[i * n:(i + 1) * n], y[i * n:(i + 1) * n])) for i in range(k)}


def _run(strategy, sampling: str, rounds: int = 3) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    vector = ModelVector(model)
    loop = RoundLoop(strategy, InProcessRuntime(LocalTrainer(model, "cpu"), _equal_clients()), vector.spec,
                     vector.read(), sampling=sampling, fraction=1.0, seed=3)
    loop.run(rounds)
    return loop.weights


def test_zero_noise_and_a_large_clip_norm_equal_fedavg() -> None:
    """With equal client sizes (DP-FedAvg weighs clients uniformly) and q = 1, it is FedAvg exactly."""
    local = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)
    fedavg = _run(FedAvg(local), "uniform")
    dp = _run(DPFedAvg(local, clip_norm=1e6, noise_multiplier=0.0, num_clients=4, sampling_rate=1.0, delta=1e-5),
              "poisson")
    assert torch.equal(dp, fedavg)


def test_poisson_sampling_flips_a_coin_per_client() -> None:
    ids = [f"c{i}" for i in range(200)]
    sizes = [len(poisson_sample(ids, 0.1, seed=5, round=r)) for r in range(1, 201)]
    assert sum(sizes) / len(sizes) == pytest.approx(20, rel=0.05)
    assert len(set(sizes)) > 5  # the count itself is random
    assert poisson_sample(ids, 0.1, seed=5, round=3) == poisson_sample(ids, 0.1, seed=5, round=3)


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


FAST = ["--quiet", "--model", "mcmahan-2nn", "--local-epochs", "1", "--clients", "20", "--partition", "iid"]


def test_run_reports_epsilon_every_round_from_the_accountant(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "1.1", "--clip-norm",
                 "0.5", "--rounds", "4", "--output", str(out)]) == 0
    rows = _rows(out)
    delta = 1 / 20 ** 1.1
    reference = PrivacyAccountant(noise_multiplier=1.1, sampling_rate=0.5, delta=delta, kind="rdp")
    assert [r["epsilon"] for r in rows] == pytest.approx([reference.epsilon_after(k) for k in range(1, 5)], abs=1e-9)
    assert rows[0]["epsilon"] < rows[-1]["epsilon"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] == pytest.approx(rows[-1]["epsilon"])
    assert (summary["delta"], summary["noise_multiplier"], summary["clip_norm"], summary["accountant"]) == (
        pytest.approx(delta), 1.1, 0.5, "rdp")


def test_target_epsilon_calibrates_the_noise(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--target-epsilon", "4", "--rounds", "5",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epsilon"] <= 4.0 and summary["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert "noise_multiplier: 1.0\n" not in (out / "config.yaml").read_text()  # the calibrated z is recorded


def test_target_epsilon_can_stop_the_run_before_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "0.8",
                 "--target-epsilon", "3", "--target-mode", "stop", "--rounds", "50", "--output", str(out)]) == 0
    rows = _rows(out)
    assert 0 < len(rows) < 50
    assert rows[-1]["epsilon"] <= 3.0
    nxt = PrivacyAccountant(noise_multiplier=0.8, sampling_rate=0.5, delta=1 / 20 ** 1.1).epsilon_after(len(rows) + 1)
    assert nxt > 3.0  # one more round would have exceeded the budget


def test_dp_refuses_a_strategy_that_breaks_the_guarantee(tmp_path: Path, capsys) -> None:
    assert main(["run", "--quiet", "--dp", "central", "--algorithm", "fedsgd", "--output", str(tmp_path / "r")]) == 2
    assert "--dp central works with fedavg or fedprox" in capsys.readouterr().err


def test_adaptive_clipping_moves_the_norm_geometrically_towards_the_quantile() -> None:
    """C <- C exp(-eta (b - gamma)), b the privatized fraction of updates within C (Andrew et al. 2021)."""
    strategy = DPFedAvg(LocalConfig(), clip_norm=4.0, noise_multiplier=0.0, num_clients=10, sampling_rate=1.0,
                        delta=1e-5, adaptive_quantile=0.5, clip_learning_rate=0.2, clipped_count_stddev=1e-12,
                        noise_seed=0)
    agg = strategy.begin_aggregation(1, torch.zeros(2))
    for k, norm in enumerate([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]):  # 3 of 10 within C = 4
        update = torch.tensor([norm, 0.0])
        agg.add(TrainResult(1, f"c{k}", 1, update, {"below_clip": float(norm <= 4.0)}), update)
    agg.finish()
    assert strategy.clip_norm == pytest.approx(4.0 * math.exp(-0.2 * (0.3 - 0.5)), rel=1e-9)
    assert strategy.local.clip_norm == strategy.clip_norm  # the next round's clients clip to the new norm
    assert strategy.round_metrics()["clip_norm"] == 4.0  # the norm this round used


def test_adaptive_clipping_in_a_run_is_accounted(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "central", "--fraction", "0.5", "--noise-multiplier", "0.05", "--clip-norm",
                 "20", "--adaptive-clip-quantile", "0.5", "--rounds", "10", "--output", str(out)]) == 0
    rows = _rows(out)
    norms = [r["clip_norm"] for r in rows]
    assert norms[0] == 20 and norms[-1] < norms[0] * 0.6  # far above every update norm, C comes down
    reference = PrivacyAccountant(noise_multiplier=0.05, sampling_rate=0.5, delta=1 / 20 ** 1.1,
                                  clipped_count_stddev=0.5 * 20 / 20)
    assert rows[-1]["epsilon"] == pytest.approx(reference.epsilon_after(10), rel=1e-9)


def test_local_dp_clients_noise_their_own_updates(tmp_path: Path) -> None:
    """What leaves a client is clip(update) + N(0, (z C)^2): the server never sees the clean update."""
    from fedlearn.protocol.messages import TrainTask
    from fedlearn.strategies.dp_fedavg import LocalDPFedAvg

    strategy = LocalDPFedAvg(LocalConfig(local_epochs=1, batch_size=8, lr=0.1), clip_norm=0.5, noise_multiplier=2.0,
                             delta=1e-5, noise_seed=11)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    trainer = LocalTrainer(model, "cpu")
    weights = trainer.vector.read()
    data = _equal_clients(k=1, n=64)["c0"]
    task = strategy.configure_train(1, weights, ["c0"], seed=1)[0]
    noisy = trainer.fit(task, data)
    clean = trainer.fit(TrainTask(1, "c0", weights, {**task.config, "local_noise_std": 0.0}), data)
    assert float(torch.linalg.vector_norm(clean.payload.double())) <= 0.5 + 1e-6
    noise = (noisy.payload - clean.payload).double()
    assert float(noise.std()) == pytest.approx(2.0 * 0.5, rel=0.15)  # 51 values: a loose statistical bound
    assert "below_clip" not in noisy.metrics
    # per client, every round, sensitivity 2C: noise multiplier z / 2 without sampling
    reference = PrivacyAccountant(noise_multiplier=1.0, sampling_rate=1.0, delta=1e-5)
    strategy.begin_aggregation(1, weights)
    assert strategy.round_metrics()["epsilon"] == pytest.approx(reference.epsilon_after(1))


def test_local_dp_run_reports_a_per_client_epsilon(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "local", "--target-epsilon", "20", "--rounds", "3", "--clip-norm", "1",
                 "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dp"] == "local" and summary["epsilon"] == pytest.approx(20, rel=0.01)


def test_dpsgd_clips_each_example_and_adds_calibrated_noise() -> None:
    """With z = 0 the step uses the mean of per-example gradients clipped to C; with z > 0 noise is added."""
    from fedlearn.client.dpsgd import private_gradients

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x, y = torch.randn(6, 1, 4, 4) * 10, torch.tensor([0, 1, 2, 0, 1, 2])
    private_gradients(model, x, y, clip_norm=0.1, noise_multiplier=0.0, expected_batch=6,
                      generator=noise_generator(0))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = torch.zeros_like(got)
    for i in range(6):  # the same by hand: one example at a time, clipped, averaged
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        expected += g * min(1.0, 0.1 / float(g.norm())) / 6
    assert torch.allclose(got, expected, atol=1e-6)
    private_gradients(model, x[:0], y[:0], clip_norm=0.1, noise_multiplier=2.0, expected_batch=6,
                      generator=noise_generator(1))  # an empty Poisson batch still releases noise
    noise = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert float(noise.std()) == pytest.approx(2.0 * 0.1 / 6, rel=0.35)  # 51 values


def test_dpsgd_run_accounts_each_clients_steps(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["run", *FAST, "--dp", "dpsgd", "--clip-norm", "1", "--noise-multiplier", "1.0", "--rounds", "2",
                 "--batch-size", "16", "--clients", "4", "--output", str(out)]) == 0
    rows = _rows(out)
    partition = json.loads((out / "partition.json").read_text())
    worst = max(PrivacyAccountant(noise_multiplier=1.0, sampling_rate=16 / p["num_train"], delta=1 / 4 ** 1.1)
                .epsilon_after(2 * round(p["num_train"] / 16)) for p in partition)
    assert rows[-1]["epsilon"] == pytest.approx(worst, rel=1e-9)
    assert rows[-1]["test_accuracy"] > 0.3  # noisy, but it learns
