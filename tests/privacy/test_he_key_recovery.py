"""The passive CKKS key-recovery attack (Li and Micciancio, EUROCRYPT 2021) against a real `--he ckks` round.

The server holds the summed ciphertext (c0, c1) it sent the key holder and whatever the key holder answered. Given a
full-precision decryption p = c0 + c1 * s of it, the server solves s = (p - c0) / c1 coefficient by coefficient in
the NTT domain of each prime. The key holder now answers only the exact integer sum, so the same solve, fed the
integers re-encoded, must miss the key; fed a raw decryption of that same ciphertext, it recovers the key (the
control showing the attack is real).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts  # a dependency of fedlearn: the attack test never skips
import tenseal.sealapi as sealapi
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.secure import SecureClients
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.privacy import he
from fedlearn.privacy.secagg.client import SecAggProtocolError
from fedlearn.privacy.sum_check import CHECK_SLOTS, expected_checks, load_group_key
from fedlearn.protocol.codec import decode, encode, join_blob, split_blob
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Message, SecureReply, SecureTask
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.secure import HomomorphicRound
from fedlearn.strategies import FedAvg


class Recorder(InProcessRuntime):
    """In-process clients behind an encoded boundary; keeps the decryption request and the key holder's reply."""

    def __init__(self, app: ClientApp) -> None:
        super().__init__(app)
        self.request: SecureTask | None = None
        self.reply: SecureReply | None = None
        self.uploads: dict[str, list[bytes]] = {}  # each client's ciphertexts, as the server received them

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        for task in tasks:
            if isinstance(task, SecureTask):
                self.request = decode(encode(task))
            for answer in super().deliver([decode(encode(task))]):
                answer = decode(encode(answer))
                if isinstance(answer, SecureReply):
                    self.reply = answer
                else:
                    self.uploads[answer.client_id] = split_blob(answer.arrays["ciphertext"],
                                                                answer.sealed["chunk_sizes"])
                yield answer


@pytest.fixture(scope="module")
def ckks_round(tmp_path_factory):
    """One real CKKS FedAvg round of 4 clients: (key folder, the decryption request, the key holder's reply)."""
    keys = tmp_path_factory.mktemp("he")
    he.generate_keys(keys)
    torch.manual_seed(0)
    trainer = LocalTrainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), device="cpu")
    g = torch.Generator().manual_seed(0)
    clients = {f"c{i}": ClientData(ArrayDataset(torch.randn(12, 1, 8, 8, generator=g),
                                                torch.randint(0, 10, (12,), generator=g))) for i in range(4)}
    runtime = Recorder(ClientApp(trainer, clients, secure=SecureClients(keys)))
    loop = RoundLoop(FedAvg(local=LocalConfig(local_epochs=1, batch_size=4, lr=0.1)), runtime, trainer.vector.spec,
                     trainer.vector.read(),
                     sums=HomomorphicRound(str(keys / "public.ctx"), clip=1.0, max_weight=12))
    assert loop.run_round()["aggregated"]
    return keys, runtime.request, runtime.reply, runtime.uploads


class Ring:
    """The coefficients of SEAL objects, read through TenSEAL's SEAL bindings (NTT form, one row per prime)."""

    def __init__(self, context) -> None:
        self.context = context
        self.seal = context.seal_context().data
        self.folder = Path(tempfile.mkdtemp())

    def ciphertext(self, chunk: bytes):
        """The first summed ciphertext as a SEAL object, and its (c0, c1) coefficients."""
        vector = ts.ckks_vector_from(self.context, chunk)
        vector.ciphertext()[0].save(str(self.folder / "ct"))
        ciphertext = sealapi.Ciphertext()
        ciphertext.load(self.seal, str(self.folder / "ct"))
        return ciphertext, self._coefficients(ciphertext).reshape(2, len(self.primes(ciphertext)), -1)

    def primes(self, ciphertext) -> list[int]:
        return [m.value() for m in self.seal.get_context_data(ciphertext.parms_id()).parms().coeff_modulus()]

    def secret_key(self, secret_context) -> np.ndarray:
        secret_context.secret_key().data.save(str(self.folder / "sk"))
        key = sealapi.SecretKey()
        key.load(self.seal, str(self.folder / "sk"))
        return self._coefficients(key.data()).reshape(-1, self.context_degree)

    def raw_decryption(self, ciphertext, secret_context) -> np.ndarray:
        """What a key holder returning a full-precision decryption leaks: p = c0 + c1 * s."""
        key = sealapi.SecretKey()
        secret_context.secret_key().data.save(str(self.folder / "sk"))
        key.load(self.seal, str(self.folder / "sk"))
        plain = sealapi.Plaintext()
        sealapi.Decryptor(self.seal, key).decrypt(ciphertext, plain)
        return self._coefficients(plain).reshape(len(self.primes(ciphertext)), -1)

    def encoded(self, values: np.ndarray, ciphertext) -> np.ndarray:
        """The server re-encoding what it was told the ciphertext decrypts to, at the ciphertext's level and scale."""
        plain = sealapi.Plaintext()
        sealapi.CKKSEncoder(self.seal).encode([float(v) for v in values], ciphertext.parms_id(), ciphertext.scale,
                                              plain)
        return self._coefficients(plain).reshape(len(self.primes(ciphertext)), -1)

    @property
    def context_degree(self) -> int:
        return he.context_params(self.context).poly_modulus_degree

    @staticmethod
    def _coefficients(obj) -> np.ndarray:
        array = obj.dyn_array()
        return np.array([array[i] for i in range(array.size())], dtype=object)


def solve_for_key(plain: np.ndarray, c: np.ndarray, primes: list[int]) -> np.ndarray:
    """Li-Micciancio: s = (p - c0) / c1 mod q, coefficient-wise in the NTT domain of each prime."""
    return np.array([[(int(p) - int(c0)) * pow(int(c1), -1, q) % q for p, c0, c1 in zip(plain[j], c[0, j], c[1, j])]
                     for j, q in enumerate(primes)], dtype=object)


def test_the_key_holders_answer_no_longer_gives_the_server_the_secret_key(ckks_round) -> None:
    keys, request, reply, _ = ckks_round
    public, secret = he.load_public_context(keys / "public.ctx"), he.load_secret_context(keys / "secret.ctx")
    ring = Ring(public)
    ciphertext, c = ring.ciphertext(split_blob(request.blob, request.data["chunk_sizes"])[0])
    primes = ring.primes(ciphertext)
    true_key = ring.secret_key(secret)[: len(primes)]
    slots = he.context_params(public).slots
    # What the server receives: exact integers, the same values whatever the CKKS error was. Grant it the check
    # values too (it cannot compute them without group.key), so the message it re-encodes is exactly the plaintext.
    assert reply.blob.dtype == torch.int64 and reply.blob.numel() + CHECK_SLOTS <= slots  # one chunk holds it all
    checks = expected_checks(load_group_key(keys), request.round, request.data["contributors"])
    answer = np.concatenate([reply.blob.numpy(), checks])
    recovered = solve_for_key(ring.encoded(answer, ciphertext), c, primes)
    assert sum(int((recovered[j] == true_key[j]).sum()) for j in range(len(primes))) <= 2  # chance: ~2 of 16,384
    assert not np.isin(recovered[0], [0, 1, primes[0] - 1]).all()  # not even a ternary polynomial
    # The reply is the decryption with its error rounded away: the error was there, and none of it reached the server.
    chunks = split_blob(request.blob, request.data["chunk_sizes"])
    decrypted = he.decrypt_vector(secret, chunks, request.data["length"])
    error = decrypted - np.rint(decrypted)
    assert 0 < np.abs(error).max() < 1e-3
    assert np.array_equal(np.rint(decrypted[: reply.blob.numel()]).astype(np.int64), reply.blob.numpy())
    # The control: a raw decryption of that very ciphertext hands the server every key coefficient.
    leaked = solve_for_key(ring.raw_decryption(ciphertext, secret), c, primes)
    assert all((leaked[j] == true_key[j]).all() for j in range(len(primes)))


def _ask(keys: Path, request: SecureTask, chunks: list[bytes] | None = None, **changes) -> SecureReply:
    """The key holder's answer to ``request`` with its ciphertext replaced by ``chunks`` and fields changed."""
    blob, sizes = join_blob(chunks) if chunks is not None else (request.blob, request.data["chunk_sizes"])
    task = SecureTask(changes.pop("round", request.round), request.client_id, request.stage,
                      {**request.data, "chunk_sizes": sizes, **changes}, blob)
    return SecureClients(keys).handle(task)


def _summed(public, *parts: list[bytes]) -> list[bytes]:
    total = he.EncryptedSum(public)
    for chunks in parts:
        total.add(chunks)
    return total.serialize()


def test_the_key_holder_decrypts_only_the_rounds_sum_of_the_clients_it_names(ckks_round, tmp_path) -> None:
    keys, request, reply, uploads = ckks_round
    public = he.load_public_context(keys / "public.ctx")
    honest = request.data["contributors"]
    assert sorted(honest) == sorted(uploads) == ["c0", "c1", "c2", "c3"]
    offset = np.zeros(request.data["length"])
    offset[0] = 0.5  # rounding 0.5 + error would tell the server the error's sign
    forgeries = {
        "one client's update named as two clients' sum": ({"contributors": ["c0", "c1"]}, uploads["c0"]),
        "one client's update as itself": ({"contributors": ["c0"]}, uploads["c0"]),
        "c0 counted twice": ({"contributors": ["c0", "c1"]}, _summed(public, uploads["c0"], uploads["c0"])),
        "the sum less one client": ({}, _summed(public, *(uploads[c] for c in honest[:-1]))),
        "the sum under the next round's number": ({"round": request.round + 1}, None),
        "the sum plus a half": ({}, _summed(public, split_blob(request.blob, request.data["chunk_sizes"]),
                                            he.encrypt_vector(public, offset))),
        "a repeated contributor": ({"contributors": ["c0", "c0", "c1", "c2"]}, None),
        "64-bit sums": ({"fixed_point": {**request.data["fixed_point"], "bits": 64}}, None),
    }
    expected = {"one client's update as itself": "at least 2", "the sum plus a half": "does not decrypt to integers",
                "a repeated contributor": "distinct client ids", "64-bit sums": "more than CKKS adds exactly"}
    for case, (changes, chunks) in forgeries.items():
        folder = tmp_path / case.replace(" ", "-").replace("'", "")
        shutil.copytree(keys, folder)
        with pytest.raises(SecAggProtocolError, match="refused to decrypt") as refused:
            _ask(folder, request, chunks, **changes)
        assert expected.get(case, "is not the round-") in str(refused.value), case
        # A refusal burns the keys: even the honest sum is refused from now on, so the server learns one bit at most.
        with pytest.raises(SecAggProtocolError, match="burned"):
            _ask(folder, request)
    honest_folder = tmp_path / "honest"
    shutil.copytree(keys, honest_folder)
    assert torch.equal(_ask(honest_folder, request).blob, reply.blob)  # the same request, unforged: answered


def test_he_keys_serve_one_run_only(tmp_path) -> None:
    """Keys are new for every run: the first run to use a key folder is recorded in it, and a second is refused."""
    from fedlearn.errors import ConfigError

    keys = tmp_path / "keys"
    he.generate_keys(keys)
    SecureClients(keys).bind_run("run-a")
    SecureClients(keys).bind_run("run-a")  # the same run again (a restart or --resume): fine
    with pytest.raises(ConfigError, match="served run run-a; every run needs new keys: `fedlearn he keygen"):
        SecureClients(keys).bind_run("run-b")
    SecureClients(None).bind_run("run-b")  # no HE: nothing to bind


def test_a_second_simulated_run_with_the_same_keys_is_refused(tmp_path, capsys) -> None:
    from fedlearn.cli import main

    keys = tmp_path / "keys"
    he.generate_keys(keys)
    args = ["run", "--quiet", "--he", "ckks", "--he-keys", str(keys), "--rounds", "1", "--clients", "3",
            "--model", "mcmahan-2nn", "--local-epochs", "1"]
    assert main([*args, "--output", str(tmp_path / "first")]) == 0
    assert main([*args, "--output", str(tmp_path / "second")]) == 2
    assert "every run needs new keys" in capsys.readouterr().err
    assert not (tmp_path / "second").exists()  # the refused run leaves no folder behind
    assert main(["run", "--quiet", "--resume", str(tmp_path / "first"), "--rounds", "2"]) == 0  # its own run: fine
