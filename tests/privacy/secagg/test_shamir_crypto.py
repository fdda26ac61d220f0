"""Shamir sharing, the authenticated share channel and the mask PRG."""

import numpy as np
import pytest

from fedlearn.privacy.secagg import crypto, shamir


def test_any_t_shares_reconstruct_and_t_minus_one_do_not():
    secret = shamir.to_int(bytes(range(32)))
    shares = shamir.split(secret, 5, range(1, 11))
    for start in range(6):
        subset = {x: shares[x] for x in list(shares)[start : start + 5]}
        assert shamir.reconstruct(subset) == secret
    four = {x: shares[x] for x in list(shares)[:4]}
    wrong = shamir.reconstruct(four)
    assert wrong != secret
    with pytest.raises(ValueError):
        shamir.to_bytes(wrong)  # not even a 32-byte value: t - 1 shares say nothing usable


def test_split_refuses_bad_parameters():
    with pytest.raises(ValueError):
        shamir.split(1, 4, [1, 2, 3])
    with pytest.raises(ValueError):
        shamir.split(1, 2, [1, 1, 2])
    with pytest.raises(ValueError):
        shamir.split(1, 2, [0, 1])


def test_agreement_is_symmetric_and_bound_to_context():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    k1 = crypto.agree(a, crypto.public_bytes(b), b"ctx")
    assert k1 == crypto.agree(b, crypto.public_bytes(a), b"ctx")
    assert k1 != crypto.agree(a, crypto.public_bytes(b), b"other")


def test_share_channel_rejects_tampering_and_misrouting():
    key = bytes(32)
    message = crypto.encrypt(key, b"share", b"1|a|b")
    assert crypto.decrypt(key, message, b"1|a|b") == b"share"
    flipped = bytearray(message)
    flipped[20] ^= 1
    with pytest.raises(crypto.ShareDecryptionError):
        crypto.decrypt(key, bytes(flipped), b"1|a|b")
    with pytest.raises(crypto.ShareDecryptionError):
        crypto.decrypt(key, message, b"1|a|c")  # relayed to the wrong client


@pytest.mark.parametrize("bits", [16, 32, 40, 64])
def test_prg_is_deterministic_and_within_range(bits):
    seed = bytes(range(32))
    a, b = crypto.prg(seed, 1000, bits), crypto.prg(seed, 1000, bits)
    assert np.array_equal(a, b)
    assert int(a.max()) < 2**bits
    assert not np.array_equal(a, crypto.prg(bytes(32), 1000, bits))
