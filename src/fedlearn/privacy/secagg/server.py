"""The server's side of one secure-aggregation round: relay keys and shares, sum masked inputs, unmask.

The server sees public keys, encrypted shares it cannot open, masked inputs that look uniform
in Z_{2^bits}, and at the end t shares of exactly one secret per client (the self-mask seed of a
survivor, the mask key of a dropout): enough to remove the masks from the sum, never from one input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.errors import FedLearnError
from fedlearn.privacy.secagg import crypto, shamir
from fedlearn.privacy.secagg.client import b64, pair_mask, unb64
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.graph import neighbour_graph

if TYPE_CHECKING:
    from fedlearn.privacy.distributed import DiscreteGaussianEncoding


class SecAggAborted(FedLearnError):
    """Too few clients stayed to unmask the sum: the round releases nothing."""


def resolve_threshold(threshold: float, num_clients: int) -> int:
    """``threshold`` < 1 is a fraction of the sampled clients; >= 2 is an absolute count. Either way it is raised to
    more than half of them: with half or fewer, the server could collect one client's two secrets from two disjoint
    sets of holders and learn its input."""
    if 0.5 < threshold < 1:
        return max(2, math.ceil(threshold * num_clients - 1e-9), num_clients // 2 + 1)
    if threshold >= 2 and float(threshold).is_integer():
        return max(int(threshold), num_clients // 2 + 1)
    raise FedLearnError(f"--secagg-threshold must be a fraction in (0.5, 1) or a count >= 2; got {threshold}")


class SecAggServer:
    """One round. Stages: advertised -> shared -> masked inputs (add_input) -> unmask -> the sum."""

    def __init__(self, round: int, client_ids: Sequence[str], fixed_point: FixedPoint | DiscreteGaussianEncoding, *,
                 threshold: int, degree: int | None = None, share_threshold: int | None = None,
                 seed: int | None = None) -> None:
        if 2 * threshold <= len(client_ids) or threshold < 2:
            raise FedLearnError(f"secure aggregation threshold {threshold} of {len(client_ids)} clients: it must be "
                                "at least 2 and more than half of them")
        self.round = round
        self.sampled = list(client_ids)
        self.fixed_point = fixed_point
        self.threshold = threshold
        self.degree = degree
        self.share_threshold = share_threshold  # t of each client's k + 1 share holders (derived), else scaled
        self.seed = seed
        self.keys: dict[str, dict[str, bytes]] = {}
        self.graph: dict[str, set[str]] = {}
        self.x: dict[str, int] = {}
        self.local_threshold = threshold
        self.relay: dict[str, dict[str, str]] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.rejected: set[str] = set()
        self.dropped: list[str] = []
        self.survivors: list[str] = []

    def _require(self, alive: Sequence[str], stage: str) -> None:
        if len(alive) < self.threshold:
            raise SecAggAborted(f"secure aggregation round {self.round} aborted at {stage}: {len(alive)} clients "
                                f"left, fewer than the threshold {self.threshold}; nothing was revealed")

    # round 0 ------------------------------------------------------------------------------
    def receive_keys(self, replies: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, Any]]:
        """Record advertised keys; return each client's share-keys request (its neighbours' keys)."""
        for cid, reply in replies.items():
            if cid in self.sampled:
                self.keys[cid] = {"c_pk": unb64(reply["c_pk"]), "s_pk": unb64(reply["s_pk"])}
        alive = sorted(self.keys)
        self._require(alive, "key advertisement")
        self.x = {cid: i + 1 for i, cid in enumerate(alive)}
        # The graph is drawn after the keys are in, from the CSPRNG unless a seed is given (seeded privacy): nobody
        # can place themselves as a client's neighbours in advance.
        self.graph = neighbour_graph(alive, self.degree, self.seed)
        holders = len(next(iter(self.graph.values()))) + 1
        scaled = math.ceil(self.threshold * holders / len(alive) - 1e-9)
        wanted = scaled if self.share_threshold is None or holders == len(alive) else self.share_threshold
        self.local_threshold = max(2, min(holders, wanted), holders // 2 + 1)
        requests = {}
        for cid in alive:
            group = sorted(self.graph[cid] | {cid})
            requests[cid] = {"threshold": self.local_threshold, "peers": {
                p: {"x": self.x[p], "c_pk": b64(self.keys[p]["c_pk"]), "s_pk": b64(self.keys[p]["s_pk"])}
                for p in group}}
        return requests

    # round 1 ------------------------------------------------------------------------------
    def receive_shares(self, replies: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Relay each encrypted share to its receiver; return each survivor's masked-input request."""
        shared = sorted(cid for cid in replies if cid in self.keys)
        self._require(shared, "key sharing")
        relay: dict[str, dict[str, str]] = {cid: {} for cid in shared}
        for sender in shared:
            for receiver, text in replies[sender]["ciphertexts"].items():
                if receiver in relay and receiver in self.graph[sender]:
                    relay[receiver][sender] = text
        self.relay = relay
        self.shared = shared
        return {cid: {"ciphertexts": relay[cid], "survivors": sorted(self.graph[cid] & set(shared)),
                      "fixed_point": self.fixed_point.to_dict()} for cid in shared}

    # round 2 ------------------------------------------------------------------------------
    def add_input(self, client_id: str, masked: np.ndarray, rejected: Sequence[str] = ()) -> None:
        """Keep one masked input (all are kept: a sender found to have tampered is removed later)."""
        if client_id not in self.relay:
            raise SecAggAborted(f"masked input from {client_id}, which did not share keys this round")
        expected = self.fixed_point.size
        dtype = crypto.mask_dtype(self.fixed_point.bits)
        if masked.shape != (expected,) or masked.dtype != dtype:
            raise ValueError(f"masked input from {client_id} has shape {masked.shape} and dtype {masked.dtype}; "
                             f"expected ({expected},) {np.dtype(dtype)}")
        self.inputs[client_id] = masked
        self.rejected.update(r for r in rejected if r in self.relay)

    # round 3 ------------------------------------------------------------------------------
    def unmask_requests(self) -> dict[str, dict[str, list[str]]]:
        """Fix the survivors (inputs received, minus senders of rejected shares) and ask them for shares."""
        self.survivors = sorted(set(self.inputs) - self.rejected)
        self.dropped = sorted(set(self.relay) - set(self.survivors))
        self._require(self.survivors, "masked input collection")
        alive = set(self.survivors)
        return {v: {"dropped": sorted(self.graph[v] & set(self.dropped)),
                    "survivors": sorted((self.graph[v] & alive) | {v})} for v in self.survivors}

    def finish(self, replies: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
        """Reconstruct the secrets from the shares, remove every mask; the integer sum of the survivors' inputs."""
        responders = [v for v in self.survivors if v in replies]
        self._require(responders, "unmasking")
        fp = self.fixed_point
        length = fp.size
        dtype = crypto.mask_dtype(fp.bits)
        total = np.zeros(length, dtype=dtype)
        for cid in self.survivors:
            total += self.inputs[cid]
        for u in self.survivors:
            seed = self._reconstruct(u, replies, "b_shares")
            total -= crypto.prg(shamir.to_bytes(seed), length, fp.bits)
        for u in self.dropped:
            private = crypto.private_key_from(shamir.to_bytes(self._reconstruct(u, replies, "s_shares")))
            for v in self.graph[u] & set(self.survivors):
                mask = pair_mask(private, self.keys[v]["s_pk"], self.round, u, v, length, fp.bits)
                if self.x[v] < self.x[u]:  # v added the mask for the pair (v, u) when v is the lower index
                    total -= mask
                else:
                    total += mask
        if fp.bits not in (32, 64):
            total &= dtype((1 << fp.bits) - 1)
        self.inputs.clear()
        return total

    def _reconstruct(self, owner: str, replies: Mapping[str, Mapping[str, Any]], kind: str) -> int:
        shares = {}
        for holder, reply in replies.items():
            text = reply.get(kind, {}).get(owner)
            if text is not None and holder in self.x and (holder == owner or holder in self.graph[owner]):
                shares[self.x[holder]] = int(text, 16) % shamir.PRIME
        if len(shares) < self.local_threshold:
            raise SecAggAborted(f"secure aggregation round {self.round} aborted at unmasking: {len(shares)} shares "
                                f"of {owner}'s secret, fewer than the threshold {self.local_threshold}")
        # Any t shares interpolate the same polynomial when all are honest; use exactly t.
        return shamir.reconstruct(dict(sorted(shares.items())[: self.local_threshold]))

