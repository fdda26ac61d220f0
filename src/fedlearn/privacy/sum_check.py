"""Exact, verified decryption of a homomorphic sum, so the key holder is never a decryption oracle for the server.

Two rules close the CKKS key-recovery attack (Li and Micciancio, EUROCRYPT 2021), in which a server that sees raw
approximate decryptions solves for the secret key from their error terms:

- **Integers only.** Clients encrypt fixed-point integers (``FixedPoint``); the key holder rounds each decrypted value
  to the nearest integer and returns only those integers. CKKS's error on such a sum is below 2e-3 while the
  rounding tolerance is 1/8, so the reply is exactly the plaintext sum: a function of the plaintexts alone, with no
  trace of the error, and so of the key, in it. A value farther than 1/8 from an integer, or outside the range an
  honest sum can take, is refused (rounding near a half would leak the error's sign).
- **The sum of the named clients, or nothing.** Each client adds CHECK_SLOTS pseudo-random integers,
  HMAC-SHA256(group key, round, client id), beside its contribution. The group key (``group.key``) is written with the
  CKKS keys for the clients only; the server never holds it. The key holder decrypts a ciphertext only if its check
  slots equal the sum of the named contributors' values, at least two of them: without the key, the server's only
  passing ciphertext is the plain sum of those clients' ciphertexts plus values it chose (probability of a forgery
  2^-(CHECK_SLOTS * CHECK_BITS)), never one client's update or a combination counting someone twice.

A key holder that refuses stops decrypting altogether (``BURNED_FILE``): a refusal is itself one bit the server
learns, so it learns at most one. Generate new keys for the next run.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

import numpy as np

from fedlearn.errors import ConfigError, FedLearnError

GROUP_KEY_FILE = "group.key"
BURNED_FILE = "BURNED"
RUN_FILE = "RUN"  # the run these keys serve: a client refuses them for any other run
CHECK_SLOTS = 8
CHECK_BITS = 16
MIN_CONTRIBUTORS = 2  # a "sum" of one is that client's update
INTEGER_TOLERANCE = 0.125  # an honest sum decrypts within ~2e-3 of its integers (ckks_error_bound, FixedPoint bits)
MAX_BITS = 30  # CKKS adds integers below 2^30 within 1.1e-3 of exact; above, its float error could reach the rounding
KEY_BYTES = 32


class SumCheckError(FedLearnError):
    """A ciphertext the key holder must not decrypt: not the named clients' sum, or not a sum of integers."""


def new_group_key() -> bytes:
    """A fresh group key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def load_group_key(folder: str | os.PathLike) -> bytes:
    """The clients' group key from ``folder``/group.key; ConfigError saying how to get one when it is missing."""
    path = Path(folder) / GROUP_KEY_FILE
    try:
        key = path.read_bytes()
    except OSError:
        raise ConfigError(f"homomorphic encryption: no readable {path}; every client needs the group.key written by "
                          "`fedlearn he keygen` (keys from an older release have none: generate new ones)") from None
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{path} holds {len(key)} bytes, not {KEY_BYTES}; copy it again from the keygen folder")
    return key


def check_values(key: bytes, rnd: int, client_id: str) -> np.ndarray:
    """One client's CHECK_SLOTS check integers for round ``rnd``, each in [0, 2^CHECK_BITS)."""
    message = f"fedlearn-sum-check|{int(rnd)}|{client_id}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    words = np.frombuffer(digest[: CHECK_SLOTS * CHECK_BITS // 8], dtype=">u2")
    return words.astype(np.int64)


def expected_checks(key: bytes, rnd: int, contributors: list[str]) -> np.ndarray:
    """What the check slots of the honest sum of ``contributors``' ciphertexts decrypt to."""
    total = np.zeros(CHECK_SLOTS, dtype=np.int64)
    for client_id in contributors:
        total += check_values(key, rnd, client_id)
    return total


def verified_sum(values: np.ndarray, key: bytes, rnd: int, contributors: object, value_limit: int) -> np.ndarray:
    """The exact integer sum (check slots removed) of a decrypted vector, or SumCheckError.

    ``values``: the decryption, data then CHECK_SLOTS check values; ``value_limit``: the largest integer an honest
    data value can reach (2^bits - 1 of the round's FixedPoint).
    """
    if (not isinstance(contributors, list) or not all(isinstance(c, str) and c for c in contributors)
            or len(set(contributors)) != len(contributors)):
        raise SumCheckError("the decryption request does not name its contributors as distinct client ids")
    if len(contributors) < MIN_CONTRIBUTORS:
        raise SumCheckError(f"the ciphertext is said to hold {len(contributors)} contribution(s); a sum needs at least "
                            f"{MIN_CONTRIBUTORS}, or it is one client's update")
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size <= CHECK_SLOTS or not np.isfinite(values).all():
        raise SumCheckError("the decrypted vector is not a finite sum with check values")
    integers = np.rint(values)
    if float(np.max(np.abs(values - integers))) > INTEGER_TOLERANCE:
        raise SumCheckError("the ciphertext does not decrypt to integers, as every client's contribution does")
    data, checks = integers[:-CHECK_SLOTS], integers[-CHECK_SLOTS:]
    if data.min() < 0 or data.max() > value_limit or checks.min() < 0 or checks.max() >= (
            len(contributors) << CHECK_BITS):
        raise SumCheckError("the decrypted values are outside the range an honest sum can take")
    if not np.array_equal(checks.astype(np.int64), expected_checks(key, rnd, contributors)):
        raise SumCheckError(f"the ciphertext is not the round-{rnd} sum of the {len(contributors)} clients it names")
    return data.astype(np.int64)
