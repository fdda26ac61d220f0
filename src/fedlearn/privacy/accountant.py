"""Privacy accounting for DP-FedAvg, delegated to Google's maintained ``dp_accounting`` library.

One *step* is one federated round: the server samples clients, sums their clipped updates (norm <= C) and adds
Gaussian noise of standard deviation ``z * C``. Adjacency is over clients (user-level DP).

- ``sampling="poisson"``: each client joins a round independently with probability q; add/remove-one adjacency;
  the round is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``. RDP or PLD.
- ``sampling="fixed"``: exactly ``sample_size`` of ``population`` clients, uniformly without replacement;
  replace-one adjacency (the population size is public); the round is
  ``SampledWithoutReplacementDpEvent(population, sample_size, GaussianDpEvent(z / 2))`` under an RDP accountant
  with ``NeighboringRelation.REPLACE_ONE``. The ``/ 2`` is deliberate: replacing one client moves the clipped sum
  by up to 2C, and dp_accounting 0.6's RDP code reads the noise multiplier as noise / L2-sensitivity without doubling
  the sensitivity itself (google/differential-privacy issue #378). ``_rdp_replace_one_is_unscaled`` checks the
  installed library, so a fixed library is not halved twice. dp_accounting has no PLD for this sampling.
- Adaptive clipping (Andrew et al. 2021) also releases a noisy count of clipped clients each round: the sum of bits
  ``b - 1/2`` (sensitivity 1/2) plus noise of standard deviation ``clipped_count_stddev``. Both releases use the same
  sampled clients, so they form one Gaussian mechanism with ``z_eff = (z**-2 + (2 * clipped_count_stddev)**-2)**-0.5``
  (Andrew et al., Sec. 3.1; exactly what dp_accounting's RDP accountant does for a ``ComposedDpEvent`` of the two
  Gaussians); the accountant composes ``GaussianDpEvent(z_eff)``, which also works for PLD.

RDP orders are dp_accounting's ``DEFAULT_RDP_ORDERS`` (TF Privacy's dense list: 1.1 to 10.9 in steps of 0.1,
11 to 63, then 128, 256, 512, 1024), passed explicitly so the list is pinned here.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import dp_accounting
from dp_accounting import pld, rdp
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

from fedlearn.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)


def _skip_excluded_orders(record: logging.LogRecord) -> bool:
    """dp-accounting logs each RDP order it cannot evaluate and then leaves out: noise, not a problem, for users."""
    return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_skip_excluded_orders)

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
RDP_ORDERS: tuple[float, ...] = tuple(float(order) for order in DEFAULT_RDP_ORDERS)
# calibration searches z in this range; below it epsilon is meaningless (and PLD grids explode)
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e3
_SETTINGS = (
    "noise_multiplier", "sampling_rate", "delta", "kind", "sampling", "population", "sample_size",
    "clipped_count_stddev",
)
_FLAGS = {
    "noise_multiplier": "--noise-multiplier", "sampling_rate": "--fraction", "delta": "--delta",
    "kind": "--accountant", "sampling": "--sampling", "population": "--clients", "sample_size": "clients per round",
    "clipped_count_stddev": "--clipped-count-stddev",
}


MAX_DEFAULT_DELTA = 1e-5  # the default delta never exceeds this, however few the protected units


def default_delta(n: int) -> float:
    """The default delta for ``n`` protected units (clients, or examples under DP-SGD): min(1e-5, 1 / n**1.1).

    Well below 1/n, where a mechanism that publishes one unit's data outright with probability delta still passes.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"--delta default needs at least 1 protected unit; got {n}")
    return min(MAX_DEFAULT_DELTA, 1.0 / n**1.1)


def delta_warning(delta: float, n: int, unit: str) -> str | None:
    """A warning when ``delta`` is at least 1/n for ``n`` protected units, else None."""
    if n >= 1 and delta >= 1.0 / n:
        return (f"--delta {delta:g} is at least 1/{n} for {n} {unit}: a mechanism that publishes one of them in full "
                f"with probability delta meets it; use --delta below {min(MAX_DEFAULT_DELTA, 1.0 / n**1.1):.3g}")
    return None


def effective_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float | None = None) -> float:
    """The single Gaussian equivalent to the update noise plus adaptive clipping's count noise (Andrew et al.)."""
    if clipped_count_stddev is None:
        return float(noise_multiplier)
    if noise_multiplier == 0 or clipped_count_stddev == 0:
        return 0.0
    return (noise_multiplier**-2 + (2 * clipped_count_stddev) ** -2) ** -0.5


@functools.cache
def _rdp_replace_one_is_unscaled() -> bool:
    """True when dp_accounting's replace-one RDP treats the noise multiplier as already relative to 2C."""
    replace_one = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    replace_one.compose(dp_accounting.SampledWithoutReplacementDpEvent(2, 2, dp_accounting.GaussianDpEvent(1.0)))
    add_remove = rdp.RdpAccountant().compose(dp_accounting.GaussianDpEvent(1.0))
    return math.isclose(replace_one.get_epsilon(1e-5), add_remove.get_epsilon(1e-5), rel_tol=1e-9)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{_FLAGS[name]} must be a finite number; got {value!r}")
    return float(value)


class PrivacyAccountant:
    """Tracks rounds of DP-FedAvg and reports (epsilon, delta) via dp_accounting."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sampling_rate: float,
        delta: float,
        kind: str = "rdp",
        sampling: str = "poisson",
        population: int | None = None,
        sample_size: int | None = None,
        clipped_count_stddev: float | None = None,
    ) -> None:
        """Validate the settings; raise ConfigError naming the flag that is wrong."""
        self.noise_multiplier = _number("noise_multiplier", noise_multiplier)
        if self.noise_multiplier < 0:
            raise ConfigError(f"--noise-multiplier must be >= 0 (0 means no noise: epsilon is infinite); "
                              f"got {noise_multiplier}")
        self.sampling_rate = _number("sampling_rate", sampling_rate)
        if not 0 < self.sampling_rate <= 1:
            raise ConfigError(f"--fraction must be in (0, 1] for privacy accounting; got {sampling_rate}")
        self.delta = _number("delta", delta)
        if not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1), typically below 1/clients; got {delta}")
        if kind not in ACCOUNTANTS:
            raise ConfigError(f"--accountant must be one of {', '.join(ACCOUNTANTS)}; got {kind!r}")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"--sampling must be one of {', '.join(SAMPLINGS)}; got {sampling!r}")
        self.kind = kind
        self.sampling = sampling
        self.population = population
        self.sample_size = sample_size
        if clipped_count_stddev is not None:
            clipped_count_stddev = _number("clipped_count_stddev", clipped_count_stddev)
            if clipped_count_stddev < 0:
                raise ConfigError(f"--clipped-count-stddev must be >= 0; got {clipped_count_stddev}")
        self.clipped_count_stddev = clipped_count_stddev
        if sampling == "fixed":
            self._check_fixed_size()
        self._steps = 0
        self._cache: dict[int, float] = {}
        accountant = self._new_library_accountant()
        if not accountant.supports(self._round_event()):
            raise ConfigError(f"--accountant {kind} cannot account for --sampling {sampling} in dp_accounting "
                              f"(it has no PLD for fixed-size sampling); use --accountant rdp")

    def _check_fixed_size(self) -> None:
        n, m = self.population, self.sample_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"--sampling fixed needs the number of clients (--clients) as population; got {n!r}")
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
            raise ConfigError(f"--sampling fixed needs clients per round (sample_size) in [1, {n}]; got {m!r}")
        # --fraction rounded to whole clients is fine; anything further off means the sampler draws another size
        if abs(self.sampling_rate - m / n) >= 1 / n:
            raise ConfigError(f"--fraction {self.sampling_rate} does not match {m} of {n} clients per round; "
                              f"pass sampling_rate={m / n:g}")

    @property
    def steps(self) -> int:
        """Rounds accounted so far."""
        return self._steps

    @property
    def effective_noise_multiplier(self) -> float:
        """The noise multiplier of the one Gaussian release per round (update and clipped-count noise combined)."""
        return effective_noise_multiplier(self.noise_multiplier, self.clipped_count_stddev)

    def _new_library_accountant(self) -> dp_accounting.PrivacyAccountant:
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE if self.sampling == "fixed"
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        if self.kind == "rdp":
            return rdp.RdpAccountant(orders=list(RDP_ORDERS), neighboring_relation=relation)
        return pld.PLDAccountant(neighboring_relation=relation)

    def _round_event(self) -> dp_accounting.DpEvent:
        z = self.effective_noise_multiplier
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, dp_accounting.GaussianDpEvent(z))
        if _rdp_replace_one_is_unscaled():
            z = z / 2  # replace-one moves the clipped sum by 2C; see the module docstring
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, dp_accounting.GaussianDpEvent(z))

    def dp_event(self, steps: int | None = None) -> dp_accounting.DpEvent:
        """The dp_accounting event for ``steps`` rounds (default: the rounds so far), e.g. for a report."""
        return dp_accounting.SelfComposedDpEvent(self._round_event(), self._steps if steps is None else steps)

    def step(self, count: int = 1) -> None:
        """Record ``count`` more rounds."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"step count must be a non-negative integer; got {count!r}")
        self._steps += count

    def epsilon(self) -> float:
        """Epsilon at ``delta`` for the rounds so far."""
        return self.epsilon_after(self._steps)

    def epsilon_after(self, steps: int) -> float:
        """Epsilon at ``delta`` after ``steps`` rounds in total, without recording them."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; got {steps!r}")
        if steps == 0:
            return 0.0
        if self.effective_noise_multiplier == 0:
            return math.inf
        if steps not in self._cache:
            accountant = self._new_library_accountant().compose(self._round_event(), steps)
            self._cache[steps] = float(accountant.get_epsilon(self.delta))
        return self._cache[steps]

    def steps_within(self, target_epsilon: float, max_steps: int) -> int:
        """The most rounds in total (at most ``max_steps``) whose epsilon stays <= ``target_epsilon``."""
        target = _target(target_epsilon)
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
            raise ValueError(f"max_steps must be a non-negative integer; got {max_steps!r}")
        if self.epsilon_after(max_steps) <= target:
            return max_steps
        low, high = 0, max_steps  # epsilon_after(low) <= target < epsilon_after(high)
        while high - low > 1:
            mid = (low + high) // 2
            if self.epsilon_after(mid) <= target:
                low = mid
            else:
                high = mid
        return low

    def summary(self) -> dict[str, Any]:
        """Fields for a run summary (the caller adds ``clip_norm``)."""
        return {
            "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "accountant": self.kind, "sampling": self.sampling, "sampling_rate": self.sampling_rate,
            "rounds_accounted": self._steps, "clipped_count_stddev": self.clipped_count_stddev,
        }

    def state_dict(self) -> dict[str, Any]:
        """The rounds so far and the settings they were accounted under (plain JSON types)."""
        return {"steps": self._steps, **{name: getattr(self, name) for name in _SETTINGS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the rounds so far; refuse a checkpoint accounted under other privacy settings."""
        missing = [name for name in ("steps", *_SETTINGS) if name not in state]
        if missing:
            raise CheckpointError(f"privacy accountant state lacks {', '.join(missing)}; the checkpoint is damaged")
        for name in _SETTINGS:
            if state[name] != getattr(self, name):
                raise CheckpointError(f"the checkpoint's rounds were accounted with {_FLAGS[name]} {state[name]!r} "
                                      f"but this run has {getattr(self, name)!r}; resume with the same privacy "
                                      f"settings")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise CheckpointError(f"privacy accountant state has an invalid step count {steps!r}")
        self._steps = steps

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """An accountant rebuilt from ``state_dict()`` output, settings included."""
        try:
            accountant = cls(**{name: state[name] for name in _SETTINGS})
        except KeyError as missing:
            raise CheckpointError(f"privacy accountant state lacks {missing}; the checkpoint is damaged") from None
        accountant.load_state_dict(state)
        return accountant


def _target(target_epsilon: float) -> float:
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float) or not target_epsilon > 0:
        raise ConfigError(f"--target-epsilon must be a number > 0; got {target_epsilon!r}")
    return float(target_epsilon)


def calibrate_noise_multiplier(
    target_epsilon: float,
    *,
    sampling_rate: float,
    steps: int,
    delta: float,
    kind: str = "rdp",
    sampling: str = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
    clipped_count_stddev: float | None = None,
    tolerance: float = 0.005,
) -> float:
    """The smallest noise multiplier (to ``tolerance``, relative) whose epsilon after ``steps`` rounds <= target."""
    target = _target(target_epsilon)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--rounds must be a positive integer to calibrate the noise; got {steps!r}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be in (0, 1); got {tolerance}")
    settings = dict(sampling_rate=sampling_rate, delta=delta, kind=kind, sampling=sampling, population=population,
                    sample_size=sample_size, clipped_count_stddev=clipped_count_stddev)

    @functools.cache
    def epsilon(z: float) -> float:
        return PrivacyAccountant(noise_multiplier=z, **settings).epsilon_after(steps)

    # epsilon falls as z grows: bracket the answer between low (too little noise) and high (enough), then bisect
    high = 1.0
    if epsilon(high) > target:
        low = high
        while epsilon(high) > target:
            if high >= MAX_NOISE_MULTIPLIER:
                why = " (adaptive clipping's count noise alone spends more; raise --clipped-count-stddev)" \
                    if clipped_count_stddev is not None else ""
                raise ConfigError(f"--target-epsilon {target:g} cannot be met in {steps} rounds: even noise "
                                  f"multiplier {MAX_NOISE_MULTIPLIER:g} gives epsilon {epsilon(high):.4g}{why}; "
                                  f"raise the target or use fewer rounds or a smaller --fraction")
            low, high = high, min(2 * high, MAX_NOISE_MULTIPLIER)
    else:
        low = high / 2
        while epsilon(low) <= target:
            if low <= MIN_NOISE_MULTIPLIER:
                logger.warning("--target-epsilon %g is met by any noise multiplier down to %g; using %g",
                               target, MIN_NOISE_MULTIPLIER, MIN_NOISE_MULTIPLIER)
                return MIN_NOISE_MULTIPLIER
            high, low = low, max(low / 2, MIN_NOISE_MULTIPLIER)
    while high / low > 1 + tolerance:
        mid = math.sqrt(low * high)
        if epsilon(mid) <= target:
            high = mid
        else:
            low = mid
    return high


class DPSGDLedger:
    """Epsilon of DP-SGD clients from what the party running the simulation knows: each client's example count n
    and batch size B (its rate B / n) and the training tasks it was given (each ``steps_per_round`` releases).

    The server of a simulation computes it here because the clients no longer report it (a count or an epsilon
    reveals n). Counting tasks given, not results accepted, is conservative: a client whose answer was lost still
    spent. Under the RDP accountant the per-order RDP of a rate is computed once and scaled by the steps.
    """

    def __init__(self, noise_multiplier: float, delta: float, kind: str = "rdp") -> None:
        self.noise_multiplier, self.delta, self.kind = noise_multiplier, delta, kind
        self._rdp: dict[float, Any] = {}
        self._epsilon: dict[tuple[float, int], float] = {}

    def epsilon(self, rate: float, steps: int) -> float:
        """Epsilon at ``delta`` after ``steps`` Poisson-sampled releases at ``rate``."""
        key = (rate, steps)
        if key not in self._epsilon:
            self._epsilon[key] = self._compute(rate, steps)
        return self._epsilon[key]

    def _compute(self, rate: float, steps: int) -> float:
        if steps == 0:
            return 0.0
        compute = getattr(rdp.rdp_privacy_accountant, "_compute_rdp_poisson_subsampled_gaussian", None)
        if self.kind != "rdp" or compute is None:  # PLD, or a dp-accounting without the helper: the full path
            return PrivacyAccountant(noise_multiplier=self.noise_multiplier, sampling_rate=rate, delta=self.delta,
                                     kind=self.kind).epsilon_after(steps)
        if rate not in self._rdp:
            self._rdp[rate] = compute(rate, self.noise_multiplier, list(RDP_ORDERS))
        epsilon, _ = rdp.rdp_privacy_accountant.compute_epsilon(list(RDP_ORDERS), self._rdp[rate] * steps,
                                                                self.delta)
        return float(epsilon)
