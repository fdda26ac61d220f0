"""A client's side of one secure-aggregation round: keys, shares, masked input, unmasking.

Every secret (both key pairs, the self-mask seed) is fresh for the round and the session is
discarded after unmasking. A client never reveals both the share of a peer's mask key and the
share of that peer's self-mask seed, so the server can never strip every mask off one input.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import numpy as np

from fedlearn.errors import FedLearnError
from fedlearn.privacy.secagg import crypto, shamir


class SecAggProtocolError(FedLearnError):
    """The server asked for something the protocol forbids (or out of order); the client refuses."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def share_context(round: int, sender: str, receiver: str) -> bytes:
    return f"fedlearn-secagg-share|{round}|{sender}|{receiver}".encode()


def mask_context(round: int, a: str, b: str) -> bytes:
    low, high = sorted((a, b))
    return f"fedlearn-secagg-mask|{round}|{low}|{high}".encode()


def pair_mask(private: crypto.X25519PrivateKey, peer_public: bytes, round: int, me: str, peer: str,
              length: int, bits: int) -> np.ndarray:
    """The pairwise mask both ends of (me, peer) derive from their agreed seed."""
    seed = crypto.agree(private, peer_public, mask_context(round, me, peer))
    return crypto.prg(seed, length, bits)


class SecAggClient:
    """One client, one round. Call advertise, share_keys, mask, unmask in that order."""

    def __init__(self, client_id: str, round: int) -> None:
        self.client_id = client_id
        self.round = round
        self._c_key = crypto.new_private_key()  # encrypts share messages
        self._s_key = crypto.new_private_key()  # pairwise mask agreement
        self._self_seed = os.urandom(32)
        self._peers: dict[str, dict[str, Any]] = {}
        self._shares: dict[str, tuple[int, int]] = {}  # sender -> (mask-key share, self-seed share)
        self._x = 0
        self._stage = "advertise"

    def _expect(self, stage: str) -> None:
        if self._stage != stage:
            raise SecAggProtocolError(f"secure aggregation: asked for {stage!r} while at {self._stage!r}")

    def advertise(self) -> dict[str, str]:
        """Round 0: the two public keys."""
        self._expect("advertise")
        self._stage = "share"
        return {"c_pk": b64(crypto.public_bytes(self._c_key)), "s_pk": b64(crypto.public_bytes(self._s_key))}

    def share_keys(self, request: dict[str, Any]) -> dict[str, Any]:
        """Round 1: t-of-k shares of the mask key and self seed, encrypted to each neighbour."""
        self._expect("share")
        peers = {cid: {"x": int(p["x"]), "c_pk": unb64(p["c_pk"]), "s_pk": unb64(p["s_pk"])}
                 for cid, p in request["peers"].items()}
        me = peers.get(self.client_id)
        if me is None or me["c_pk"] != crypto.public_bytes(self._c_key) or me["s_pk"] != crypto.public_bytes(
                self._s_key):
            raise SecAggProtocolError("secure aggregation: the server relayed keys that are not this client's")
        if len({p["x"] for p in peers.values()}) != len(peers) or len({p["c_pk"] for p in peers.values()}) != len(
                peers):
            raise SecAggProtocolError("secure aggregation: the server relayed duplicate keys")
        threshold = int(request["threshold"])
        # More than half of the holders: otherwise two disjoint sets of them could each reach the threshold, one
        # revealing the mask key and the other the self seed of the same client (Bell et al. require t > (k+1)/2).
        if not (2 <= threshold <= len(peers) and 2 * threshold > len(peers)):
            raise SecAggProtocolError(f"secure aggregation: threshold {threshold} is unsafe for {len(peers)} holders "
                                      f"(it must exceed half of them)")
        self._peers, self._x = peers, me["x"]
        xs = [p["x"] for p in peers.values()]
        s_shares = shamir.split(shamir.to_int(crypto.private_bytes(self._s_key)), threshold, xs)
        b_shares = shamir.split(shamir.to_int(self._self_seed), threshold, xs)
        out = {}
        for cid, p in peers.items():
            if cid == self.client_id:
                self._shares[cid] = (s_shares[p["x"]], b_shares[p["x"]])
                continue
            body = json.dumps({"s": hex(s_shares[p["x"]]), "b": hex(b_shares[p["x"]])}).encode()
            context = share_context(self.round, self.client_id, cid)
            key = crypto.agree(self._c_key, p["c_pk"], context)
            out[cid] = b64(crypto.encrypt(key, body, context))
        self._stage = "mask"
        return {"ciphertexts": out}

    def mask(self, request: dict[str, Any], encoded: np.ndarray, bits: int) -> tuple[np.ndarray, list[str]]:
        """Round 2: store the relayed shares and mask the encoded input; returns (y, senders whose shares failed).

        ``request["survivors"]`` are this client's neighbours that completed round 1: the masks are
        paired with exactly those. A share message that fails authentication is reported, so the
        server treats its sender as dropped.
        """
        self._expect("mask")
        rejected = []
        for sender, text in request["ciphertexts"].items():
            peer = self._peers.get(sender)
            try:
                if peer is None:
                    raise crypto.ShareDecryptionError("not a neighbour")
                context = share_context(self.round, sender, self.client_id)
                key = crypto.agree(self._c_key, peer["c_pk"], context)
                body = json.loads(crypto.decrypt(key, unb64(text), context))
                self._shares[sender] = (int(body["s"], 16), int(body["b"], 16))
            except (crypto.ShareDecryptionError, ValueError, KeyError, TypeError):
                rejected.append(sender)
        length = encoded.shape[0]
        y = encoded + crypto.prg(self._self_seed, length, bits)
        for peer_id in request["survivors"]:
            if peer_id == self.client_id:
                continue
            peer = self._peers.get(peer_id)
            if peer is None:
                raise SecAggProtocolError(f"secure aggregation: {peer_id} is not one of this client's neighbours")
            mask = pair_mask(self._s_key, peer["s_pk"], self.round, self.client_id, peer_id, length, bits)
            if self._x < peer["x"]:
                y += mask
            else:
                y -= mask
        if bits not in (32, 64):
            y &= y.dtype.type((1 << bits) - 1)
        self._stage = "unmask"
        return y, rejected

    def unmask(self, request: dict[str, Any]) -> dict[str, Any]:
        """Round 3: mask-key shares of dropped peers, self-seed shares of surviving ones, never both."""
        self._expect("unmask")
        dropped, survivors = set(request["dropped"]), set(request["survivors"])
        if dropped & survivors:
            raise SecAggProtocolError("secure aggregation: the server asked for both secrets of one client")
        if self.client_id in dropped:
            raise SecAggProtocolError("secure aggregation: this client sent its input but is listed as dropped")
        self._stage = "done"  # one unmasking per round: a second request could combine both answers
        return {
            "s_shares": {u: hex(self._shares[u][0]) for u in sorted(dropped) if u in self._shares},
            "b_shares": {u: hex(self._shares[u][1]) for u in sorted(survivors) if u in self._shares},
        }
