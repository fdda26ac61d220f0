"""Secure aggregation inside the round loop: same model as plain FedAvg, dropouts, aborts, refusals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fedlearn.client.config import LocalConfig
from fedlearn.client.data import ClientData
from fedlearn.client.secure import SecureClients
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.privacy.secagg.client import SecAggProtocolError
from fedlearn.protocol.messages import SecureTask, TrainTask
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.secure import HomomorphicRound, SecAggSettings, SecureAggregationRound
from fedlearn.strategies import FedAvg, FedSGD
from fedlearn.strategies.dp_fedavg import DPFedAvg
from fedlearn.strategies.dpsgd import DPSGDFedAvg

torch.set_num_threads(1)
LOCAL = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)
NAMES = [f"c{i}" for i in range(8)]


def data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class Flaky(InProcessRuntime):
    """The in-process clients, with some of them going silent from a given protocol step on."""

    def __init__(self, trainer, clients, drop: dict[str, str]) -> None:
        super().__init__(trainer, clients)
        self.drop = drop  # client -> first step it misses: secagg-share, train or secagg-unmask

    def _gone(self, client_id: str, step: str) -> bool:
        order = ["secagg-advertise", "secagg-share", "train", "secagg-unmask"]
        first = self.drop.get(client_id)
        return first is not None and order.index(step) >= order.index(first)

    def train(self, tasks: Sequence[TrainTask]) -> Iterator:
        for task in tasks:
            if self._gone(task.client_id, "train"):
                yield ClientFailure(task.client_id, "vanished")
            else:
                yield from super().train([task])

    def exchange(self, tasks: Sequence[SecureTask]) -> Iterator:
        for task in tasks:
            if self._gone(task.client_id, task.stage):
                yield ClientFailure(task.client_id, "vanished")
            else:
                yield from super().exchange([task])


def loop(strategy, settings: SecAggSettings | None, drop: dict[str, str] | None = None,
         names: Sequence[str] = NAMES) -> RoundLoop:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    clients = {n: ClientData(data(10 + 3 * i, i)) for i, n in enumerate(names)}
    runtime = Flaky(trainer, clients, drop or {})
    spec = trainer.vector.spec
    secure = SecureAggregationRound(settings, spec.numel) if settings else None
    return RoundLoop(strategy, runtime, spec, trainer.vector.read(), secure=secure)


SETTINGS = SecAggSettings("secagg", threshold=0.6, bits=32, clip=1.0, max_weight=40)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_secure_fedavg_equals_plain_fedavg_within_quantization(mode):
    plain = loop(FedAvg(LOCAL), None)
    secure = loop(FedAvg(LOCAL), SecAggSettings(mode, 0.6, 32, 1.0, 4 if mode == "secagg+" else None, 40))
    for _ in range(3):
        plain.run_round()
        row = secure.run_round()
        assert row["aggregated"] and row["clients_succeeded"] == len(NAMES) and row["secure_aggregation"] == mode
        # Each round starts from nearly the same weights; quantization error is ~1e-8 per coordinate.
        assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_fedsgd_also_aggregates_securely():
    plain, secure = loop(FedSGD(LOCAL), None), loop(FedSGD(LOCAL), SETTINGS)
    plain.run_round()
    secure.run_round()
    assert torch.allclose(secure.weights, plain.weights, atol=1e-6)


def test_dropouts_after_masking_give_the_survivors_average():
    gone = {"c1": "secagg-unmask", "c4": "secagg-unmask", "c6": "train"}
    survivors = [n for n in NAMES if n not in ("c6",)]  # c1, c4 sent masked input before vanishing
    secure = loop(FedAvg(LOCAL), SETTINGS, drop=gone)
    row = secure.run_round()
    plain = loop(FedAvg(LOCAL), None, names=NAMES)
    plain.runtime.clients = {n: plain.runtime.clients[n] for n in survivors}  # same data, same seeds
    plain_row = plain.run_round()
    assert row["clients_succeeded"] == len(survivors) == plain_row["clients_succeeded"]
    assert row["failed_clients"] == ["c6"]
    assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_too_many_dropouts_abort_and_leave_the_model_unchanged():
    secure = loop(FedAvg(LOCAL), SETTINGS, drop={n: "train" for n in NAMES[:4]})  # 4 of 8 < ceil(0.6 * 8)
    before = secure.weights.clone()
    row = secure.run_round()
    assert not row["aggregated"] and "aborted" in row["secure_aggregation_aborted"]
    assert row["clients_succeeded"] == 0 and sorted(row["failed_clients"]) == NAMES
    assert torch.equal(secure.weights, before)


def test_central_dp_on_the_secure_sum_matches_plain_dp_fedavg_without_noise():
    def dp():
        return DPFedAvg(LOCAL, clip_norm=0.5, noise_multiplier=0.0, num_clients=8, sampling_rate=1.0, delta=1e-5,
                        adaptive_quantile=0.5, noise_seed=0)
    plain, secure = loop(dp(), None), loop(dp(), SecAggSettings("secagg", 0.6, 32, 0.5, None, 40))
    for _ in range(2):
        plain.run_round()
        secure.run_round()
    assert torch.allclose(secure.weights, plain.weights, atol=1e-5)
    # The adaptive clip norm moved identically: the "within the clip norm" bits were summed securely.
    assert secure.strategy.clip_norm == pytest.approx(plain.strategy.clip_norm, rel=1e-9)


def test_strategies_that_need_individual_updates_are_refused():
    strategy = DPSGDFedAvg(LOCAL, clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="cannot run with secure aggregation"):
        SETTINGS.check(strategy)
    with pytest.raises(ConfigError, match="secure-aggregation must be one of"):
        SecAggSettings("bogus").check(FedAvg(LOCAL))


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    from fedlearn.privacy.he import generate_keys

    folder = tmp_path_factory.mktemp("he")
    generate_keys(folder)
    return folder


def he_loop(strategy, keys, key_holder=None, drop=None) -> RoundLoop:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    clients = {n: ClientData(data(10 + 3 * i, i)) for i, n in enumerate(NAMES)}
    runtime = Flaky(trainer, clients, drop or {})
    runtime.secure = SecureClients(keys)
    spec = trainer.vector.spec
    return RoundLoop(strategy, runtime, spec, trainer.vector.read(),
                     secure=HomomorphicRound(str(keys / "public.ctx"), spec.numel, key_holder))


def test_ckks_fedavg_equals_plain_fedavg_within_ckks_error(he_keys):
    plain, secure = loop(FedAvg(LOCAL), None), he_loop(FedAvg(LOCAL), he_keys)
    for _ in range(2):
        plain.run_round()
        row = secure.run_round()
        assert row["aggregated"] and row["secure_aggregation"] == "ckks" and row["clients_succeeded"] == 8
        assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_ckks_server_holds_no_secret_key(he_keys):
    from fedlearn.privacy.he import context_holds_secret_key

    secure = he_loop(FedAvg(LOCAL), he_keys).secure
    assert not secure.context.is_private()
    assert not context_holds_secret_key(secure.context.serialize(save_secret_key=True))  # nothing to save
    with pytest.raises(ConfigError, match="secret key"):
        HomomorphicRound(str(he_keys / "secret.ctx"), 10)


def test_ckks_round_without_a_key_holder_keeps_the_weights(he_keys, tmp_path):
    public_only = tmp_path / "keys"
    public_only.mkdir()
    (public_only / "public.ctx").write_bytes((he_keys / "public.ctx").read_bytes())
    secure = he_loop(FedAvg(LOCAL), he_keys)
    secure.runtime.secure = SecureClients(public_only)  # clients can encrypt, nobody can decrypt
    before = secure.weights.clone()
    with pytest.raises(SecAggProtocolError, match="secret.ctx"):
        secure.run_round()  # in a simulation a client-side refusal is a bug to see; over gRPC it is a silence
    assert torch.equal(secure.weights, before)


def test_ckks_dropouts_average_the_answering_clients(he_keys):
    secure = he_loop(FedAvg(LOCAL), he_keys, drop={"c2": "train", "c5": "train"})
    row = secure.run_round()
    plain = loop(FedAvg(LOCAL), None)
    plain.runtime.clients = {n: c for n, c in plain.runtime.clients.items() if n not in ("c2", "c5")}
    plain.run_round()
    assert row["failed_clients"] == ["c2", "c5"] and row["clients_succeeded"] == 6
    assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_a_single_sampled_client_is_never_aggregated_alone():
    secure = loop(FedAvg(LOCAL), SETTINGS, names=["only"])
    before = secure.weights.clone()
    row = secure.run_round()
    assert not row["aggregated"] and "only 1 client" in row["secure_aggregation_aborted"]
    assert torch.equal(secure.weights, before)
