"""A training round under secure aggregation: the server's half of SecAgg / SecAgg+ over any runtime.

The four protocol steps are messages like any other (SecureTask / SecureReply, and the masked
TrainResult), so the in-process simulation and gRPC deployment run the same protocol. The
strategy's aggregation receives one summed vector; no individual update ever exists here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedlearn.client.secure import join_blob, split_blob
from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.privacy import he
from fedlearn.privacy.secagg.crypto import mask_dtype
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.graph import default_degree
from fedlearn.privacy.secagg.server import SecAggAborted, SecAggServer, resolve_threshold
from fedlearn.protocol.messages import SecureReply, SecureTask, TrainResult, TrainTask, wire_size
from fedlearn.runtime.base import ClientFailure, Runtime
from fedlearn.seeding import derive_seed
from fedlearn.strategies.base import Aggregation, Strategy

log = logging.getLogger(__name__)

MODES = ("secagg", "secagg+")


@dataclass(frozen=True)
class SecAggSettings:
    """``--secure-aggregation`` and its knobs; ``max_weight`` bounds a client's sample count (its weight)."""

    mode: str = "secagg"
    threshold: float = 2 / 3
    bits: int = 32
    clip: float = 1.0
    neighbours: int | None = None
    max_weight: int = 1

    def check(self, strategy: Strategy) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"--secure-aggregation must be one of {', '.join(MODES)}; got {self.mode!r}")
        require_sum_only(strategy)
        resolve_threshold(self.threshold, 1000)  # form only; the count is fixed per round
        FixedPoint(self.bits, self.clip, 2, self.max_weight, 1)  # bits, clip and weight ranges
        if self.neighbours is not None and self.neighbours < 2:
            raise ConfigError(f"--secagg-neighbours must be >= 2; got {self.neighbours}")


def require_sum_only(strategy: Strategy) -> None:
    """Refuse a strategy that needs individual updates: secure aggregation and HE reveal only the sum."""
    if strategy.secure_weighting is None:
        raise ConfigError(f"strategy {strategy.name} needs individual updates and cannot run with secure "
                          "aggregation or --he; use fedavg, fedprox, fedsgd or --dp central/local")


def hidden_sum_request(strategy: Strategy) -> dict[str, Any]:
    """What every client must know to fold itself into a hidden sum: how to weight, which bits to add."""
    return {"weighting": strategy.secure_weighting, "extras": list(strategy.secure_extras)}


@dataclass
class SecureRoundOutcome:
    """What the round loop records: who failed, the traffic, and why a round aborted (if it did)."""

    failed: list[str] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    aborted: str | None = None


class SecureAggregationRound:
    """Runs one round's advertise -> share -> train+mask -> unmask exchange and feeds the sum to the strategy."""

    def __init__(self, settings: SecAggSettings, length: int) -> None:
        self.settings = settings
        self.length = length
        self.name = settings.mode

    def run(self, rnd: int, tasks: Sequence[TrainTask], runtime: Runtime, strategy: Strategy,
            aggregation: Aggregation, seed: int) -> SecureRoundOutcome:
        s = self.settings
        out = SecureRoundOutcome()
        ids = [t.client_id for t in tasks]
        if len(ids) < 2:  # a "sum" of one update is that update: nothing to hide it in
            if ids:
                out.aborted = f"secure aggregation round {rnd} aborted: only {len(ids)} client sampled"
                out.failed = list(ids)
                log.warning("round %d: %s", rnd, out.aborted)
            return out
        uniform = strategy.secure_weighting == "uniform"
        extras = tuple(strategy.secure_extras)
        fixed_point = FixedPoint(s.bits, s.clip, len(ids), 1 if uniform else s.max_weight, self.length,
                                 extras=1 + len(extras))
        degree = None if s.mode == "secagg" else (s.neighbours or default_degree(len(ids)))
        threshold = max(2, min(resolve_threshold(s.threshold, len(ids)), len(ids)))
        server = SecAggServer(rnd, ids, fixed_point, threshold=threshold,
                              degree=degree, seed=derive_seed(seed, rnd, "secagg-graph"))
        by_client = {t.client_id: t for t in tasks}
        try:
            replies = self._exchange(runtime, rnd, "secagg-advertise", {cid: {} for cid in ids}, out)
            requests = server.receive_keys(replies)
            replies = self._exchange(runtime, rnd, "secagg-share", requests, out)
            requests = server.receive_shares(replies)
            train = [replace(by_client[cid], config={**by_client[cid].config,
                                                     "secagg": {**requests[cid], **hidden_sum_request(strategy)}})
                     for cid in requests]
            out.bytes_down += sum(wire_size(t) for t in train)
            for answer in runtime.train(train):
                if isinstance(answer, ClientFailure):
                    log.warning("round %d: client %s dropped after sharing keys: %s", rnd, answer.client_id,
                                answer.reason)
                    continue
                out.bytes_up += wire_size(answer)
                try:
                    server.add_input(answer.client_id, _masked_vector(answer, fixed_point),
                                     answer.protocol.get("secagg_rejected", []))
                except (ValueError, TypeError) as exc:
                    log.warning("round %d: rejected masked input: %s", rnd, exc)
            requests = server.unmask_requests()
            if server.rejected:
                log.warning("round %d: relayed shares from %s failed authentication; treated as dropped",
                            rnd, ", ".join(sorted(server.rejected)))
            replies = self._exchange(runtime, rnd, "secagg-unmask", requests, out)
            total = server.finish(replies)
        except SecAggAborted as exc:
            log.warning("round %d: %s", rnd, exc)
            out.aborted = str(exc)
            out.failed = sorted(ids)
            return out
        weighted_sum, total_weight, counts = fixed_point.decode(total, len(server.survivors))
        aggregation.add_sum(torch.from_numpy(weighted_sum), float(total_weight), len(server.survivors),
                            dict(zip(extras, counts)))
        out.failed = sorted(set(ids) - set(server.survivors))
        return out

    @staticmethod
    def _exchange(runtime: Runtime, rnd: int, stage: str, requests: dict[str, dict[str, Any]],
                  out: SecureRoundOutcome) -> dict[str, dict[str, Any]]:
        tasks = [SecureTask(rnd, cid, stage, data) for cid, data in requests.items()]
        out.bytes_down += sum(wire_size(t) for t in tasks)
        replies: dict[str, dict[str, Any]] = {}
        for answer in runtime.exchange(tasks):
            if isinstance(answer, ClientFailure):
                log.warning("round %d: client %s dropped at %s: %s", rnd, answer.client_id, stage, answer.reason)
                continue
            if isinstance(answer, SecureReply) and answer.stage == stage and answer.client_id in requests:
                out.bytes_up += wire_size(answer)
                replies[answer.client_id] = answer.data
        return replies


def _masked_vector(result: TrainResult, fixed_point: FixedPoint) -> np.ndarray:
    payload = result.payload
    if not isinstance(payload, torch.Tensor) or payload.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"result from {result.client_id} is not a masked input")
    dtype = mask_dtype(fixed_point.bits)
    if payload.element_size() != np.dtype(dtype).itemsize:
        raise TypeError(f"masked input from {result.client_id} has {payload.element_size() * 8}-bit values; "
                        f"the round uses {fixed_point.bits} bits")
    return payload.numpy().view(dtype)



class HomomorphicRound:
    """A round under CKKS: clients send encrypted weighted updates, the server adds ciphertexts it
    cannot open (it holds the public context only), and the key holder decrypts just the sum.

    ``key_holder`` names the client holding secret.ctx; None lets the first answering client (in
    task order) decrypt, which suits a simulation where every client can reach the key folder.
    """

    name = "ckks"

    def __init__(self, public_context_path: str, length: int, key_holder: str | None = None) -> None:
        self.context = he.load_public_context(public_context_path)  # refuses a context holding the secret key
        self.length = length
        self.key_holder = key_holder

    def run(self, rnd: int, tasks: Sequence[TrainTask], runtime: Runtime, strategy: Strategy,
            aggregation: Aggregation, seed: int) -> SecureRoundOutcome:
        out = SecureRoundOutcome()
        extras = list(strategy.secure_extras)
        train = [replace(t, config={**t.config, "he": hidden_sum_request(strategy)}) for t in tasks]
        out.bytes_down += sum(wire_size(t) for t in train)
        total = he.EncryptedSum(self.context, self.length + 1 + len(extras))
        answered: list[str] = []
        for answer in runtime.train(train):
            if isinstance(answer, ClientFailure):
                log.warning("round %d: client %s dropped: %s", rnd, answer.client_id, answer.reason)
                continue
            out.bytes_up += wire_size(answer)
            try:
                total.add(split_blob(answer.payload, answer.protocol.get("chunk_sizes", [])))
            except (InvalidUpdateError, TypeError, AttributeError) as exc:
                log.warning("round %d: rejected encrypted update from %s: %s", rnd, answer.client_id, exc)
                continue
            answered.append(answer.client_id)
        out.failed = sorted(set(t.client_id for t in tasks) - set(answered))
        if not answered:
            return out
        holder = self.key_holder or answered[0]
        blob, sizes = join_blob(total.serialize())
        request = SecureTask(rnd, holder, "he-decrypt", {"chunk_sizes": sizes, "length": total.length}, blob)
        out.bytes_down += wire_size(request)
        reply = next(iter(runtime.exchange([request])), None)
        if not isinstance(reply, SecureReply) or reply.blob.numel() != total.length:
            out.aborted = f"key holder {holder} did not return the decrypted sum"
            log.warning("round %d: %s; weights unchanged", rnd, out.aborted)
            out.failed = sorted(t.client_id for t in tasks)
            return out
        out.bytes_up += wire_size(reply)
        plain = reply.blob.double()
        counts = [round(float(v)) for v in plain[self.length:]]  # exact integers, decrypted within ~1e-6
        aggregation.add_sum(plain[: self.length].clone(), float(counts[0]), len(answered),
                            dict(zip(extras, counts[1:])))
        return out
