"""CKKS aggregation: key files and their roles, the server's inability to decrypt, exact-within-bound sums, refusals."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import torch

from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.privacy.he import (
    CKKSParams,
    EncryptedSum,
    HEKeyFiles,
    _protobuf_fields,  # to find the secret key's bytes in secret.ctx
    ckks_error_bound,
    context_holds_secret_key,
    context_params,
    decrypt_vector,
    encrypt_vector,
    generate_keys,
    load_key_info,
    load_public_context,
    load_secret_context,
    num_chunks,
    precision_check,
    public_context_fingerprint,
)

SLOTS = CKKSParams().slots


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> HEKeyFiles:
    return generate_keys(tmp_path_factory.mktemp("he") / "keys")


def test_keygen_writes_a_public_and_a_0600_secret_context_and_their_fingerprint(keys: HEKeyFiles) -> None:
    assert stat.S_IMODE(keys.secret_context.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys.public_context.parent.stat().st_mode) == 0o700
    public = keys.public_context.read_bytes()
    assert keys.fingerprint == hashlib.sha256(public).hexdigest()
    info = json.loads(keys.info.read_text())
    assert (info["scheme"], info["poly_modulus_degree"], info["coeff_mod_bit_sizes"], info["scale_bits"]) == (
        "CKKS", 8192, [60, 40, 40], 40)
    assert load_key_info(keys.info) == (CKKSParams(), keys.fingerprint)
    assert not context_holds_secret_key(keys.public_context)
    assert context_holds_secret_key(keys.secret_context)
    # both parties can check they hold the keygen's keys; addition needs no relinearization or Galois keys
    public_ctx, secret_ctx = load_public_context(keys.public_context), load_secret_context(keys.secret_context)
    assert public_context_fingerprint(secret_ctx) == public_context_fingerprint(public_ctx) == keys.fingerprint
    assert not any(c.has_relin_keys() or c.has_galois_keys() for c in (public_ctx, secret_ctx))
    assert context_params(public_ctx) == CKKSParams()


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = generate_keys(tmp_path)
    group_key = first.group_key.read_bytes()
    with pytest.raises(ConfigError, match=r"already holds public\.ctx, secret\.ctx, he\.json, group\.key; .*--force"):
        generate_keys(tmp_path)
    assert hashlib.sha256(first.public_context.read_bytes()).hexdigest() == first.fingerprint  # untouched
    second = generate_keys(tmp_path, force=True)
    assert second.fingerprint != first.fingerprint
    assert len(group_key) == 32 and second.group_key.read_bytes() != group_key  # a new group key with new keys
    assert stat.S_IMODE(second.secret_context.stat().st_mode) == 0o600
    assert stat.S_IMODE(second.group_key.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group.key", "he.json", "public.ctx", "secret.ctx"]


def test_the_server_side_holds_no_secret_key_and_cannot_decrypt(keys: HEKeyFiles) -> None:
    with pytest.raises(ConfigError, match=r"^this context holds the secret key; give the server public\.ctx$"):
        load_public_context(keys.secret_context)
    with pytest.raises(ConfigError, match="has no secret key"):
        load_secret_context(keys.public_context)
    public = load_public_context(keys.public_context)
    with pytest.raises(ConfigError, match="holds the secret key"):
        EncryptedSum(load_secret_context(keys.secret_context))

    total = EncryptedSum(public, length=10)
    total.add(encrypt_vector(public, np.arange(10.0)))
    # even asked to, TenSEAL cannot write a secret key the server's context does not have
    assert not context_holds_secret_key(total.context.serialize(save_secret_key=True))
    # the secret key's serialized bytes appear nowhere in the server's file
    private_part = dict(_protobuf_fields(keys.secret_context.read_bytes()))[3]
    secret_key = dict(_protobuf_fields(private_part))[1]
    assert len(secret_key) > 1000 and secret_key not in keys.public_context.read_bytes()

    summed = total.serialize()
    with pytest.raises(ValueError, match="secret_key"):  # TenSEAL itself refuses
        ts.ckks_vector_from(public, summed[0]).decrypt()
    with pytest.raises(ConfigError, match="^this context has no secret key; decrypt with secret.ctx"):
        decrypt_vector(public, summed, 10)
    assert np.abs(decrypt_vector(load_secret_context(keys.secret_context), summed, 10) - np.arange(10.0)).max() < 1e-6


def test_encrypted_sum_equals_the_plain_sum_within_the_error_bound(keys: HEKeyFiles) -> None:
    public, secret = load_public_context(keys.public_context), load_secret_context(keys.secret_context)
    generator = torch.Generator().manual_seed(0)
    updates = [torch.randn(10_000, generator=generator) * 0.1 for _ in range(10)]  # float32, as clients send
    total = EncryptedSum(public, length=10_000)
    for update in updates:
        total.add(encrypt_vector(public, update))
    assert total.count == 10
    decrypted = decrypt_vector(secret, total.serialize(), 10_000)
    plain = torch.stack(updates).double().sum(0).numpy()
    max_abs = max(float(u.abs().max()) for u in updates)
    error = np.abs(decrypted - plain).max()
    assert decrypted.dtype == np.float64 and decrypted.shape == (10_000,)
    assert 0 < error <= ckks_error_bound(CKKSParams(), 10, max_abs)


def test_vectors_of_any_length_split_into_slot_sized_chunks(keys: HEKeyFiles) -> None:
    public, secret = load_public_context(keys.public_context), load_secret_context(keys.secret_context)
    rng = np.random.default_rng(1)
    for length, chunks in ((1, 1), (SLOTS, 1), (SLOTS + 1, 2), (2 * SLOTS + 5, 3)):
        vector = rng.uniform(-1, 1, length)
        encrypted = encrypt_vector(public, vector)
        assert len(encrypted) == num_chunks(length, CKKSParams()) == chunks
        total = EncryptedSum(public)  # the first client's chunks fix the length
        total.add(encrypted)
        total.add(encrypt_vector(public, vector))
        assert total.length == length
        decrypted = decrypt_vector(secret, total.serialize(), length)
        assert np.abs(decrypted - 2 * vector).max() <= ckks_error_bound(CKKSParams(), 2, 1.0)


def test_garbage_or_tampered_ciphertexts_are_refused_and_leave_the_sum_unchanged(keys: HEKeyFiles) -> None:
    public, secret = load_public_context(keys.public_context), load_secret_context(keys.secret_context)
    length = SLOTS + 100
    good = encrypt_vector(public, np.ones(length))
    total = EncryptedSum(public, length=length)
    total.add(good)

    flipped_header = bytearray(good[0])
    flipped_header[10] ^= 0x10  # inside SEAL's header
    altered_size = bytearray(good[0])
    altered_size[3] ^= 0x10  # the protobuf's size field: the chunk now claims 6144 values
    other_ring = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    other_ring.global_scale = 2**20
    bad_first_chunks = {
        "garbage": b"\x00garbage" * 100,
        "empty": b"",
        "truncated": good[0][: len(good[0]) // 2],
        "flipped header": bytes(flipped_header),
        "altered size": bytes(altered_size),
        "other parameters": ts.ckks_vector(other_ring, [1.0] * 10).serialize(),
        "wrong size": encrypt_vector(public, np.ones(SLOTS - 1))[0],
        "not bytes": "a string",
    }
    # CKKS is not authenticated: a flipped bit inside the ciphertext may load and decrypt to noise, which only the
    # transport's authentication prevents; what cannot parse, or is not one fresh ciphertext of the right shape, fails
    for name, chunk in bad_first_chunks.items():
        with pytest.raises(InvalidUpdateError, match=r"^HE chunk 0 .*; drop this client's update$"):
            total.add([chunk, good[1]])
        assert total.count == 1, name
    with pytest.raises(InvalidUpdateError, match="^HE chunk 1 is not one ciphertext of 100 values"):
        total.add([good[0], encrypt_vector(public, np.ones(101))[0]])
    assert total.count == 1
    assert np.abs(decrypt_vector(secret, total.serialize(), length) - 1.0).max() < 1e-6


def test_mismatched_chunk_counts_are_refused(keys: HEKeyFiles) -> None:
    public, secret = load_public_context(keys.public_context), load_secret_context(keys.secret_context)
    three = encrypt_vector(public, np.ones(2 * SLOTS + 1))
    fixed = EncryptedSum(public, length=2 * SLOTS + 1)
    with pytest.raises(InvalidUpdateError, match=r"^expected 3 HE chunks for a vector of 8193 values, got 2;"):
        fixed.add(three[:2])
    inferred = EncryptedSum(public)
    with pytest.raises(InvalidUpdateError, match="has no chunks"):
        inferred.add([])
    inferred.add(three)
    with pytest.raises(InvalidUpdateError, match="expected 3 HE chunks .* got 4"):
        inferred.add([*three, three[-1]])
    with pytest.raises(InvalidUpdateError, match="expected 2 HE chunks .* got 3"):
        decrypt_vector(secret, inferred.serialize(), SLOTS + 1)


def test_encrypt_refuses_what_ckks_cannot_carry(keys: HEKeyFiles) -> None:
    public = load_public_context(keys.public_context)
    for bad, message in ((np.ones((2, 3)), "1-D"), (np.array([]), "non-empty"), (np.array([1.0, np.nan]), "NaN"),
                         (np.array([1e30]), "do not fit CKKS")):
        with pytest.raises(InvalidUpdateError, match=message):
            encrypt_vector(public, bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"poly_modulus_degree": 5000}, "poly_modulus_degree must be one of"),
        ({"coeff_mod_bit_sizes": (60,)}, "at least two prime sizes"),
        ({"coeff_mod_bit_sizes": (61, 40, 40)}, "from 20 to 60 bits"),
        ({"coeff_mod_bit_sizes": (60, 60, 60, 60)}, "total 240 bits, above the 218"),
        ({"poly_modulus_degree": 4096}, "total 140 bits, above the 109"),
        ({"coeff_mod_bit_sizes": (40, 40), "scale_bits": 40}, r"scale_bits must be from 20 to 20"),
        ({"scale_bits": True}, "scale_bits must be"),
    ],
)
def test_invalid_parameters_are_refused_with_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        CKKSParams(**kwargs)
    assert "\n" not in str(raised.value)


def test_parameters_seal_cannot_build_and_overflowing_sums_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SEAL rejects"):  # too few 20-bit primes = 1 mod 2N for N = 32768
        generate_keys(tmp_path, CKKSParams(32768, (20, 20, 20), 20))
    assert not any(tmp_path.iterdir())
    small = CKKSParams(8192, (60, 40), 40)  # one data prime: 2^59 / 2^40 leaves 2^19 for a sum
    assert ckks_error_bound(small, 10, 1e4) < 1e-6
    with pytest.raises(ConfigError, match="overflows CKKS"):
        ckks_error_bound(small, 10, 1e5)


def test_other_parameters_round_trip_through_the_key_files(tmp_path: Path) -> None:
    params = CKKSParams(8192, (60, 40), 30)
    files = generate_keys(tmp_path, params)
    public = load_public_context(files.public_context, expected_fingerprint=files.fingerprint)
    assert context_params(public) == params == load_key_info(files.info)[0]
    with pytest.raises(ConfigError, match="does not match the expected key fingerprint"):
        load_public_context(files.public_context, expected_fingerprint="0" * 64)
    with pytest.raises(ConfigError, match="not a serialized TenSEAL context"):
        context_holds_secret_key(b"\xff\xff\xff")
    with pytest.raises(ConfigError, match="cannot read HE context"):
        load_public_context(tmp_path / "missing.ctx")


def test_precision_check_confirms_the_bound_and_the_noise_model() -> None:
    report = precision_check(CKKSParams(), num_summands=10, length=10_000, seed=0)
    assert report["within_bound"] and report["max_abs_error"] <= report["bound"]
    # a fresh ciphertext's error has standard deviation N / (6 * 2^scale_bits)
    assert report["fresh_noise_std"] == pytest.approx(report["predicted_fresh_noise_std"], rel=0.1)
    assert report["bound"] == ckks_error_bound(CKKSParams(), 10, 1.0)


def test_contexts_not_made_by_keygen_are_refused() -> None:
    bfv = ts.context(ts.SCHEME_TYPE.BFV, 4096, 1032193)
    no_scale = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40])
    symmetric = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 40],
                           encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
    symmetric.global_scale = 2**40
    for context, message in ((bfv, "is not CKKS"), (no_scale, r"scale \(unset\) is not a power of two"),
                             (symmetric, "has no public key")):
        with pytest.raises(ConfigError, match=message):
            load_public_context(context.serialize(save_secret_key=False, save_galois_keys=False))
    with pytest.raises(ConfigError, match="is not a TenSEAL context"):
        load_secret_context(b"\x1a\x03\x0a\x01A")  # a protobuf with a "secret key" but no context
