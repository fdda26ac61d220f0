"""CKKS homomorphic-encryption aggregation with TenSEAL: clients encrypt, the server only adds, a key holder decrypts.

Roles and files (written by ``generate_keys``, i.e. ``fedlearn he keygen``):

- ``public.ctx``: parameters and the public key, no secret key. Clients encrypt with it and the server adds with it;
  ``load_public_context`` refuses a context that carries a secret key, so the server can never decrypt.
- ``secret.ctx``: the same plus the secret key, mode 0600, for the key holder only (``load_secret_context``).
- ``he.json``: the parameters and the SHA-256 fingerprint of ``public.ctx``, so parties can check they hold the same
  keys.
- ``group.key``: 32 random bytes, mode 0600, for every client and never the server: the key of the check values
  (``sum_check``) by which the key holder verifies that what it decrypts is the round's sum.

The key holder returns only exact integer sums that passed those checks (``sum_check.verified_sum``), never a raw
CKKS decryption: raw decryptions carry the error term from which a server recovers the secret key (Li and
Micciancio, EUROCRYPT 2021).

An update is a flat float vector; ``encrypt_vector`` packs it into ciphertexts of ``poly_modulus_degree / 2`` slots
each (batched CKKS) and returns each ciphertext serialized. Only additions happen, so no relinearization or Galois
keys exist anywhere. CKKS is not authenticated: a well-formed ciphertext with altered coefficients decrypts to noise,
so the transport (TLS with client authentication) must vouch for who sent what.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlearn.errors import ConfigError, FedLearnError, InvalidUpdateError
from fedlearn.privacy.sum_check import GROUP_KEY_FILE, new_group_key

if TYPE_CHECKING:
    import tenseal as ts
    import torch

PUBLIC_CONTEXT_FILE = "public.ctx"
SECRET_CONTEXT_FILE = "secret.ctx"
KEY_INFO_FILE = "he.json"

# SEAL's largest total coefficient-modulus size for 128-bit security (HomomorphicEncryption.org standard, ternary
# secret), the table SEAL itself enforces: parameters above it give a context SEAL refuses to use.
MAX_COEFF_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
MIN_PRIME_BITS, MAX_PRIME_BITS = 20, 60  # SEAL takes at most 60-bit primes; below 20 few NTT-friendly primes exist
MIN_INTEGER_BITS = 20  # bits of the data modulus left above the scale for the integer part of a sum
ERROR_NOISE_BOUND = 21  # SEAL's error sampler (centered binomial, sigma 3.2) never leaves [-21, 21]
FAILURE_LOG2 = -40  # ckks_error_bound fails with probability below 2^-39 per value and 2^-40 per key


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters: ring degree, coefficient-modulus prime sizes (the last is SEAL's special prime) and scale."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        n, bits, scale = self.poly_modulus_degree, tuple(self.coeff_mod_bit_sizes), self.scale_bits
        object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if not _is_int(n) or n not in MAX_COEFF_BITS_128:
            raise ConfigError(f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)} (got {n!r})")
        if len(bits) < 2 or not all(_is_int(b) and MIN_PRIME_BITS <= b <= MAX_PRIME_BITS for b in bits):
            raise ConfigError(f"coeff_mod_bit_sizes must list at least two prime sizes from {MIN_PRIME_BITS} to "
                              f"{MAX_PRIME_BITS} bits, the last being the special prime (got {list(bits)})")
        if sum(bits) > MAX_COEFF_BITS_128[n]:
            raise ConfigError(f"coeff_mod_bit_sizes {list(bits)} total {sum(bits)} bits, above the "
                              f"{MAX_COEFF_BITS_128[n]} that 128-bit security allows for poly_modulus_degree {n}; "
                              "use fewer or smaller primes, or a larger degree")
        if not _is_int(scale) or not MIN_PRIME_BITS <= scale <= sum(bits[:-1]) - MIN_INTEGER_BITS:
            raise ConfigError(f"scale_bits must be from {MIN_PRIME_BITS} to {sum(bits[:-1]) - MIN_INTEGER_BITS} "
                              f"(the data primes {list(bits[:-1])} minus {MIN_INTEGER_BITS} bits for the integer "
                              f"part of a sum); got {scale!r}")

    @property
    def slots(self) -> int:
        """Values one ciphertext holds: half the ring degree."""
        return self.poly_modulus_degree // 2

    @property
    def scale(self) -> float:
        """The CKKS scale Delta = 2^scale_bits that values are multiplied by before rounding."""
        return float(2**self.scale_bits)


@dataclass(frozen=True)
class HEKeyFiles:
    """Where ``generate_keys`` wrote the key files, and the public context's SHA-256 fingerprint."""

    public_context: Path
    secret_context: Path
    info: Path
    fingerprint: str
    group_key: Path


def generate_keys(directory: str | os.PathLike[str], params: CKKSParams | None = None, *,
                  force: bool = False) -> HEKeyFiles:
    """Generate a CKKS key pair into ``directory``: public.ctx (server, clients), secret.ctx (key holder), he.json,
    and group.key (clients only). Use new keys for every run.

    No relinearization or Galois keys are saved: the aggregation only adds. Existing files are kept unless ``force``.
    """
    ts = _tenseal()
    params = params or CKKSParams()
    folder = Path(directory)
    paths = [folder / PUBLIC_CONTEXT_FILE, folder / SECRET_CONTEXT_FILE, folder / KEY_INFO_FILE,
             folder / GROUP_KEY_FILE]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{folder} already holds {', '.join(existing)}; choose another directory or pass --force "
                          "to replace the keys (ciphertexts made with the old keys become undecryptable)")
    try:
        context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    except (ValueError, RuntimeError) as exc:
        raise ConfigError(f"SEAL rejects {params}: {exc}; choose other coeff_mod_bit_sizes") from exc
    context.global_scale = params.scale
    public = _public_bytes(context)
    secret = context.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False,
                               save_relin_keys=False)
    if context_holds_secret_key(public) or not context_holds_secret_key(secret):
        raise FedLearnError("TenSEAL serialized the contexts unexpectedly; refusing to write keys (report this bug)")
    fingerprint = hashlib.sha256(public).hexdigest()
    info = {"scheme": "CKKS", **asdict(params), "slots": params.slots, "public_context_sha256": fingerprint,
            "tenseal_version": ts.__version__}
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomically(paths[1], secret, 0o600)
    _write_atomically(paths[3], new_group_key(), 0o600)
    _write_atomically(paths[0], public, 0o644)
    _write_atomically(paths[2], (json.dumps(info, indent=2) + "\n").encode(), 0o644)
    return HEKeyFiles(paths[0], paths[1], paths[2], fingerprint, paths[3])


def load_key_info(path: str | os.PathLike[str]) -> tuple[CKKSParams, str]:
    """Read he.json: the parameters and the public context's SHA-256 fingerprint."""
    try:
        info = json.loads(Path(path).read_text())
        params = CKKSParams(info["poly_modulus_degree"], tuple(info["coeff_mod_bit_sizes"]), info["scale_bits"])
        return params, str(info["public_context_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read HE key info {path} ({exc}); regenerate it with `fedlearn he keygen`") from exc


def context_holds_secret_key(source: str | os.PathLike[str] | bytes) -> bool:
    """Whether a serialized TenSEAL context (bytes or file) carries a secret key, read without deserializing it.

    The context is a protobuf whose field 3 is the private part and field 1 of that the secret key.
    """
    data = _read_source(source)
    try:
        return any(field == 1 and len(value) > 0
                   for number, value in _protobuf_fields(data) if number == 3 and isinstance(value, bytes)
                   for field, value in _protobuf_fields(value) if isinstance(value, bytes))
    except ValueError as exc:
        raise ConfigError(f"{_describe(source)} is not a serialized TenSEAL context ({exc}); "
                          "use the files written by `fedlearn he keygen`") from exc


def public_context_fingerprint(context: ts.Context) -> str:
    """SHA-256 of a context's public part, equal to he.json's fingerprint when a party holds the keygen's keys."""
    return hashlib.sha256(_public_bytes(context)).hexdigest()


def load_public_context(source: str | os.PathLike[str] | bytes, *, expected_fingerprint: str | None = None,
                        ) -> ts.Context:
    """Load the server's and clients' context, refusing one that carries the secret key or lacks the public key."""
    data = _read_source(source)
    if context_holds_secret_key(data):
        raise ConfigError("this context holds the secret key; give the server public.ctx")
    context = _deserialize_context(data, source)
    if not _has_public_key(context):
        raise ConfigError(f"{_describe(source)} has no public key; use public.ctx from `fedlearn he keygen`")
    if expected_fingerprint is not None and hashlib.sha256(data).hexdigest() != expected_fingerprint:
        raise ConfigError(f"{_describe(source)} does not match the expected key fingerprint; "
                          "fetch public.ctx from the same `fedlearn he keygen` as he.json")
    return context


def load_secret_context(source: str | os.PathLike[str] | bytes) -> ts.Context:
    """Load the key holder's context, refusing one without the secret key."""
    data = _read_source(source)
    if not context_holds_secret_key(data):
        raise ConfigError(f"{_describe(source)} has no secret key; the key holder needs secret.ctx "
                          "from `fedlearn he keygen`")
    return _deserialize_context(data, source)


def context_params(context: ts.Context) -> CKKSParams:
    """The CKKS parameters of a loaded context (degree, prime sizes from its modulus chain, scale)."""
    ts = _tenseal()
    seal = context.seal_context().data
    key_level = seal.key_context_data()
    if key_level.parms().scheme() != ts.SCHEME_TYPE.CKKS.value:
        raise ConfigError("this TenSEAL context is not CKKS; use the files written by `fedlearn he keygen`")
    totals, level = [], key_level
    while level is not None:  # each step down the chain drops the last prime
        totals.append(level.total_coeff_modulus_bit_count())
        level = level.next_context_data()
    bits = [a - b for a, b in zip(totals, totals[1:], strict=False)][::-1]
    try:
        scale = context.global_scale
    except ValueError:  # TenSEAL: "no global scale"
        scale = 0.0
    scale_bits = math.log2(scale) if scale > 0 else 0.5
    if not scale_bits.is_integer():
        raise ConfigError(f"this context's scale ({scale or 'unset'}) is not a power of two; "
                          "use the files written by `fedlearn he keygen`")
    return CKKSParams(key_level.parms().poly_modulus_degree(), (totals[-1], *bits), int(scale_bits))


def num_chunks(length: int, params: CKKSParams) -> int:
    """How many ciphertexts a vector of ``length`` values takes."""
    return -(-length // params.slots)


def encrypt_vector(context: ts.Context, vector: np.ndarray | torch.Tensor | Sequence[float]) -> list[bytes]:
    """Encrypt a flat float vector with the public key: one serialized CKKS ciphertext per ``slots`` values."""
    ts = _tenseal()
    values = _as_float_vector(vector)
    params = context_params(context)
    if not _has_public_key(context):
        raise ConfigError("this context has no public key; clients encrypt with public.ctx")
    chunks = []
    for start in range(0, values.size, params.slots):
        try:
            ciphertext = ts.ckks_vector(context, values[start:start + params.slots].tolist(), scale=params.scale)
        except ValueError as exc:  # SEAL refuses values whose scaled magnitude exceeds the modulus
            raise InvalidUpdateError(f"the update's values (max |x| = {np.abs(values).max():.3g}) do not fit CKKS "
                                     f"with scale 2^{params.scale_bits} ({exc}); clip the update") from exc
        chunks.append(ciphertext.serialize())
    return chunks


class EncryptedSum:
    """The server's running sum of clients' encrypted vectors; it holds the public context only and cannot decrypt."""

    def __init__(self, public_context: ts.Context, length: int | None = None) -> None:
        if public_context.is_private():
            raise ConfigError("this context holds the secret key; give the server public.ctx")
        self.context = public_context
        self.params = context_params(public_context)
        self.length = None if length is None else _check_length(length)
        self.count = 0
        self._sum: list[Any] = []

    def add(self, chunks: Sequence[bytes]) -> None:
        """Fold one client's ciphertexts into the sum; a malformed update raises InvalidUpdateError, sum unchanged."""
        length = self.length if self.length is not None else _layout_length(self.context, chunks, self.params)
        vectors = _load_chunks(self.context, self.params, chunks, length)
        if self.count == 0:
            self._sum = vectors
        else:
            for total, vector in zip(self._sum, vectors, strict=True):
                total.add_(vector)
        self.length = length
        self.count += 1

    def serialize(self) -> list[bytes]:
        """The summed ciphertexts, serialized, for the key holder's ``decrypt_vector``."""
        if self.count == 0:
            raise FedLearnError("the encrypted sum is empty; add at least one client's update before serializing")
        return [vector.serialize() for vector in self._sum]


def decrypt_vector(secret_context: ts.Context, chunks: Sequence[bytes], length: int) -> np.ndarray:
    """Decrypt (summed) ciphertexts back to a float64 vector of ``length`` values; needs the secret context."""
    if not secret_context.is_private():
        raise ConfigError("this context has no secret key; decrypt with secret.ctx from `fedlearn he keygen` "
                          "on the key holder, never on the server")
    params = context_params(secret_context)
    vectors = _load_chunks(secret_context, params, chunks, _check_length(length))
    return np.concatenate([np.asarray(vector.decrypt(), dtype=np.float64) for vector in vectors])


def ckks_error_bound(params: CKKSParams, num_summands: int, max_abs_value: float) -> float:
    """A conservative bound on |decrypted sum - true sum| per value, for ``num_summands`` fresh ciphertexts.

    Derivation (N ring degree, K summands, Delta = 2^scale_bits, P the special prime). SEAL encrypts at the key level
    and divides by P, so a fresh ciphertext decrypts to Delta*x + e with e = eps + r0 + r1*s + d per coefficient:
    eps the encoding rounding (|eps| <= 1/2), r0 and r1 the rounding of the division by P (uniform in [-1/2, 1/2]),
    s the ternary secret key, d = (public-key noise)/P with |d| <= (2N+1)*21/P. Summing K ciphertexts adds the
    e's. A value is the real part of the slot e(zeta)/Delta, zeta a primitive 2N-th root of unity, so:

    - R1(zeta)*s(zeta), R1 = sum of the r1's: Hoeffding over the K*N uniforms given s gives
      |Re| <= t1 |s(zeta)| sqrt(K N / 8), and Hoeffding over s's coefficients with a union over the N/2 slots gives
      |s(zeta)| <= t2 sqrt(N); t1 = sqrt(2 ln(2/delta)), t2 = sqrt(2 ln(2N/delta)), delta = 2^-40.
    - R0(zeta): Hoeffding again, t1 sqrt(K N / 8). Encoding rounding, worst case: K N / 2. d: K N (2N+1) 21 / P.
    - Double-precision FFTs in encoding and decoding: 8 log2(N) sqrt(N) 2^-53 K max_abs_value.

    Measured (``precision_check``): a fresh ciphertext's error has standard deviation N / (6 Delta), 1.24e-9 for the
    default parameters, as the variance analysis predicts (1/12 per uniform, |s(zeta)|^2 = 2N/3 on average, N/2 from
    the real part); per slot it varies with |s(zeta)|, so the worst of many values reaches about 10 standard
    deviations. The bound is about 145 standard deviations: 5.8e-7 for K = 10, growing as sqrt(K); over 12 keys,
    K = 10 and 100,000 values each, the largest error seen was 0.065 of it.
    Raises ConfigError when the sum could wrap around the data modulus (then no bound holds).
    """
    if not _is_int(num_summands) or num_summands < 1:
        raise ConfigError(f"num_summands must be a positive integer (got {num_summands!r})")
    if not math.isfinite(max_abs_value) or max_abs_value < 0:
        raise ConfigError(f"max_abs_value must be a finite non-negative number (got {max_abs_value!r})")
    n, k, delta = params.poly_modulus_degree, num_summands, params.scale
    data_modulus_bits = sum(b - 1 for b in params.coeff_mod_bit_sizes[:-1])  # a b-bit prime is at least 2^(b-1)
    if k * max_abs_value * delta >= 2.0 ** (data_modulus_bits - 2):
        raise ConfigError(f"a sum of {k} values up to {max_abs_value:g} overflows CKKS with scale "
                          f"2^{params.scale_bits} and data primes {list(params.coeff_mod_bit_sizes[:-1])}; "
                          "clip the updates, lower scale_bits or add a prime")
    t1 = math.sqrt(2 * (1 - FAILURE_LOG2) * math.log(2))
    t2 = math.sqrt(2 * (math.log(2 * n) - FAILURE_LOG2 * math.log(2)))
    special_prime_min = 2.0 ** (params.coeff_mod_bit_sizes[-1] - 1)
    coefficient_units = (t1 * t2 * n * math.sqrt(k / 8) + t1 * math.sqrt(k * n / 8) + k * n / 2
                         + k * n * (2 * n + 1) * ERROR_NOISE_BOUND / special_prime_min)
    floating_point = 8 * math.log2(n) * math.sqrt(n) * 2.0**-53 * k * max_abs_value
    return coefficient_units / delta + floating_point


def precision_check(params: CKKSParams | None = None, num_summands: int = 10, length: int = 10_000, seed: int = 0,
                    max_abs_value: float = 1.0) -> dict[str, Any]:
    """Encrypt ``num_summands`` random vectors under fresh keys, add them as the server does, decrypt, and compare.

    Values are uniform in [-max_abs_value, max_abs_value] from ``seed``; SEAL's own randomness is not seedable.
    Returns the max absolute error, ``ckks_error_bound``, and the measured and predicted fresh-noise deviation.
    """
    ts = _tenseal()
    params = params or CKKSParams()
    bound = ckks_error_bound(params, num_summands, max_abs_value)
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    context.global_scale = params.scale
    public = load_public_context(_public_bytes(context))
    rng = np.random.default_rng(seed)
    plain_sum = np.zeros(_check_length(length))
    encrypted_sum = EncryptedSum(public, length)
    for _ in range(num_summands):
        vector = rng.uniform(-max_abs_value, max_abs_value, length)
        plain_sum += vector
        encrypted_sum.add(encrypt_vector(public, vector))
    error = decrypt_vector(context, encrypted_sum.serialize(), length) - plain_sum
    max_error = float(np.abs(error).max())
    return {"params": asdict(params), "num_summands": num_summands, "length": length,
            "max_abs_value": max_abs_value, "max_abs_error": max_error, "bound": bound,
            "within_bound": max_error <= bound,
            "fresh_noise_std": float(error.std() / math.sqrt(num_summands)),
            "predicted_fresh_noise_std": params.poly_modulus_degree / (6 * params.scale)}


def _tenseal() -> Any:
    try:
        import tenseal
    except ImportError as exc:
        raise ConfigError("homomorphic encryption needs TenSEAL: pip install tenseal") from exc
    return tenseal


def _has_public_key(context: ts.Context) -> bool:
    try:
        return bool(context.has_public_key())
    except ValueError:  # a symmetric-key context: TenSEAL refuses the question
        return False


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_length(length: int) -> int:
    if not _is_int(length) or length < 1:
        raise ConfigError(f"the vector length must be a positive integer (got {length!r})")
    return length


def _public_bytes(context: ts.Context) -> bytes:
    return context.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                             save_relin_keys=False)


def _describe(source: str | os.PathLike[str] | bytes) -> str:
    return "the context bytes" if isinstance(source, bytes | bytearray | memoryview) else str(source)


def _read_source(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read HE context {source} ({exc.strerror}); run `fedlearn he keygen` "
                          "and pass the path of its public.ctx or secret.ctx") from exc


def _deserialize_context(data: bytes, source: str | os.PathLike[str] | bytes) -> ts.Context:
    ts = _tenseal()
    try:
        context = ts.context_from(data)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ConfigError(f"{_describe(source)} is not a TenSEAL context ({exc}); "
                          "use the files written by `fedlearn he keygen`") from exc
    context_params(context)  # CKKS with valid parameters and a power-of-two scale, or ConfigError
    return context


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file created with ``mode`` (never wider), then rename over ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may only have narrowed it; make it exact
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _protobuf_fields(data: bytes) -> list[tuple[int, bytes | int]]:
    """Top-level (field number, value) pairs of a protobuf message; length-delimited values stay bytes."""
    fields: list[tuple[int, bytes | int]] = []
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            value, position = _varint(data, position)
            fields.append((number, value))
        elif wire_type == 2:
            size, position = _varint(data, position)
            if position + size > len(data):
                raise ValueError("truncated field")
            fields.append((number, data[position:position + size]))
            position += size
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
            if position > len(data):
                raise ValueError("truncated field")
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    return fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(data) or shift > 63:
            raise ValueError("malformed varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _as_float_vector(vector: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    if hasattr(vector, "detach"):  # a torch tensor, without importing torch here
        vector = vector.detach().cpu().double().numpy()
    values = np.asarray(vector, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise InvalidUpdateError(f"only a non-empty 1-D vector can be encrypted (got shape {values.shape}); "
                                 "flatten the update first")
    if not np.isfinite(values).all():
        raise InvalidUpdateError("the update holds NaN or infinite values; fix local training before encrypting")
    return values


def _layout_length(context: ts.Context, chunks: Sequence[bytes], params: CKKSParams) -> int:
    """The vector length a first client's chunks imply: every chunk full but the last."""
    if not chunks:
        raise InvalidUpdateError("the encrypted update has no chunks; the client must send encrypt_vector's output")
    last = _load_chunk(context, params, chunks[-1], len(chunks) - 1, None).size()
    return (len(chunks) - 1) * params.slots + last


def _load_chunks(context: ts.Context, params: CKKSParams, chunks: Sequence[bytes], length: int) -> list[Any]:
    """Deserialize and check every chunk before any is used: a bad header could crash SEAL's native code."""
    expected = num_chunks(length, params)
    if len(chunks) != expected:
        raise InvalidUpdateError(f"expected {expected} HE chunks for a vector of {length} values, got {len(chunks)}; "
                                 "drop this client's update")
    return [_load_chunk(context, params, chunk, index, min(params.slots, length - index * params.slots))
            for index, chunk in enumerate(chunks)]


def _load_chunk(context: ts.Context, params: CKKSParams, chunk: bytes, index: int, size: int | None) -> Any:
    """One chunk as a CKKS vector, refused unless it is one ciphertext of ``size`` values (1 to slots if None)
    at the scale and top modulus level that ``encrypt_vector`` produces (a sum of such chunks stays there)."""
    ts = _tenseal()
    if not isinstance(chunk, bytes | bytearray | memoryview):
        raise InvalidUpdateError(f"HE chunk {index} is {type(chunk).__name__}, not bytes; drop this client's update")
    try:
        vector = ts.ckks_vector_from(context, bytes(chunk))
        ciphertexts = vector.ciphertext()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InvalidUpdateError(f"HE chunk {index} is not a CKKS ciphertext for these keys ({exc}); "
                                 "drop this client's update") from exc
    sizes_ok = vector.size() == size if size is not None else 1 <= vector.size() <= params.slots
    seal, first = context.seal_context().data, ciphertexts[0] if len(ciphertexts) == 1 else None
    as_encrypted = (first is not None and sizes_ok and first.size() == 2
             and first.poly_modulus_degree() == params.poly_modulus_degree
             and first.parms_id() == seal.first_parms_id() and first.is_ntt_form()
             and not first.is_transparent() and first.scale == params.scale)
    if not as_encrypted:
        values = size if size is not None else f"1 to {params.slots}"
        raise InvalidUpdateError(f"HE chunk {index} is not one ciphertext of {values} values at scale "
                                 f"2^{params.scale_bits} as encrypt_vector makes; drop this client's update")
    return vector
