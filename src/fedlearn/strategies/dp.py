"""Differential privacy as wrappers around any strategy whose aggregate is a mean of updates.

- ``CentralDP`` (DP-FedAvg, McMahan et al., ICLR 2018): Poisson-sampled clients clip their
  arrays to L2 norm C (requested; the server clips again, so one faulty client cannot break the
  bound), the server sums them uniformly, adds N(0, (z C)^2) and divides by the *expected* number
  of clients q K, so the number of answers leaks nothing; the wrapped strategy's ``apply`` (any
  server optimizer) then uses that noisy mean. The accountant reads the wrapper's own sampler.
- ``LocalDP``: each client clips to C and adds N(0, (z C)^2) itself (its own policy decides);
  the server averages uniformly and reports a per-client, replace-one epsilon (sensitivity 2C).
- ``DPSGD``: clients train with the ``dpsgd`` hook and report the epsilon of their own
  accountant; the run's epsilon is the largest reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlearn.errors import CheckpointError, ConfigError
from fedlearn.privacy.dp import gaussian_noise, noise_generator
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Arrays, EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.strategies.base import Aggregator, MeanAggregator, PoissonSampler, ServerState, Strategy
from fedlearn.transforms.base import joint_norm
from fedlearn.transforms.clip import Clip
from fedlearn.transforms.noise import GaussianNoise


class Wrapper(Strategy):
    """Delegates everything to ``inner``; a privacy wrapper overrides what its mechanism changes."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = inner.name
        self.uplink = inner.uplink
        self.weighting = inner.weighting
        self.secure_extras = inner.secure_extras
        self.sampler = inner.sampler
        self.optimizer = inner.optimizer

    @property
    def local(self) -> LocalConfig:  # type: ignore[override]
        return self.inner.local

    @property
    def config(self) -> Any:  # the inner algorithm's settings (FedProx's mu): its hooks read them
        return self.inner.config

    @config.setter
    def config(self, value: Any) -> None:
        self.inner.config = value

    @property
    def transforms(self):  # type: ignore[override]
        return self.inner.transforms

    def set_local(self, **changes: Any) -> None:
        self.inner.set_local(**changes)

    def hooks(self) -> dict[str, dict[str, Any]]:
        return self.inner.hooks()

    def task_arrays(self, state: ServerState) -> Arrays:
        return self.inner.task_arrays(state)

    def client_config(self, rnd: int, client_id: str) -> dict[str, Any]:
        return self.inner.client_config(rnd, client_id)
    # configure_train is Strategy's: it reads hooks(), local, uplink and transforms through this wrapper,
    # so a wrapper that adds a hook (DP-SGD) needs no task patching.

    def expected_arrays(self, state: ServerState) -> dict[str, int]:
        return self.inner.expected_arrays(state)

    def aggregator(self, rnd: int, state: ServerState) -> Aggregator:
        return self.inner.aggregator(rnd, state)

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        return self.inner.apply(state, aggregate, count)

    def configure_evaluate(self, rnd: int, state: ServerState, client_ids: Sequence[str]) -> list[EvalTask]:
        return self.inner.configure_evaluate(rnd, state, client_ids)

    def aggregate_evaluate(self, results: Sequence[EvalResult]) -> dict[str, float | None]:
        return self.inner.aggregate_evaluate(results)

    def round_metrics(self) -> dict[str, Any]:
        return self.inner.round_metrics()

    def can_continue(self, next_round: int) -> bool:
        return self.inner.can_continue(next_round)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "inner" not in state:
            raise CheckpointError("strategy state is damaged (no wrapped strategy); start a new run")
        self.inner.load_state_dict(state["inner"])


def _check_dp(clip_norm: float, noise_multiplier: float) -> None:
    if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(f"--clip-norm must be a finite number > 0 for differential privacy; got {clip_norm}")
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(f"--noise-multiplier must be a finite number >= 0; got {noise_multiplier}")


def _set_transform(strategy: Strategy, transform: Any) -> None:
    """Request ``transform`` from clients, replacing an earlier request of the same kind."""
    strategy.transforms[:] = [t for t in strategy.transforms if t.name != transform.name] + [transform]


class NoisySum(Aggregator):
    """sum_k clip(arrays_k) + N(0, (z C)^2) per coordinate, divided by the expected client count.

    It also sums the clients' centred "update was within the clip norm" bits (b - 1/2), which
    adaptive clipping privatizes before use.
    """

    def __init__(self, lengths: Mapping[str, int], clip_norm: float, std: float, expected: float,
                 generator: torch.Generator) -> None:
        self.lengths = dict(lengths)
        self.names = tuple(lengths)
        self.clip_norm, self.std, self.expected, self.generator = clip_norm, std, expected, generator
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        self.centred_bits = 0.0

    def _add_to(self, name: str, value: torch.Tensor) -> None:
        value = value.to(torch.float64)
        self._sums[name] = value.clone() if name not in self._sums else self._sums[name].add_(value)

    def add(self, result: TrainResult, arrays: Arrays) -> None:
        norm = joint_norm({n: arrays[n] for n in self.names})
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        for name in self.names:
            self._add_to(name, arrays[name] * scale if scale < 1.0 else arrays[name])
        self._count += 1
        # The client saw its update before clipping; a clipped payload sits exactly on the bound.
        reported = result.metrics.get("below_clip", float(norm < self.clip_norm * (1 - 1e-6)))
        self.centred_bits += (1.0 if reported >= 0.5 else 0.0) - 0.5  # a bit, whatever was sent

    def add_sum(self, sums: Arrays, total_weight: float, count: int, extras: Mapping[str, int]) -> None:
        # Clients clipped before masking; the server cannot re-clip what it cannot see.
        for name in self.names:
            self._add_to(name, sums[name])
        self._count += count
        self.centred_bits += extras.get("below_clip", 0) - 0.5 * count

    @property
    def count(self) -> int:
        return self._count

    def result(self) -> Arrays:
        out = {}
        for name in self.names:
            total = self._sums.get(name, torch.zeros(self.lengths[name], dtype=torch.float64))
            if self.std > 0:
                total = total + gaussian_noise(total.numel(), self.std, self.generator)
            out[name] = (total / self.expected).to(torch.float32)
        return out


class CentralDP(Wrapper):
    """Client-level central DP around ``inner``: Poisson sampling, clipping, noise, accountant.

    ``noise_seed`` makes the noise reproducible: only the simulation-only seeded-privacy switch sets it.
    """

    aggregates_empty_rounds = True

    def __init__(self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, delta: float,
                 accountant: str = "rdp", target_epsilon: float | None = None, stop_at_budget: bool = False,
                 noise_seed: int | None = None, adaptive_quantile: float | None = None,
                 clip_learning_rate: float = 0.2, clipped_count_stddev: float | None = None,
                 population: int | None = None) -> None:
        _check_dp(clip_norm, noise_multiplier)
        super().__init__(inner)
        if inner.weighting is None:
            raise ConfigError(f"--dp central needs a strategy whose aggregate is a mean; {inner.name} is not")
        self.sampler = inner.sampler = PoissonSampler(inner.sampler.fraction, secret=noise_seed is None)
        self.weighting = "uniform"
        self.population = population
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.adaptive_quantile = adaptive_quantile
        self.clip_learning_rate = clip_learning_rate
        if adaptive_quantile is not None:
            if not 0 < adaptive_quantile < 1:
                raise ConfigError(f"--adaptive-clip-quantile must be in (0, 1); got {adaptive_quantile}")
            if population is None:
                raise ConfigError("adaptive clipping needs the number of clients to set its count noise")
            # Andrew et al. 2021 suggest noise of about m/20 on the count of m expected clients.
            clipped_count_stddev = clipped_count_stddev or self.sampler.rate * population / 20
            self.secure_extras = ("below_clip",)
        self.clipped_count_stddev = clipped_count_stddev if adaptive_quantile is not None else None
        from fedlearn.privacy.accountant import PrivacyAccountant  # dp_accounting (and scipy) only when DP runs

        self.accountant = PrivacyAccountant(noise_multiplier=noise_multiplier, sampling_rate=self.sampler.rate,
                                            sampling=self.sampler.kind, delta=delta, kind=accountant,
                                            clipped_count_stddev=self.clipped_count_stddev)
        self.target_epsilon = target_epsilon
        self.stop_at_budget = stop_at_budget
        self.generator = noise_generator(noise_seed)
        self._round_clip_norm = self.clip_norm
        _set_transform(inner, Clip(Clip.Config(self.clip_norm)))

    def aggregator(self, rnd: int, state: ServerState) -> Aggregator:
        self.accountant.step()  # the release happens whatever the clients answer
        self._round_clip_norm = self.clip_norm
        population = self.population or self.sampler.population
        std = self.noise_multiplier * self.clip_norm
        self._noisy = NoisySum(self.inner.expected_arrays(state), self.clip_norm, std, self.sampler.rate * population,
                               self.generator)
        return self._noisy

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        if self.adaptive_quantile is not None:
            self._adapt_clip_norm(self._noisy)
        # The inner strategy sees the expected count, never the realised one (SCAFFOLD scales its control by
        # it, and the control is sent to every client).
        return self.inner.apply(state, aggregate, self._noisy.expected)

    def _adapt_clip_norm(self, noisy: NoisySum) -> None:
        """Geometric update towards the target quantile from a privatized count (Andrew et al. 2021)."""
        count = noisy.centred_bits + float(gaussian_noise(1, self.clipped_count_stddev, self.generator)[0])
        below = count / noisy.expected + 0.5  # noisy fraction of updates within the clip norm
        self.clip_norm *= math.exp(-self.clip_learning_rate * (below - self.adaptive_quantile))
        _set_transform(self.inner, Clip(Clip.Config(self.clip_norm)))

    def can_continue(self, next_round: int) -> bool:
        if self.stop_at_budget and self.target_epsilon is not None:
            if self.accountant.epsilon_after(self.accountant.steps + 1) > self.target_epsilon:
                return False
        return self.inner.can_continue(next_round)

    def round_metrics(self) -> dict[str, Any]:
        return {**self.inner.round_metrics(), "epsilon": self.accountant.epsilon(),
                "clip_norm": self._round_clip_norm}

    def privacy_summary(self) -> dict[str, Any]:
        """What summary.json states about the guarantee."""
        return {**self.accountant.summary(), "clip_norm": self.clip_norm, "dp": "central"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict(), "clip_norm": self.clip_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])
        self.clip_norm = float(state["clip_norm"])
        _set_transform(self.inner, Clip(Clip.Config(self.clip_norm)))


class LocalDP(Wrapper):
    """Local DP for an untrusted server: clients clip to C and add N(0, (z C)^2) before sending.

    The guarantee is per client and per release: replacing a client's data moves its clipped
    update by at most 2C, so each round it takes part in is a Gaussian mechanism with noise
    multiplier z / 2 on that sensitivity; the accountant composes every round (the server knows
    who took part, so there is no amplification by sampling).
    """

    def __init__(self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, delta: float,
                 accountant: str = "rdp") -> None:
        _check_dp(clip_norm, noise_multiplier)
        if noise_multiplier <= 0:
            raise ConfigError("--dp local needs --clip-norm > 0 and --noise-multiplier > 0")
        super().__init__(inner)
        self.weighting = "uniform"
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        from fedlearn.privacy.accountant import PrivacyAccountant

        self.accountant = PrivacyAccountant(noise_multiplier=noise_multiplier / 2, sampling_rate=1.0, delta=delta,
                                            kind=accountant)
        _set_transform(inner, Clip(Clip.Config(self.clip_norm)))
        _set_transform(inner, GaussianNoise(GaussianNoise.Config(self.noise_multiplier * self.clip_norm)))

    def aggregator(self, rnd: int, state: ServerState) -> Aggregator:
        self.accountant.step()
        return MeanAggregator(self.uplink, "uniform")

    def round_metrics(self) -> dict[str, Any]:
        return {**self.inner.round_metrics(), "epsilon": self.accountant.epsilon()}

    def privacy_summary(self) -> dict[str, Any]:
        return {**self.accountant.summary(), "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm,
                "accounted_noise_multiplier": self.noise_multiplier / 2, "dp": "local",
                "epsilon_is": "per client, replace-one (sensitivity 2C), composed over every round"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.accountant.load_state_dict(state["accountant"])


class DPSGD(Wrapper):
    """Clients train with DP-SGD (Abadi et al., 2016); each keeps its own accountant and enforces its own budget.

    A client sends no example count (every client weighs 1: a count breaks the add/remove-one-example adjacency
    DP-SGD protects) and no epsilon or step count (both are functions of n). The published ``epsilon`` is
    computed where the counts are known: in a simulation, ``counts`` gives each client's (examples, batch size)
    and the run's epsilon is the largest over the clients given a task, from the tasks each was given. Over gRPC
    the server knows no count: ``epsilon`` is None, held by each client (its state, ``--client-budget``).
    """

    secure_refusal = "--dp dpsgd with secure aggregation or HE is not supported yet"

    def __init__(self, inner: Strategy, *, clip_norm: float, noise_multiplier: float, delta: float,
                 accountant: str = "rdp", counts: Mapping[str, tuple[int, int]] | None = None,
                 target_epsilon: float | None = None, rounds: int = 1) -> None:
        _check_dp(clip_norm, noise_multiplier)
        if noise_multiplier <= 0:
            raise ConfigError("--dp dpsgd needs --clip-norm > 0 and --noise-multiplier > 0")
        super().__init__(inner)
        self.weighting = "uniform"
        self.clip_norm, self.noise_multiplier, self.delta, self.kind = clip_norm, noise_multiplier, delta, accountant
        self.counts = dict(counts) if counts is not None else None
        self.target_epsilon, self.rounds = target_epsilon, rounds  # each client calibrates its own noise to it
        self.tasks: dict[str, int] = {}  # training tasks given to each client (each a round of DP-SGD releases)
        self._ledgers: dict[float, Any] = {}  # one per noise multiplier, each caching RDP per rate

    def hooks(self) -> dict[str, dict[str, Any]]:
        target = {} if self.target_epsilon is None else {"target_epsilon": self.target_epsilon, "rounds": self.rounds}
        return {**self.inner.hooks(), "dpsgd": {"clip": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                                                "delta": self.delta, "accountant": self.kind, **target}}

    def configure_train(self, rnd: int, state: ServerState, client_ids: Sequence[str], seed: int) -> list[TrainTask]:
        tasks = super().configure_train(rnd, state, client_ids, seed)
        for task in tasks:
            self.tasks[task.client_id] = self.tasks.get(task.client_id, 0) + 1
        return tasks

    def epsilon(self) -> float | None:
        """The largest epsilon over the clients given tasks (None where the server knows no counts)."""
        if self.counts is None:
            return None
        from fedlearn.privacy.accountant import DPSGDLedger  # dp_accounting only when DP-SGD runs
        from fedlearn.privacy.dpsgd import DPSGDHook, steps_per_round

        hook = DPSGDHook(DPSGDHook.Config(**self.hooks()["dpsgd"]))  # calibrates each client's noise as it does
        epochs = self.local.local_epochs
        worst = 0.0
        for cid, given in self.tasks.items():
            n, batch = self.counts[cid]
            z = hook.noise_for(n, batch, epochs)
            ledger = self._ledgers.setdefault(z, DPSGDLedger(z, self.delta, self.kind))
            worst = max(worst, ledger.epsilon(min(1.0, batch / n), given * steps_per_round(n, batch, epochs)))
        return worst

    def round_metrics(self) -> dict[str, Any]:
        return {**self.inner.round_metrics(), "epsilon": self.epsilon()}

    def privacy_summary(self) -> dict[str, Any]:
        held = self.counts is None
        calibrated = {} if self.target_epsilon is None else {
            "target_epsilon": self.target_epsilon, "noise_multiplier": "calibrated per client to target_epsilon"}
        return {"epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "accountant": self.kind, "dp": "dpsgd", **calibrated,
                "epsilon_is": ("per example, held by each client's own accountant (the server sees no count)" if held
                               else "per example, the largest over clients, from their data sizes and the tasks "
                                    "each was given")}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tasks": dict(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tasks = {str(k): int(v) for k, v in state.get("tasks", {}).items()}


def DPFedAvg(local: LocalConfig | None = None, *, clip_norm: float, noise_multiplier: float,  # noqa: N802
             sampling_rate: float, num_clients: int, delta: float, **options: Any) -> CentralDP:
    """DP-FedAvg as one object: FedAvg, Poisson sampling at ``sampling_rate``, central DP (the Python API)."""
    from fedlearn.strategies.fedavg import FedAvg

    inner = FedAvg(local=local, sampler=PoissonSampler(sampling_rate))
    return CentralDP(inner, clip_norm=clip_norm, noise_multiplier=noise_multiplier, delta=delta,
                     population=num_clients, **options)
