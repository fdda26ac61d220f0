"""Distributed DP in the round loop: what the server unmasks already carries the accounted noise; clients enforce
their own share policy; the wire carries masked integers only."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp, ClientPolicy
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.privacy.distributed import DiscreteGaussianEncoding, SharePolicy, padded_dim
from fedlearn.protocol.codec import decode, encode
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Message, SecureTask, TrainResult
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.secure import SecAggSettings, SecureAggregationRound
from fedlearn.strategies import FedAvg
from fedlearn.strategies.base import PoissonSampler
from fedlearn.strategies.distributed_dp import DistributedDP, honest_shares
from fedlearn.strategies.dp import CentralDP

torch.set_num_threads(1)
LOCAL = LocalConfig(local_epochs=1, batch_size=8, lr=0.5)
NAMES = [f"c{i}" for i in range(8)]
CLIP, Z = 0.5, 1.0
SETTINGS = SecAggSettings("secagg", threshold=0.6, bits=20, clip=CLIP, max_weight=1)


class Wire(InProcessRuntime):
    """Every message encoded and decoded across the boundary; clients in ``gone`` vanish from the masking step."""

    def __init__(self, app: ClientApp, gone: Sequence[str] = ()) -> None:
        super().__init__(app)
        self.gone, self.received = set(gone), []

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        for task in tasks:
            if task.client_id in self.gone and not isinstance(task, SecureTask):
                yield ClientFailure(task.client_id, "vanished")
                continue
            for answer in super().deliver([decode(encode(task))]):
                answer = answer if isinstance(answer, ClientFailure) else decode(encode(answer))
                self.received.append(answer)
                yield answer


def build(strategy, settings: SecAggSettings | None, policy: ClientPolicy | None = None,
          gone: Sequence[str] = ()) -> RoundLoop:
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    g = torch.Generator().manual_seed(1)
    clients = {n: ClientData(ArrayDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,),
                                                                                               generator=g)))
               for n in NAMES}
    app = ClientApp(trainer, clients, policy=policy or ClientPolicy(), seeded_privacy=5)
    sums = SecureAggregationRound(settings) if settings else None
    return RoundLoop(strategy, Wire(app, gone), trainer.vector.spec, trainer.vector.read(), sums=sums)


def distributed() -> DistributedDP:
    return DistributedDP(FedAvg(local=LOCAL, sampler=PoissonSampler(1.0)), clip_norm=CLIP, noise_multiplier=Z,
                         delta=1e-5, population=len(NAMES), seeded=9)


def share_policy() -> ClientPolicy:
    return ClientPolicy(share=SharePolicy(CLIP, Z / math.sqrt(2 * len(NAMES))))


def true_clipped_sum(gone: Sequence[str] = ()) -> torch.Tensor:
    """The exact sum of the clipped updates, from the same clients on the same seeds without noise."""
    inner = FedAvg(local=LOCAL, sampler=PoissonSampler(1.0))
    plain = build(CentralDP(inner, clip_norm=CLIP, noise_multiplier=0.0, delta=1e-5, noise_seed=0,
                            population=len(NAMES)), None, gone=gone)
    plain.run_round()
    return plain.strategy._noisy._sums["update"]


@pytest.mark.parametrize("gone", [(), ("c2", "c5")], ids=["all", "two-dropped"])
def test_the_server_unmasks_only_a_sum_already_carrying_the_accounted_noise(gone):
    ddp = build(distributed(), SETTINGS, share_policy(), gone=gone)
    row = ddp.run_round()
    assert row["aggregated"] and row["clients_succeeded"] == len(NAMES) - len(gone)
    unmasked = ddp.strategy._sum._sums["update"]  # everything the server learns about the updates this round
    residual = unmasked - true_clipped_sum(gone)
    h = honest_shares(len(NAMES), math.ceil(0.6 * len(NAMES)), SETTINGS.corrupt)
    assert ddp.strategy.honest == [h]
    # every surviving client added a share of variance (z * norm_bound)^2 / h, in units of gamma
    numel = ddp.spec.numel
    survivors = len(NAMES) - len(gone)
    planned = DiscreteGaussianEncoding.plan(bits=20, clip=CLIP, length=numel, noise_multiplier=Z,
                                            clients=len(NAMES), honest=h, rotation_seed=0)
    total_std = Z * planned.norm_bound * planned.gamma  # of h honest shares: what the accountant counts
    assert total_std >= Z * CLIP  # at least z C: rounding only inflates the sensitivity
    assert float(torch.std(residual)) == pytest.approx(total_std * math.sqrt(survivors / h), rel=0.1)
    assert abs(float(residual.mean())) < 4 * float(torch.std(residual)) / math.sqrt(numel)  # unbiased
    # on the wire: a masked vector of the rotation's size, no count, no loss, no clear update
    results = [m for m in ddp.runtime.received if isinstance(m, TrainResult)]
    assert len(results) == survivors
    for result in results:
        assert result.num_examples == 0 and result.metrics == {} and list(result.arrays) == ["masked"]
        assert result.arrays["masked"].numel() == padded_dim(numel) and result.arrays["masked"].dtype == torch.int32
    assert ddp.strategy.round_metrics()["epsilon"] > 0 and ddp.strategy.privacy_summary()["bits"] == 20


def test_clients_refuse_a_round_with_less_noise_than_their_policy_or_none_at_all():
    strict = ClientPolicy(share=SharePolicy(CLIP, 10.0))  # far more noise than the server plans
    ddp = build(distributed(), SETTINGS, strict)
    before = ddp.weights.clone()
    row = ddp.run_round()
    assert not row["aggregated"] and torch.equal(ddp.weights, before)
    refusals = [m for m in ddp.runtime.received if isinstance(m, ClientFailure)]
    assert len(refusals) == len(NAMES) and all("below this client's own minimum" in r.reason for r in refusals)
    # a server that drops the noise (a plain secure sum) is refused by clients that run distributed DP
    plain = build(FedAvg(local=LOCAL), SETTINGS, share_policy())
    row = plain.run_round()
    assert not row["aggregated"]
    assert all("without this client's distributed-DP noise share" in m.reason for m in plain.runtime.received
               if isinstance(m, ClientFailure))
