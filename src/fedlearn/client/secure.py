"""The client side of secure aggregation for every client a process hosts (one, or a whole simulation).

It answers SecureTasks and turns a TrainResult's transformed arrays into the one masked (or
encrypted) vector the server is allowed to see: the last step of the client pipeline
``update -> clip -> local noise -> mask or encrypt``. The arrays named in the request are joined in
that order, so every uplink array (SCAFFOLD's control delta too) travels inside the hidden sum.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedlearn.errors import ConfigError, InvalidUpdateError, TaskRefused
from fedlearn.privacy import sum_check
from fedlearn.privacy.distributed import DiscreteGaussianEncoding, SharePolicy
from fedlearn.privacy.dp import PrivacyRandom
from fedlearn.privacy.secagg.client import SecAggClient, SecAggProtocolError
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.protocol.codec import join_blob, split_blob
from fedlearn.protocol.messages import SecureReply, SecureTask, TrainResult, TrainTask


class SecureClients:
    """Per-client, per-round protocol state; a client's secrets live here for one round only.

    ``he_keys`` is the folder from `fedlearn he keygen`: public.ctx to encrypt, group.key for the sum's check
    values, and secret.ctx only on the key holder, which decrypts nothing but a verified sum of at least two
    clients and returns it as exact integers (``sum_check``).
    """

    def __init__(self, he_keys: str | os.PathLike | None = None) -> None:
        self._secagg: dict[str, SecAggClient] = {}
        self.he_keys = Path(he_keys) if he_keys else None
        self._public_context = None
        self._secret_context = None
        self._group_key: bytes | None = None
        self._burned = False

    def bind_run(self, run_id: str) -> None:
        """Use the HE key folder for run ``run_id`` only: the first run to use it is recorded in it (``RUN_FILE``),
        and a later run is refused, so every run has new keys. Without a key folder nothing happens."""
        if self.he_keys is None or not self.he_keys.is_dir():
            return
        record = self.he_keys / sum_check.RUN_FILE
        try:
            used = record.read_text().strip() if record.exists() else None
            if used is None:
                record.write_text(run_id + "\n")
                return
        except OSError as exc:
            raise ConfigError(f"homomorphic encryption: cannot record this run in {record} ({exc.strerror or exc}); "
                              "give --he-keys a writable folder") from None
        if used != run_id:
            raise ConfigError(f"homomorphic encryption: the keys in {self.he_keys} served run {used[:40]}; every run "
                              "needs new keys: `fedlearn he keygen --dir NEW_FOLDER`, then --he-keys NEW_FOLDER")

    def handle(self, task: SecureTask) -> SecureReply:
        """Answer one protocol step; a step out of order or against the protocol raises SecAggProtocolError."""
        cid = task.client_id
        if task.stage == "secagg-advertise":
            self._secagg[cid] = SecAggClient(cid, task.round)  # fresh keys and seeds every round
            data = self._secagg[cid].advertise()
        elif task.stage == "secagg-share":
            data = self._session(task).share_keys(task.data)
        elif task.stage == "secagg-unmask":
            data = self._session(task).unmask(task.data)
            del self._secagg[cid]
        elif task.stage == "he-decrypt":
            return SecureReply(task.round, cid, task.stage, {}, self._decrypt_sum(task))
        else:
            raise InvalidUpdateError(f"unknown secure-aggregation stage {task.stage!r}; update fedlearn on this client")
        return SecureReply(task.round, cid, task.stage, data)

    def _session(self, task: SecureTask | TrainTask) -> SecAggClient:
        session = self._secagg.get(task.client_id)
        if session is None or session.round != task.round:
            raise SecAggProtocolError(f"secure aggregation: no keys were advertised for round {task.round}")
        return session

    def _he_file(self, name: str) -> Path:
        if self.he_keys is None or not (self.he_keys / name).is_file():
            raise SecAggProtocolError(f"homomorphic encryption: no {name} here; give this client --he-keys DIR "
                                      "holding the files from `fedlearn he keygen`")
        return self.he_keys / name

    def _encrypt(self, task: TrainTask, result: TrainResult, rounding: np.random.Generator) -> TrainResult:
        """The client's fixed-point contribution and its check values, encrypted with the public key."""
        from fedlearn.privacy import he

        if self._public_context is None:
            self._public_context = he.load_public_context(self._he_file("public.ctx"))
        request = task.config["he"]
        fixed_point = FixedPoint.from_dict(request["fixed_point"])
        weight, extras = summed_weight_and_bits(request, result)
        encoded = fixed_point.encode(joined_arrays(request, result), weight, extras, rounding)
        checks = sum_check.check_values(self._key(), task.round, task.client_id)
        vector = np.concatenate([encoded.astype(np.float64), checks.astype(np.float64)])
        blob, sizes = join_blob(he.encrypt_vector(self._public_context, vector))
        # The sample count, loss and clip bit travel only inside the ciphertext.
        return replace(result, num_examples=0, arrays={"ciphertext": blob}, metrics={},
                       sealed={"he": True, "chunk_sizes": sizes})

    def _key(self) -> bytes:
        if self._group_key is None:
            self._group_key = sum_check.load_group_key(self._he_file(sum_check.GROUP_KEY_FILE).parent)
        return self._group_key

    def _decrypt_sum(self, task: SecureTask) -> torch.Tensor:
        """The key holder's answer: the exact integer sum, after checking it is the round's sum of the named clients.

        Any failed check burns these keys for this key holder (it decrypts nothing more) and refuses the task.
        """
        from fedlearn.privacy import he

        burned = self._he_file("public.ctx").parent / sum_check.BURNED_FILE
        if self._burned or burned.exists():
            raise SecAggProtocolError(f"homomorphic encryption: these keys are burned ({burned}: an earlier request "
                                      "was not an honest sum); generate new keys with `fedlearn he keygen`")
        if self._secret_context is None:  # only the key holder ever gets here
            self._secret_context = he.load_secret_context(self._he_file("secret.ctx"))
        try:
            fixed_point = FixedPoint.from_dict(task.data["fixed_point"])
            if fixed_point.bits > sum_check.MAX_BITS:  # larger sums could round differently with CKKS's error
                raise sum_check.SumCheckError(f"{fixed_point.bits}-bit sums are more than CKKS adds exactly")
            length = fixed_point.length + fixed_point.extras
            if task.data.get("length") != length + sum_check.CHECK_SLOTS:
                raise sum_check.SumCheckError("the decryption request's length does not match its fixed point")
            chunks = split_blob(task.blob, task.data["chunk_sizes"])
            values = he.decrypt_vector(self._secret_context, chunks, length + sum_check.CHECK_SLOTS)
            total = sum_check.verified_sum(values, self._key(), task.round, task.data.get("contributors"),
                                           fixed_point.modulus - 1)
        except (sum_check.SumCheckError, KeyError, TypeError, ValueError, InvalidUpdateError) as exc:
            reason = f"round {task.round}: {exc}"
            self._burned = True
            try:
                burned.write_text(reason + "\n")
            except OSError:  # a read-only key folder: this process still refuses from now on
                pass
            raise SecAggProtocolError(f"homomorphic encryption: refused to decrypt ({reason}); these keys decrypt "
                                      "nothing more: generate new keys with `fedlearn he keygen`") from None
        return torch.from_numpy(total)

    def seal(self, task: TrainTask, result: TrainResult, rounding: np.random.Generator,
             noise: PrivacyRandom | None = None, share_policy: SharePolicy | None = None) -> TrainResult:
        """The payload that leaves the client: masked or encrypted when the task asks for it, else unchanged.

        Under distributed DP (a ``ddgauss`` encoding) the client adds its noise share from ``noise``, after checking
        the round against its own ``share_policy``; a client with such a policy refuses a round without noise.
        """
        if "he" in task.config:
            if share_policy is not None:
                raise SecAggProtocolError("this client runs distributed DP, which needs secure aggregation, not --he")
            return self._encrypt(task, result, rounding)
        request = task.config.get("secagg")
        if request is None:
            return result
        doc = request["fixed_point"]
        vector = joined_arrays(request, result)
        if isinstance(doc, dict) and doc.get("kind") == "ddgauss":
            encoding = DiscreteGaussianEncoding.from_dict(doc)
            refusal = "this client has no distributed-DP policy" if share_policy is None else share_policy.check(
                encoding, vector.shape[0])
            if refusal is not None or noise is None:
                raise SecAggProtocolError(f"round {task.round}: {refusal or 'no noise source'}; refusing the task")
            encoded, bits = encoding.encode(vector, rounding, noise), encoding.bits
        else:
            if share_policy is not None:
                raise SecAggProtocolError(f"round {task.round}: the server asked for a secure sum without this "
                                          "client's distributed-DP noise share; refusing the task")
            fixed_point = FixedPoint.from_dict(doc)
            weight, extras = summed_weight_and_bits(request, result)
            encoded, bits = fixed_point.encode(vector, weight, extras, rounding), fixed_point.bits
        masked, rejected = self._session(task).mask(request, encoded, bits)
        signed = torch.from_numpy(masked.view(np.int32 if masked.dtype == np.uint32 else np.int64))
        # The sample count, loss and clip bit travel only inside the masked sum.
        return replace(result, num_examples=0, arrays={"masked": signed}, metrics={},
                       sealed={"secagg": True, "secagg_rejected": rejected})


def summed_weight_and_bits(request: dict, result: TrainResult) -> tuple[int, list[int]]:
    """The client's weight in a hidden sum (its sample count, or 1) and the 0/1 metrics summed beside it."""
    weight = result.num_examples if request["weighting"] == "examples" else 1
    return weight, [int(result.metrics.get(name, 0.0) >= 0.5) for name in request.get("extras", [])]


def joined_arrays(request: dict, result: TrainResult) -> np.ndarray:
    """The result's arrays named in the request, joined in that order as one float64 vector."""
    names = request.get("arrays", ["update"])
    missing = [n for n in names if n not in result.arrays]
    if missing:
        raise InvalidUpdateError(f"secure sum needs array {missing[0]!r}, which local training did not produce")
    vector = np.concatenate([result.arrays[n].double().reshape(-1).numpy() for n in names])
    if not np.isfinite(vector).all():  # no rounding maps NaN to an integer honestly: it would corrupt the sum
        raise TaskRefused(f"client {result.client_id}: local training produced non-finite values in round "
                          f"{result.round}; it sends nothing this round")
    return vector
