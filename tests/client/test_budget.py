"""A client's own epsilon budget: it counts its releases, refuses the round past its budget, and never forgets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.budget import BudgetSpent
from fedlearn.client.data import ClientData
from fedlearn.client.state import ClientStateStore
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.privacy import PrivacyAccountant
from fedlearn.protocol.local import LocalConfig
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import client_policy
from fedlearn.strategies import FedAvg
from fedlearn.strategies.base import ServerState

LOCAL = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)


def _app(config: RunConfig, state: ClientStateStore | None = None) -> tuple[ClientApp, torch.Tensor]:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), "cpu")
    g = torch.Generator().manual_seed(1)
    data = {"c0": ClientData(ArrayDataset(torch.randn(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,),
                                                                                              generator=g)))}
    return ClientApp(trainer, data, policy=client_policy(config), state=state), trainer.vector.read()


def _task(weights: torch.Tensor, rnd: int):
    return FedAvg(local=LOCAL).configure_train(rnd, ServerState(weights), ["c0"], seed=1)[0]


def test_a_local_dp_client_stops_itself_at_its_own_budget() -> None:
    # z = 4: each round is a Gaussian release at z / 2 = 2, epsilon 2.17, 3.19, 4.01, 4.73 after 1-4 rounds
    config = RunConfig(dp="local", noise_multiplier=4.0, clip_norm=1.0, delta=1e-5, client_budget=4.5, clients=4)
    app, weights = _app(config)
    for rnd in (1, 2, 3):
        assert "update" in app(_task(weights, rnd)).arrays
    with pytest.raises(BudgetSpent, match=r"round 4 would take its epsilon to 4\.73, past its own budget 4\.5"):
        app(_task(weights, 4))
    assert PrivacyAccountant(noise_multiplier=2.0, sampling_rate=1.0, delta=1e-5).epsilon_after(3) <= 4.5
    # The server going back to an older checkpoint does not give the budget back: round 2 again is refused too.
    with pytest.raises(BudgetSpent, match="would take its epsilon to 4.73"):
        app(_task(weights, 2))


def test_a_dpsgd_client_counts_its_steps_against_its_budget(tmp_path) -> None:
    config = RunConfig(dp="dpsgd", noise_multiplier=2.0, clip_norm=1.0, delta=1e-5, client_budget=2.5, clients=4)
    store = ClientStateStore(tmp_path)
    app, weights = _app(config, store)
    steps = 4  # 32 examples, batch 8, one epoch
    per_round = [PrivacyAccountant(noise_multiplier=2.0, sampling_rate=0.25, delta=1e-5).epsilon_after(steps * k)
                 for k in (1, 2, 3, 4)]
    allowed = sum(e <= 2.5 for e in per_round)  # 1.58, 2.08, 2.47, 2.81: three rounds
    assert 1 <= allowed < 4
    for rnd in range(1, allowed + 1):
        sent = app(_task(weights, rnd))
        assert "epsilon" not in sent.metrics and sent.num_examples == 1  # the client's epsilon stays with it
        assert int(app.state.get("c0")["dpsgd_steps"]) == steps * rnd  # what its budget counts
    store.commit()
    restarted, _ = _app(config, ClientStateStore.open_latest(tmp_path))  # a restarted client reads its count
    with pytest.raises(BudgetSpent, match=f"round {allowed + 1} would take"):
        restarted(_task(weights, allowed + 1))


def test_a_client_budget_needs_a_client_side_dp_mode() -> None:
    with pytest.raises(ConfigError, match="--client-budget is a client's own epsilon budget under --dp local"):
        RunConfig(dp="central", client_budget=3.0).validate()


def test_a_dpsgd_client_with_a_target_counts_its_budget_at_its_calibrated_noise(tmp_path) -> None:
    """With --target-epsilon the hook trains at a noise calibrated from the client's 32 examples; its budget must
    count at that noise, not at the configured fallback (1.0)."""
    from fedlearn.privacy.dpsgd import calibrated_noise

    config = RunConfig(dp="dpsgd", target_epsilon=3.0, rounds=6, clip_norm=1.0, delta=1e-5, client_budget=1.5,
                       clients=4)
    app, weights = _app(config, ClientStateStore(tmp_path))
    z = calibrated_noise(3.0, 32, 8, 1, 6, 1e-5, "rdp")
    assert z != config.noise_multiplier
    per_round = [PrivacyAccountant(noise_multiplier=z, sampling_rate=0.25, delta=1e-5).epsilon_after(4 * k)
                 for k in range(1, 7)]
    allowed = sum(e <= 1.5 for e in per_round)
    assert 1 <= allowed < 6
    for rnd in range(1, allowed + 1):
        app(_task(weights, rnd))
    with pytest.raises(BudgetSpent, match=f"round {allowed + 1} would take its epsilon to {per_round[allowed]:.3g}"):
        app(_task(weights, allowed + 1))
