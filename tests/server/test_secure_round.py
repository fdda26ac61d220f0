"""Secure aggregation inside the round loop: same model as plain FedAvg, dropouts, aborts, refusals."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.secure import SecureClients
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.errors import ConfigError
from fedlearn.privacy.secagg.client import SecAggClient
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.server import SecAggServer
from fedlearn.protocol.codec import decode, encode
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Message, SecureReply, SecureTask, TrainResult
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.secure import HomomorphicRound, SecAggSettings, SecureAggregationRound
from fedlearn.strategies import FedAvg, FedSGD
from fedlearn.strategies.dp import DPSGD, DPFedAvg

torch.set_num_threads(1)
LOCAL = LocalConfig(local_epochs=1, batch_size=8, lr=0.1)


def fedavg() -> FedAvg:
    return FedAvg(local=LOCAL)
NAMES = [f"c{i}" for i in range(8)]


def data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


class Flaky(InProcessRuntime):
    """The in-process clients, with some of them going silent from a given protocol step on."""

    def __init__(self, app: ClientApp, drop: dict[str, str]) -> None:
        super().__init__(app)
        self.drop = drop  # client -> first step it misses: secagg-share, train or secagg-unmask

    def _gone(self, client_id: str, step: str) -> bool:
        order = ["secagg-advertise", "secagg-share", "train", "secagg-unmask", "he-decrypt"]
        first = self.drop.get(client_id)
        return first is not None and order.index(step) >= order.index(first)

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        for task in tasks:
            step = task.stage if isinstance(task, SecureTask) else "train"
            if self._gone(task.client_id, step):
                yield ClientFailure(task.client_id, "vanished")
            else:
                yield from super().deliver([task])


class Wire(Flaky):
    """A process boundary seen by an adversary on it: every message encoded, kept and decoded again."""

    def __init__(self, app: ClientApp, drop: dict[str, str]) -> None:
        super().__init__(app, drop)
        self.up: list[bytes] = []  # what the clients sent
        self.received: list[Message] = []

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        for answer in super().deliver([decode(encode(t)) for t in tasks]):
            if isinstance(answer, ClientFailure):
                yield answer
                continue
            data = encode(answer)
            self.up.append(data)
            answer = decode(data)
            self.received.append(answer)
            yield answer


def loop(strategy, settings: SecAggSettings | None, drop: dict[str, str] | None = None,
         names: Sequence[str] = NAMES, runtime: type[Flaky] = Flaky) -> RoundLoop:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    clients = {n: ClientData(data(10 + 3 * i, i)) for i, n in enumerate(names)}
    spec = trainer.vector.spec
    sums = SecureAggregationRound(settings) if settings else None
    return RoundLoop(strategy, runtime(ClientApp(trainer, clients), drop or {}), spec, trainer.vector.read(),
                     sums=sums)


SETTINGS = SecAggSettings("secagg", threshold=0.6, bits=32, clip=1.0, max_weight=40)


@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_secure_fedavg_equals_plain_fedavg_within_quantization(mode):
    plain = loop(fedavg(), None)
    secure = loop(fedavg(), SecAggSettings(mode, 0.6, 32, 1.0, 4 if mode == "secagg+" else None, 40))
    for _ in range(3):
        plain.run_round()
        row = secure.run_round()
        assert row["aggregated"] and row["clients_succeeded"] == len(NAMES) and row["secure_aggregation"] == mode
        # Each round starts from nearly the same weights; quantization error is ~1e-8 per coordinate.
        assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_fedsgd_also_aggregates_securely():
    plain, secure = loop(FedSGD(local=LOCAL), None), loop(FedSGD(local=LOCAL), SETTINGS)
    plain.run_round()
    secure.run_round()
    assert torch.allclose(secure.weights, plain.weights, atol=1e-6)


def test_dropouts_after_masking_give_the_survivors_average():
    gone = {"c1": "secagg-unmask", "c4": "secagg-unmask", "c6": "train"}
    survivors = [n for n in NAMES if n not in ("c6",)]  # c1, c4 sent masked input before vanishing
    secure = loop(fedavg(), SETTINGS, drop=gone)
    row = secure.run_round()
    plain = loop(fedavg(), None, names=NAMES)
    plain.runtime.app.clients = {n: plain.runtime.app.clients[n] for n in survivors}  # same data, same seeds
    plain_row = plain.run_round()
    assert row["clients_succeeded"] == len(survivors) == plain_row["clients_succeeded"]
    assert row["failed_clients"] == ["c6"]
    assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_too_many_dropouts_abort_and_leave_the_model_unchanged():
    secure = loop(fedavg(), SETTINGS, drop={n: "train" for n in NAMES[:4]})  # 4 of 8 < ceil(0.6 * 8)
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
    strategy = DPSGD(fedavg(), clip_norm=1.0, noise_multiplier=1.0, delta=1e-5)
    with pytest.raises(ConfigError, match="cannot run with secure aggregation"):
        SETTINGS.check(strategy)
    with pytest.raises(ConfigError, match="secure-aggregation must be one of"):
        SecAggSettings("bogus").check(fedavg())


@pytest.fixture(scope="module")
def he_keys(tmp_path_factory):
    from fedlearn.privacy.he import generate_keys

    folder = tmp_path_factory.mktemp("he")
    generate_keys(folder)
    return folder


def he_loop(strategy, keys, key_holder=None, drop=None, runtime: type[Flaky] = Flaky) -> RoundLoop:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    clients = {n: ClientData(data(10 + 3 * i, i)) for i, n in enumerate(NAMES)}
    app = ClientApp(trainer, clients, secure=SecureClients(keys))
    spec = trainer.vector.spec
    return RoundLoop(strategy, runtime(app, drop or {}), spec, trainer.vector.read(),
                     sums=HomomorphicRound(str(keys / "public.ctx"), key_holder, clip=1.0, max_weight=40))


def test_ckks_fedavg_equals_plain_fedavg_within_ckks_error(he_keys):
    plain, secure = loop(fedavg(), None), he_loop(fedavg(), he_keys)
    for _ in range(2):
        plain.run_round()
        row = secure.run_round()
        assert row["aggregated"] and row["secure_aggregation"] == "ckks" and row["clients_succeeded"] == 8
        assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_ckks_server_holds_no_secret_key(he_keys):
    from fedlearn.privacy.he import context_holds_secret_key

    secure = he_loop(fedavg(), he_keys).sums
    assert not secure.context.is_private()
    assert not context_holds_secret_key(secure.context.serialize(save_secret_key=True))  # nothing to save
    with pytest.raises(ConfigError, match="secret key"):
        HomomorphicRound(str(he_keys / "secret.ctx"), max_weight=40)


def test_ckks_round_without_a_key_holder_keeps_the_weights(he_keys, tmp_path, caplog):
    public_only = tmp_path / "keys"
    public_only.mkdir()
    for name in ("public.ctx", "group.key"):
        (public_only / name).write_bytes((he_keys / name).read_bytes())
    secure = he_loop(fedavg(), he_keys)
    secure.runtime.app.secure = SecureClients(public_only)  # clients can encrypt, nobody can decrypt
    before = secure.weights.clone()
    # The client's protocol refusal is a ClientFailure in-process as over gRPC: the round aborts, saying why.
    with caplog.at_level("WARNING"):
        row = secure.run_round()
    assert not row["aggregated"] and "did not return the decrypted sum" in row["secure_aggregation_aborted"]
    assert row["clients_succeeded"] == 0 and sorted(row["failed_clients"]) == NAMES
    assert "secret.ctx" in caplog.text
    assert torch.equal(secure.weights, before)


def test_ckks_dropouts_average_the_answering_clients(he_keys):
    secure = he_loop(fedavg(), he_keys, drop={"c2": "train", "c5": "train"})
    row = secure.run_round()
    plain = loop(fedavg(), None)
    plain.runtime.app.clients = {n: c for n, c in plain.runtime.app.clients.items() if n not in ("c2", "c5")}
    plain.run_round()
    assert row["failed_clients"] == ["c2", "c5"] and row["clients_succeeded"] == 6
    assert torch.allclose(secure.weights, plain.weights, atol=1e-5)


def test_a_single_sampled_client_is_never_aggregated_alone():
    secure = loop(fedavg(), SETTINGS, names=["only"])
    before = secure.weights.clone()
    row = secure.run_round()
    assert not row["aggregated"] and "only 1 client" in row["secure_aggregation_aborted"]
    assert torch.equal(secure.weights, before)


def _hidden_sum_inputs_only(box: Wire, array: str, sealed: set[str], dtype: torch.dtype,
                            length: int | None) -> list[TrainResult]:
    """Every train result on the wire carries the masked / encrypted vector and nothing a plain result says."""
    results = [m for m in box.received if isinstance(m, TrainResult)]
    assert sorted(r.client_id for r in results) == NAMES
    assert all(isinstance(m, (TrainResult, SecureReply)) for m in box.received)
    for result in results:
        assert result.num_examples == 0  # the weight travels inside the sum
        assert result.metrics == {}  # no train loss, no clip bit in the clear
        assert list(result.arrays) == [array] and "update" not in result.arrays
        assert set(result.sealed) == sealed
        vector = result.arrays[array]
        assert vector.dtype == dtype and vector.dim() == 1 and (length is None or vector.numel() == length)
    return results


def _plain_updates() -> dict[str, bytes]:
    """Each client's round-1 update as a plain FedAvg client would send it (same data, same seeds)."""
    plain = loop(fedavg(), None, runtime=Wire)
    plain.run_round()
    updates = {m.client_id: m.arrays["update"] for m in plain.runtime.received if isinstance(m, TrainResult)}
    assert sorted(updates) == NAMES and all(u[:16].abs().sum() > 0 for u in updates.values())
    needles = {cid: u[:16].numpy().tobytes() for cid, u in updates.items()}
    for needle in needles.values():  # the search below can find an update that crosses in the clear
        assert any(needle in data for data in plain.runtime.up)
    return needles


@pytest.mark.parametrize("dp", [False, True], ids=["fedavg", "dp-adaptive-clip"])
def test_an_eavesdropper_on_a_secagg_round_sees_only_masked_inputs(dp):
    if dp:
        strategy = DPFedAvg(LOCAL, clip_norm=0.5, noise_multiplier=0.0, num_clients=8, sampling_rate=1.0,
                            delta=1e-5, adaptive_quantile=0.5, noise_seed=0)
    else:
        strategy = fedavg()
    secure = loop(strategy, SETTINGS, runtime=Wire)
    row = secure.run_round()
    assert row["aggregated"] and row["clients_succeeded"] == len(NAMES)
    box = secure.runtime
    numel = secure.spec.numel
    # the sample count, plus adaptive clipping's "within the clip norm" bit, ride as masked integers
    _hidden_sum_inputs_only(box, "masked", {"secagg", "secagg_rejected"}, torch.int32, numel + 1 + int(dp))
    stages = [m.stage for m in box.received if isinstance(m, SecureReply)]
    assert sorted(set(stages)) == ["secagg-advertise", "secagg-share", "secagg-unmask"]
    assert row["bytes_up"] == sum(len(d) for d in box.up)  # nothing else went up
    if not dp:
        for cid, needle in _plain_updates().items():
            assert not any(needle in data for data in box.up), f"{cid}'s update crossed in the clear"


def test_an_eavesdropper_on_a_ckks_round_sees_only_ciphertexts(he_keys):
    secure = he_loop(fedavg(), he_keys, runtime=Wire)
    row = secure.run_round()
    assert row["aggregated"] and row["clients_succeeded"] == len(NAMES)
    box = secure.runtime
    for result in _hidden_sum_inputs_only(box, "ciphertext", {"he", "chunk_sizes"}, torch.uint8, None):
        assert sum(result.sealed["chunk_sizes"]) == result.arrays["ciphertext"].numel()  # ciphertext bytes only
    # the only other client message is the key holder's decryption of the sum, never of one update: exact integers
    (reply,) = [m for m in box.received if isinstance(m, SecureReply)]
    assert reply.stage == "he-decrypt" and reply.blob.numel() == secure.spec.numel + 1
    assert reply.blob.dtype == torch.int64 and reply.blob[-1] == sum(10 + 3 * i for i in range(len(NAMES)))
    for cid, needle in _plain_updates().items():
        assert not any(needle in data for data in box.up), f"{cid}'s update crossed in the clear"


def test_secagg_plus_rounds_use_the_derived_neighbours_and_share_threshold() -> None:
    plus = SecAggSettings(mode="secagg+")
    assert plus.graph(100) == (60, 34)  # 2^-40 against a third colluding, a tenth dropping
    assert plus.graph(10) == (None, None)  # only the complete graph gets there: SecAgg's
    assert SecAggSettings(mode="secagg+", neighbours=8).graph(100) == (8, None)
    assert SecAggSettings(mode="secagg").graph(100) == (None, None)
    with pytest.raises(ConfigError, match="corrupt-fraction"):
        SecAggSettings(mode="secagg+", corrupt=0.5).check(FedAvg())
    ids = [f"c{i:03d}" for i in range(100)]
    server = SecAggServer(1, ids, FixedPoint(32, 1.0, 100, 1, 4), threshold=67, degree=60, share_threshold=34)
    replies = {cid: SecAggClient(cid, 1).advertise() for cid in ids}
    requests = server.receive_keys(replies)
    assert all(len(peers) == 60 for peers in server.graph.values())
    assert {r["threshold"] for r in requests.values()} == {34}  # t of the 61 holders, more than half of them
