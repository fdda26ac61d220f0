"""Distributed DP: the distributed discrete Gaussian (Kairouz, Liu and Steinke, ICML 2021) inside a secure sum.

Each client clips its update to L2 norm C, rotates it (a randomized Walsh-Hadamard transform from a public per-round
seed, so that no coordinate carries much of the norm), scales it by 1 / gamma, rounds it stochastically to integers
until the rounded norm is within the bound ``norm_bound`` (conditional rounding), adds its *share* of discrete
Gaussian noise N_Z(0, share_std^2) per coordinate, and reduces modulo 2^bits for the secure sum. The server unmasks
only the sum: the clipped updates plus the noise of every surviving share, already private when it is unmasked.
It maps the sum back to [-2^(bits-1), 2^(bits-1)), undoes the rotation and multiplies by gamma.

Shares are sized so that the sum of any ``honest`` shares carries the round's total noise (``noise_multiplier``
times the integer sensitivity): the round accepts no fewer survivors than its threshold, of which at most the assumed
colluding fraction may have revealed their noise to the server.

Accounting (``DistributedAccountant``): the sum of h discrete Gaussians of variance s^2 with integer sensitivity
(L2 Delta_2, L1 Delta_1) is rho-zCDP with rho = eps^2 / 2, eps = min(sqrt(Delta_2^2 / (h s^2) + tau d / 2),
Delta_2 / (sqrt(h) s) + tau Delta_1), tau = 10 sum_{k=1}^{h-1} exp(-2 pi^2 s^2 k / (k + 1)) (Kairouz et al.,
Theorem 1). Its Renyi DP alpha * rho at integer orders is amplified by Poisson sampling with Zhu and Wang's general
upper bound (ICML 2019, Theorem 6), which holds for any mechanism, then composed and converted to (epsilon, delta).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedlearn.errors import ConfigError, InvalidUpdateError
from fedlearn.privacy.dp import PrivacyRandom
from fedlearn.privacy.secagg.crypto import mask_dtype

BETA = math.exp(-0.5)  # conditional rounding fails (and retries) with probability at most beta; Kairouz et al.'s
STDDEVS = 4.0  # the secure sum's range covers this many estimated standard deviations of each coordinate
ORDERS = np.arange(2, 257, dtype=np.float64)  # integer Renyi orders: the subsampling bound needs integers
MAX_TRIES = 100  # conditional rounding: at 1/(1 - beta) = 2.5 expected tries, 100 failures mean a wrong bound


def padded_dim(length: int) -> int:
    """The rotation's dimension: the next power of two at or above ``length``."""
    return 1 << max(0, (length - 1).bit_length())


def hadamard(x: np.ndarray) -> np.ndarray:
    """The orthonormal Walsh-Hadamard transform H x / sqrt(d) of a float64 vector of power-of-two length (its own
    inverse)."""
    d = x.shape[0]
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < d:
        pairs = y.reshape(-1, 2, h)
        y = np.stack((pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]), axis=1).reshape(d)
        h *= 2
    return y / math.sqrt(d)


def signs(seed: int, dim: int) -> np.ndarray:
    """The rotation's random +-1 diagonal: public randomness every client and the server derive from the seed."""
    return np.random.default_rng(seed).integers(0, 2, dim).astype(np.float64) * 2 - 1


def rotate(x: np.ndarray, seed: int, dim: int) -> np.ndarray:
    """H D x / sqrt(d), with x zero-padded to ``dim``."""
    padded = np.zeros(dim, dtype=np.float64)
    padded[: x.shape[0]] = x
    return hadamard(padded * signs(seed, dim))


def unrotate(y: np.ndarray, seed: int) -> np.ndarray:
    """D H y / sqrt(d): the inverse of ``rotate`` (before truncating the padding)."""
    return hadamard(y) * signs(seed, y.shape[0])


def discrete_gaussian(n: int, sigma: float, random: PrivacyRandom) -> np.ndarray:
    """``n`` int64 samples of N_Z(0, sigma^2), P(x) proportional to exp(-x^2 / (2 sigma^2)).

    Canonne, Kamath and Steinke's rejection sampler (NeurIPS 2020, Algorithm 3), vectorized: discrete Laplace
    proposals of scale t = floor(sigma) + 1 (a difference of two geometrics), accepted with probability
    exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2)). Uniforms come from ``random`` (the OS's CSPRNG unless seeded); the
    acceptance test is in float64, not the exact rational arithmetic of the paper.
    """
    if sigma <= 0:
        return np.zeros(n, dtype=np.int64)
    t = math.floor(sigma) + 1
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        u = random.uniform(3 * todo.size).numpy().reshape(3, -1)
        g1 = np.floor(-t * np.log1p(-u[0]))  # geometric on {0, 1, ...} with ratio exp(-1/t)
        g2 = np.floor(-t * np.log1p(-u[1]))
        y = g1 - g2
        accept = u[2] < np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    return out


def rounding_bound(scaled_clip: float, dim: int, beta: float = BETA) -> float:
    """The L2 norm conditional rounding enforces on a rounded vector of norm <= ``scaled_clip`` (= C / gamma):
    min(sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) (c + sqrt(d)/2)), c + sqrt(d)) (Kairouz et al., Sec. 4)."""
    c = scaled_clip
    tight = math.sqrt(c * c + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dim) / 2))
    return min(tight, c + math.sqrt(dim))


def zcdp_rho(sensitivity: float, dim: int, shares: int, share_std: float) -> float:
    """rho of the sum of ``shares`` discrete Gaussian shares of std ``share_std`` on an integer vector of L2
    sensitivity ``sensitivity`` in ``dim`` coordinates (Kairouz et al., Theorem 1, with Delta_1 <= min(sqrt(d)
    Delta_2, Delta_2^2))."""
    if shares < 1 or share_std <= 0:
        return math.inf
    l1 = min(math.sqrt(dim) * sensitivity, sensitivity**2)
    k = np.arange(1, shares, dtype=np.float64)
    tau = 10 * float(np.sum(np.exp(-2 * math.pi**2 * share_std**2 * k / (k + 1)))) if shares > 1 else 0.0
    eps = min(math.sqrt(sensitivity**2 / (shares * share_std**2) + tau * dim / 2),
              sensitivity / (math.sqrt(shares) * share_std) + tau * l1)
    return eps * eps / 2


_LOG_FACTORIAL = np.cumsum(np.log(np.maximum(np.arange(int(ORDERS[-1]) + 1, dtype=np.float64), 1.0)))


def _log_comb(n: int, k: np.ndarray | int) -> np.ndarray:
    return _LOG_FACTORIAL[n] - _LOG_FACTORIAL[k] - _LOG_FACTORIAL[n - np.asarray(k)]


def _logsumexp(values: np.ndarray) -> float:
    top = float(np.max(values))
    return top + math.log(float(np.sum(np.exp(values - top))))


def poisson_rdp(rate: float, rho: float) -> np.ndarray:
    """RDP at ``ORDERS`` of a rho-zCDP mechanism (RDP alpha * rho) run on a Poisson sample at ``rate``: Zhu and
    Wang's general upper bound (ICML 2019, Theorem 6); exactly alpha * rho at rate 1."""
    if rate >= 1.0:
        return ORDERS * rho
    if rate <= 0.0 or rho == 0.0:
        return np.zeros_like(ORDERS)
    lq, l1q = math.log(rate), math.log1p(-rate)
    out = np.empty_like(ORDERS)
    for i, alpha in enumerate(ORDERS.astype(int)):
        ls = np.arange(3, alpha + 1)
        terms = np.concatenate((
            [(alpha - 1) * l1q + math.log(alpha * rate - rate + 1),
             float(_log_comb(alpha, 2)) + 2 * lq + (alpha - 2) * l1q + 2 * rho],
            math.log(3) + _log_comb(alpha, ls) + (alpha - ls) * l1q + ls * lq + (ls - 1) * ls * rho))
        out[i] = min(_logsumexp(terms) / (alpha - 1), alpha * rho)  # subsampling never hurts
    return out


def rdp_to_epsilon(rdp: np.ndarray, delta: float) -> float:
    """(epsilon, delta) from RDP at ``ORDERS``: min over alpha of rdp + log((alpha-1)/alpha) - (log delta + log
    alpha)/(alpha-1) (Canonne, Kamath and Steinke 2020; the conversion dp_accounting uses)."""
    a = ORDERS
    eps = rdp + np.log((a - 1) / a) - (math.log(delta) + np.log(a)) / (a - 1)
    return float(max(0.0, np.min(eps)))


@dataclass(frozen=True)
class DiscreteGaussianEncoding:
    """How one round's clients encode their updates into a ``bits``-bit secure sum with their noise shares.

    ``clients`` were sampled, ``honest`` is the fewest honest shares any unmasked sum holds; ``share_std`` (integer
    units) makes ``honest`` shares carry total std ``noise_multiplier * norm_bound``. The rotation seed is public.
    """

    bits: int
    clip: float
    length: int
    gamma: float
    share_std: float
    noise_multiplier: float
    clients: int
    honest: int
    rotation_seed: int
    beta: float = BETA
    kind: str = "ddgauss"
    extras: int = 0  # nothing rides beside the update: the survivors' count is known to the server anyway

    def __post_init__(self) -> None:
        if not 8 <= self.bits <= 64:
            raise ConfigError(f"--secagg-bits must be between 8 and 64; got {self.bits}")
        for name in ("clip", "gamma", "share_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"distributed DP: {name} must be a positive number; got {value}")
        if not (self.length >= 1 and 1 <= self.honest <= self.clients and 0 < self.beta < 1):
            raise ConfigError("distributed DP: the round's length, clients, honest shares or beta are out of range")

    @property
    def dim(self) -> int:
        return padded_dim(self.length)

    @property
    def size(self) -> int:
        """Integers each client masks."""
        return self.dim

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    @property
    def norm_bound(self) -> float:
        """L2 bound of a client's rounded integer vector: the integer sensitivity, rounding included."""
        return rounding_bound(self.clip / self.gamma, self.dim, self.beta)

    @property
    def share_noise_multiplier(self) -> float:
        """One share's std over the integer sensitivity: what a single client's noise alone gives."""
        return self.share_std / self.norm_bound

    def rho(self) -> float:
        """zCDP rho of one round's unmasked sum against the server, from its ``honest`` shares."""
        return zcdp_rho(self.norm_bound, self.dim, self.honest, self.share_std)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DiscreteGaussianEncoding:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    @classmethod
    def plan(cls, *, bits: int, clip: float, length: int, noise_multiplier: float, clients: int, honest: int,
             rotation_seed: int) -> DiscreteGaussianEncoding:
        """The granularity gamma that fits the sum of ``clients`` noisy, rotated, rounded updates into ``bits`` bits
        (``STDDEVS`` estimated standard deviations each side), and the share std that makes ``honest`` shares carry
        ``noise_multiplier`` times the integer sensitivity."""
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise ConfigError(f"--dp distributed needs --noise-multiplier > 0; got {noise_multiplier}")
        dim = padded_dim(length)
        m, h = clients, max(1, min(honest, clients))
        # Each rotated coordinate of the sum: aligned signal at most m C / sqrt(d), the m shares' noise, rounding.
        gamma = 2 * STDDEVS * (m * clip / math.sqrt(dim) + noise_multiplier * clip * math.sqrt(m / h)) / 2**bits
        for _ in range(50):  # the noise depends on gamma through the rounding bound: a fixed point, reached fast
            total = noise_multiplier * rounding_bound(clip / gamma, dim) * gamma  # total noise std, real units
            spread = math.sqrt((m * clip) ** 2 / dim + (m / h) * total**2 + m * gamma**2 / 4)
            gamma = 2 * STDDEVS * spread / 2**bits
        bound = rounding_bound(clip / gamma, dim)
        return cls(bits=bits, clip=clip, length=length, gamma=gamma, share_std=noise_multiplier * bound / math.sqrt(h),
                   noise_multiplier=noise_multiplier, clients=m, honest=h, rotation_seed=rotation_seed)

    def encode(self, update: np.ndarray, rounding: np.random.Generator, noise: PrivacyRandom) -> np.ndarray:
        """The client's masked-sum input: clip, rotate, scale, round conditionally, add its noise share, mod 2^bits."""
        x = np.asarray(update, dtype=np.float64).reshape(-1)
        if x.shape[0] != self.length:
            raise ConfigError(f"distributed DP: the update has {x.shape[0]} values, the round expects {self.length}")
        norm = float(np.linalg.norm(x))
        if not math.isfinite(norm):
            raise InvalidUpdateError("local training produced non-finite values; nothing is sent this round")
        if norm > self.clip:  # the client's own guarantee rests on it, whatever it did before
            x = x * (self.clip / norm)
        scaled = rotate(x, self.rotation_seed, self.dim) / self.gamma
        floor = np.floor(scaled)
        bound = self.norm_bound
        for _ in range(MAX_TRIES):
            rounded = floor + (rounding.random(self.dim) < scaled - floor)
            if float(np.linalg.norm(rounded)) <= bound:
                break
        else:
            raise ConfigError("distributed DP: conditional rounding kept exceeding its bound; report this as a bug")
        values = rounded.astype(np.int64) + discrete_gaussian(self.dim, self.share_std, noise)
        return (values % self.modulus).astype(mask_dtype(self.bits))  # two's-complement wrap into Z_{2^bits}

    def decode(self, total: np.ndarray, count: int) -> tuple[np.ndarray, int, list[int]]:
        """(sum of the clipped updates plus noise, in float64, ``count``, no extras) from the unmasked sum."""
        values = np.asarray(total).astype(np.int64) % self.modulus
        values[values >= self.modulus // 2] -= self.modulus  # centred: the sum's true range
        return unrotate(values.astype(np.float64), self.rotation_seed)[: self.length] * self.gamma, count, []


@dataclass(frozen=True)
class SharePolicy:
    """What a client requires of a distributed-DP round whatever the server asks: at most its own clip, and a
    share of at least ``min_share_noise`` times the integer sensitivity (its own noise alone, should every other
    share be known to the server)."""

    clip: float
    min_share_noise: float

    def check(self, encoding: DiscreteGaussianEncoding, length: int) -> str | None:
        """Why the task must be refused, or None."""
        if encoding.clip > self.clip * (1 + 1e-9):
            return f"distributed DP clip {encoding.clip:g} is above this client's own {self.clip:g}"
        if encoding.share_noise_multiplier < self.min_share_noise * (1 - 1e-9):
            return (f"distributed DP share noise {encoding.share_noise_multiplier:.4g} x sensitivity is below this "
                    f"client's own minimum {self.min_share_noise:.4g}")
        if encoding.length != length:
            return f"distributed DP round expects {encoding.length} values; this client's update has {length}"
        return None


class DistributedAccountant:
    """RDP over the rounds of a distributed-DP run: the released models' epsilon (amplified by the secret Poisson
    sampling) and the epsilon against the server (which chose and saw who took part: no amplification; the most
    any client was given)."""

    def __init__(self, sampling_rate: float, delta: float) -> None:
        self.rate, self.delta = sampling_rate, delta
        self.rdp = np.zeros_like(ORDERS)
        self.client_rho: dict[str, float] = {}
        self.steps = 0

    def step(self, rho: float, client_ids: list[str]) -> None:
        self.rdp = self.rdp + poisson_rdp(self.rate, rho)
        for cid in client_ids:
            self.client_rho[cid] = self.client_rho.get(cid, 0.0) + rho
        self.steps += 1

    def epsilon(self) -> float:
        return rdp_to_epsilon(self.rdp, self.delta) if self.steps else 0.0

    def epsilon_against_server(self) -> float:
        worst = max(self.client_rho.values(), default=0.0)
        return rdp_to_epsilon(ORDERS * worst, self.delta) if worst else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"rdp": self.rdp.tolist(), "client_rho": dict(self.client_rho), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rdp = np.asarray(state["rdp"], dtype=np.float64)
        self.client_rho = {str(k): float(v) for k, v in state["client_rho"].items()}
        self.steps = int(state["steps"])


def calibrate(target_epsilon: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """The noise multiplier z whose rounds (rho = 1 / (2 z^2) each) reach ``target_epsilon`` after ``rounds``."""
    def eps(z: float) -> float:
        return rdp_to_epsilon(rounds * poisson_rdp(sampling_rate, 1 / (2 * z * z)), delta)

    low, high = 0.1, 1e3
    if eps(high) > target_epsilon:
        raise ConfigError(f"--target-epsilon {target_epsilon:g} is out of reach for {rounds} rounds at "
                          f"--fraction {sampling_rate:g}; raise it or run fewer rounds")
    for _ in range(60):
        mid = math.sqrt(low * high)
        low, high = (mid, high) if eps(mid) > target_epsilon else (low, mid)
    return high
