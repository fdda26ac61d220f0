"""A training round under secure aggregation: the server's half of SecAgg / SecAgg+ over any runtime.

The four protocol steps are messages like any other (SecureTask / SecureReply, and the masked
TrainResult), delivered through the one collect loop, so the in-process simulation and gRPC
deployment run the same protocol. The aggregator receives one summed vector per uplink array; no
individual update ever exists here. Both protocols are ``SumProtocol``s of the round loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.privacy import he, sum_check
from fedlearn.privacy.secagg.crypto import mask_dtype
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.graph import SECURITY_BITS, secagg_plus_parameters
from fedlearn.privacy.secagg.server import SecAggAborted, SecAggServer, resolve_threshold
from fedlearn.protocol.codec import join_blob, split_blob
from fedlearn.protocol.messages import Message, SecureReply, SecureTask, TrainResult, TrainTask
from fedlearn.runtime.base import Runtime
from fedlearn.seeding import derive_seed
from fedlearn.server.collect import Traffic, collect
from fedlearn.strategies.base import Aggregator, Strategy

log = logging.getLogger(__name__)

MODES = ("secagg", "secagg+")
HE_BITS = sum_check.MAX_BITS  # CKKS adds integers below 2^30 within 1.1e-3 of exact: far inside the 1/8 tolerance
MIN_CONTRIBUTORS = sum_check.MIN_CONTRIBUTORS  # SecAgg and HE alike


@dataclass(frozen=True)
class SecAggSettings:
    """``--secure-aggregation`` and its knobs; ``max_weight`` bounds a client's sample count (its weight)."""

    mode: str = "secagg"
    threshold: float = 2 / 3
    bits: int = 32
    clip: float = 1.0
    neighbours: int | None = None
    max_weight: int = 1
    seeded: bool = False  # the neighbour graph from the run seed (seeded privacy only); else fresh CSPRNG bits
    corrupt: float = 1 / 3  # secagg+: the colluding fraction k and t are derived for (Bell et al.'s gamma)
    dropout: float = 0.1  # secagg+: the fraction expected to drop out (delta)

    def check(self, strategy: Strategy) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--secure-aggregation must be one of {', '.join(MODES)}; got {self.mode!r}")
        require_sum_only(strategy)
        resolve_threshold(self.threshold, 1000)  # form only; the count is fixed per round
        FixedPoint(self.bits, self.clip, 2, self.max_weight, 1)  # bits, clip and weight ranges
        if self.neighbours is not None and self.neighbours < 2:
            raise ConfigError(f"--secagg-neighbours must be >= 2; got {self.neighbours}")
        if not (0 <= self.corrupt < 0.5 and 0 <= self.dropout < 0.5):
            raise ConfigError(f"--secagg-corrupt-fraction and --secagg-dropout-fraction must be in [0, 0.5); got "
                              f"{self.corrupt} and {self.dropout}")

    def graph(self, n: int) -> tuple[int | None, int | None]:
        """(neighbours, share threshold) of a round of ``n`` clients: (None, None) is the complete graph with the
        round's threshold (SecAgg, or SecAgg+ where only it gives 2^-40); ``--secagg-neighbours`` overrides k."""
        if self.mode == "secagg":
            return None, None
        if self.neighbours is not None:
            return self.neighbours, None
        derived = secagg_plus_parameters(n, self.corrupt, self.dropout)
        if derived is None:
            log.info("secagg+: %d clients need the complete graph for 2^-%d against a %.2g colluding fraction with "
                     "%.2g dropping out; running SecAgg's", n, SECURITY_BITS, self.corrupt, self.dropout)
            return None, None
        return derived


def require_sum_only(strategy: Strategy) -> None:
    """Refuse a strategy that needs individual updates: secure aggregation and HE reveal only the sum."""
    reason = strategy.secure_refusal or (f"{strategy.name} needs each client's update" if strategy.weighting is None
                                         else None)
    if reason is not None:
        raise ConfigError(f"{reason}: it cannot run with secure aggregation or --he, which reveal only the sum; "
                          "use a mean-based algorithm or --dp central/local")


def hidden_sum_request(strategy: Strategy) -> dict[str, Any]:
    """What every client must know to fold itself into a hidden sum: how to weight, which arrays and bits to add."""
    return {"weighting": strategy.weighting, "extras": list(strategy.secure_extras), "arrays": list(strategy.uplink)}


def _split_sum(strategy: Strategy, loop: Any, total: Any) -> dict[str, torch.Tensor]:
    """The hidden sum of the joined uplink arrays, cut back into named arrays."""
    lengths = strategy.expected_arrays(loop.state)
    vector = torch.as_tensor(total, dtype=torch.float64)
    out, start = {}, 0
    for name in strategy.uplink:
        out[name] = vector[start : start + lengths[name]].clone()
        start += lengths[name]
    return out


@dataclass
class SecureRoundOutcome:
    """What the round loop records: who failed, the traffic, and why a round aborted (if it did)."""

    traffic: Traffic = field(default_factory=Traffic)
    aborted: str | None = None


class SecureAggregationRound:
    """Runs one round's advertise -> share -> train+mask -> unmask exchange and feeds the sum to the strategy."""

    def __init__(self, settings: SecAggSettings) -> None:
        self.settings = settings
        self.name = settings.mode

    def collect(self, rnd: int, tasks: list[TrainTask], loop: Any,
                aggregator: Aggregator) -> tuple[Traffic, str | None]:
        out = self.run(rnd, tasks, loop.runtime, loop.strategy, aggregator, loop.seed, loop)
        return out.traffic, out.aborted

    def run(self, rnd: int, tasks: Sequence[TrainTask], runtime: Runtime, strategy: Strategy,
            aggregation: Aggregator, seed: int, loop: Any) -> SecureRoundOutcome:
        s = self.settings
        out = SecureRoundOutcome()
        ids = [t.client_id for t in tasks]
        if len(ids) < MIN_CONTRIBUTORS:
            return _too_few(out, rnd, ids, "sampled")
        uniform = strategy.weighting == "uniform"
        extras = tuple(strategy.secure_extras)
        length = sum(strategy.expected_arrays(loop.state).values())
        degree, share_threshold = s.graph(len(ids))
        threshold = max(2, min(resolve_threshold(s.threshold, len(ids)), len(ids)))
        fixed_point = strategy.hidden_sum_encoding(rnd, ids, length, bits=s.bits, threshold=threshold,
                                                   corrupt=s.corrupt)
        if fixed_point is None:
            fixed_point = FixedPoint(s.bits, s.clip, len(ids), 1 if uniform else s.max_weight, length,
                                     extras=1 + len(extras))
        server = SecAggServer(rnd, ids, fixed_point, threshold=threshold, degree=degree,
                              share_threshold=share_threshold,
                              seed=derive_seed(seed, rnd, "secagg-graph") if s.seeded else None)
        by_client = {t.client_id: t for t in tasks}
        try:
            replies = self._exchange(runtime, rnd, "secagg-advertise", {cid: {} for cid in ids}, out)
            requests = server.receive_keys(replies)
            replies = self._exchange(runtime, rnd, "secagg-share", requests, out)
            requests = server.receive_shares(replies)
            train = [replace(by_client[cid], config={**by_client[cid].config,
                                                     "secagg": {**requests[cid], **hidden_sum_request(strategy)}})
                     for cid in requests]

            def accept(task: Message, answer: Message) -> None:
                try:
                    server.add_input(answer.client_id, _masked_vector(answer, fixed_point),
                                     answer.sealed.get("secagg_rejected", []))
                except (ValueError, TypeError, AttributeError) as exc:
                    raise InvalidUpdateError(f"masked input from {answer.client_id}: {exc}") from None

            out.traffic += collect(runtime, train, accept, rnd, "masked input")
            requests = server.unmask_requests()
            if server.rejected:
                log.warning("round %d: relayed shares from %s failed authentication; treated as dropped",
                            rnd, ", ".join(sorted(server.rejected)))
            replies = self._exchange(runtime, rnd, "secagg-unmask", requests, out)
            total = server.finish(replies)
        except SecAggAborted as exc:
            log.warning("round %d: %s", rnd, exc)
            out.aborted = str(exc)
            out.traffic.failed = sorted(ids)
            return out
        weighted_sum, total_weight, counts = fixed_point.decode(total, len(server.survivors))
        aggregation.add_sum(_split_sum(strategy, loop, weighted_sum), float(total_weight), len(server.survivors),
                            dict(zip(extras, counts)))
        out.traffic.failed = sorted(set(ids) - set(server.survivors))
        return out

    @staticmethod
    def _exchange(runtime: Runtime, rnd: int, stage: str, requests: dict[str, dict[str, Any]],
                  out: SecureRoundOutcome) -> dict[str, dict[str, Any]]:
        tasks = [SecureTask(rnd, cid, stage, data) for cid, data in requests.items()]
        replies: dict[str, dict[str, Any]] = {}

        def accept(task: Message, answer: Message) -> None:
            if not (isinstance(answer, SecureReply) and answer.stage == stage):
                raise InvalidUpdateError(f"{answer.client_id} did not answer the {stage} step")
            replies[answer.client_id] = answer.data

        traffic = collect(runtime, tasks, accept, rnd, stage)
        out.traffic.bytes_up += traffic.bytes_up
        out.traffic.bytes_down += traffic.bytes_down
        return replies


def _masked_vector(result: TrainResult, fixed_point: FixedPoint) -> np.ndarray:
    payload = result.arrays.get("masked")
    if not isinstance(payload, torch.Tensor) or payload.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"result from {result.client_id} is not a masked input")
    dtype = mask_dtype(fixed_point.bits)
    if payload.element_size() != np.dtype(dtype).itemsize:
        raise TypeError(f"masked input from {result.client_id} has {payload.element_size() * 8}-bit values; "
                        f"the round uses {fixed_point.bits} bits")
    return payload.numpy().view(dtype)



class HomomorphicRound:
    """A round under CKKS: clients send encrypted fixed-point contributions with check values, the server adds
    ciphertexts it cannot open (it holds the public context only), and the key holder returns the exact integer sum
    only after checking it is the sum of the clients the server names (``privacy.sum_check``).

    ``key_holder`` names the client holding secret.ctx; None lets the first answering client (in
    task order) decrypt, which suits a simulation where every client can reach the key folder.
    ``clip``, ``max_weight`` and ``bits`` set the fixed point as for SecAgg; ``bits`` stays at HE_BITS or below so
    that CKKS adds the integers exactly.
    """

    name = "ckks"

    def __init__(self, public_context_path: str, key_holder: str | None = None, *, max_weight: int,
                 clip: float = 1.0, bits: int = HE_BITS) -> None:
        self.context = he.load_public_context(public_context_path)  # refuses a context holding the secret key
        self.key_holder = key_holder
        if not 8 <= bits <= HE_BITS:
            raise ConfigError(f"CKKS sums integers exactly up to 2^{HE_BITS}; give --secagg-bits from 8 to {HE_BITS} "
                              f"with --he ckks (got {bits})")
        self.clip, self.max_weight, self.bits = clip, max_weight, bits
        FixedPoint(bits, clip, 2, max_weight, 1)  # bits, clip and weight ranges
        error = he.ckks_error_bound(he.context_params(self.context), 1, 2.0**bits)
        if error > sum_check.INTEGER_TOLERANCE / 4:  # the key holder must round every honest sum exactly
            raise ConfigError(f"these CKKS parameters add {bits}-bit integers only within {error:.2g}, too coarse "
                              f"for exact sums; use the default keys or fewer --secagg-bits")

    def collect(self, rnd: int, tasks: list[TrainTask], loop: Any,
                aggregator: Aggregator) -> tuple[Traffic, str | None]:
        out = self.run(rnd, tasks, loop.runtime, loop.strategy, aggregator, loop.seed, loop)
        return out.traffic, out.aborted

    def run(self, rnd: int, tasks: Sequence[TrainTask], runtime: Runtime, strategy: Strategy,
            aggregation: Aggregator, seed: int, loop: Any) -> SecureRoundOutcome:
        out = SecureRoundOutcome()
        ids = [t.client_id for t in tasks]
        if len(ids) < MIN_CONTRIBUTORS:
            return _too_few(out, rnd, ids, "sampled")
        extras = list(strategy.secure_extras)
        length = sum(strategy.expected_arrays(loop.state).values())
        uniform = strategy.weighting == "uniform"
        fixed_point = FixedPoint(self.bits, self.clip, len(ids), 1 if uniform else self.max_weight, length,
                                 extras=1 + len(extras))
        request = {**hidden_sum_request(strategy), "fixed_point": fixed_point.to_dict()}
        train = [replace(t, config={**t.config, "he": request}) for t in tasks]
        total = he.EncryptedSum(self.context, length + fixed_point.extras + sum_check.CHECK_SLOTS)
        answered: list[str] = []

        def accept(task: Message, answer: Message) -> None:
            try:
                total.add(split_blob(answer.arrays.get("ciphertext"), answer.sealed.get("chunk_sizes", [])))
            except (InvalidUpdateError, TypeError, AttributeError, ValueError) as exc:
                raise InvalidUpdateError(f"encrypted update from {answer.client_id}: {exc}") from None
            answered.append(answer.client_id)

        out.traffic = collect(runtime, train, accept, rnd, "encrypted update")
        if len(answered) < MIN_CONTRIBUTORS:
            return _too_few(out, rnd, ids, "answered", len(answered))
        holder = self.key_holder or answered[0]
        blob, sizes = join_blob(total.serialize())
        request = SecureTask(rnd, holder, "he-decrypt", {"chunk_sizes": sizes, "length": total.length,
                                                         "contributors": list(answered),
                                                         "fixed_point": fixed_point.to_dict()}, blob)
        replies: list[SecureReply] = []
        expected = length + fixed_point.extras

        def take(task: Message, reply: Message) -> None:
            if (not isinstance(reply, SecureReply) or reply.blob.dtype != torch.int64
                    or reply.blob.numel() != expected):
                raise InvalidUpdateError(f"key holder {holder} did not return the decrypted sum")
            replies.append(reply)

        decrypted = collect(runtime, [request], take, rnd, "decryption")
        out.traffic.bytes_up += decrypted.bytes_up
        out.traffic.bytes_down += decrypted.bytes_down
        if not replies:
            out.aborted = f"key holder {holder} did not return the decrypted sum"
            log.warning("round %d: %s; weights unchanged", rnd, out.aborted)
            out.traffic.failed = sorted(t.client_id for t in tasks)
            return out
        weighted_sum, total_weight, counts = fixed_point.decode(replies[0].blob.numpy(), len(answered))
        aggregation.add_sum(_split_sum(strategy, loop, weighted_sum), float(total_weight), len(answered),
                            dict(zip(extras, counts)))
        out.traffic.failed = sorted(set(ids) - set(answered))
        return out


def _too_few(out: SecureRoundOutcome, rnd: int, ids: list[str], what: str,
             count: int | None = None) -> SecureRoundOutcome:
    """Abort a round whose hidden sum would hold fewer than two clients: a sum of one is that client's update."""
    if ids:
        out.aborted = (f"secure round {rnd} aborted: only {len(ids) if count is None else count} client(s) "
                       f"{what}; a secure sum needs at least {MIN_CONTRIBUTORS}, or it is one client's update")
        out.traffic.failed = sorted(ids)
        log.warning("round %d: %s", rnd, out.aborted)
    return out
