"""An algorithm is a composition: sampler + client hooks + transform requests + aggregator + server optimizer.

``Strategy`` wires them: it samples (the sampler is the one source of the rate an accountant
reads), makes one task per client with named arrays (``weights`` and whatever the algorithm adds),
starts a streaming ``Aggregator`` per round and hands its result to ``apply``, which by default is
the server optimizer's step on the aggregated ``update``. Wrappers (central DP, local DP, DP-SGD)
compose with any strategy by delegating to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from fedlearn.errors import CheckpointError, ConfigError, InvalidUpdateError
from fedlearn.metrics import pool_federated
from fedlearn.privacy.dp import PrivacyRandom
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import Arrays, EvalResult, EvalTask, TrainResult, TrainTask
from fedlearn.registry import NoConfig, build
from fedlearn.seeding import derive_seed
from fedlearn.strategies.aggregate import WeightedMean
from fedlearn.strategies.optimizers import ServerOptimizer, ServerSGD
from fedlearn.tasks import pool_task_sums
from fedlearn.transforms.base import UpdateTransform


@dataclass
class ServerState:
    """Everything the server holds between rounds: the global weights and named server-side arrays."""

    weights: torch.Tensor
    extras: Arrays = field(default_factory=dict)
    version: int = 0


# ----- samplers ----------------------------------------------------------------------------------
class Sampler:
    """Which clients take part in a round. ``rate`` and ``kind`` are what a privacy accountant reads."""

    kind: ClassVar[str] = "uniform"

    def __init__(self, fraction: float = 1.0, min_clients: int = 1) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1]; got {fraction}")
        self.fraction = float(fraction)
        self.min_clients = int(min_clients)
        self.population = 0

    @property
    def rate(self) -> float:
        return self.fraction

    def expected(self) -> float:
        """The expected number of clients per round for the population last sampled."""
        return self.rate * self.population

    def sample(self, client_ids: Sequence[str], rnd: int, seed: int) -> list[str]:
        """McMahan et al.'s m = max(ceil(C K), min_clients) clients uniformly without replacement, in order."""
        self.population = len(client_ids)
        m = min(len(client_ids), max(math.ceil(self.fraction * len(client_ids) - 1e-9), self.min_clients, 1))
        if m == len(client_ids):
            return list(client_ids)
        rng = np.random.default_rng([seed, rnd])
        return [client_ids[i] for i in np.sort(rng.choice(len(client_ids), size=m, replace=False))]


class PoissonSampler(Sampler):
    """Each client joins a round independently with probability ``rate`` (what DP amplification assumes).

    Amplification by sampling holds only if nobody can predict the sample, so the coins come from the OS's CSPRNG;
    ``secret=False`` (the simulation-only seeded-privacy switch) draws them from the run seed, reproducibly.
    """

    kind = "poisson"

    def __init__(self, rate: float, *, secret: bool = True) -> None:
        super().__init__(rate, 0)
        self.secret = secret

    def sample(self, client_ids: Sequence[str], rnd: int, seed: int) -> list[str]:
        self.population = len(client_ids)
        if self.secret:
            coins = PrivacyRandom().uniform(len(client_ids)).numpy()
        else:
            coins = np.random.default_rng([seed, rnd, 0x5EED]).random(len(client_ids))
        return [cid for cid, coin in zip(client_ids, coins) if coin < self.fraction]


# ----- aggregators -------------------------------------------------------------------------------
class Aggregator:
    """One round's aggregate, folded in result by result (streaming: no update is kept)."""

    needs_each_update: ClassVar[bool] = False

    def add(self, result: TrainResult, arrays: Arrays) -> None:
        """Fold in one client's checked arrays."""
        raise NotImplementedError

    def add_sum(self, sums: Arrays, total_weight: float, count: int, extras: Mapping[str, int]) -> None:
        """Fold in a securely aggregated sum of ``count`` clients' weighted arrays and their summed extras."""
        raise ConfigError(f"{type(self).__name__} needs each client's update; it cannot use secure aggregation")

    @property
    def count(self) -> int:
        raise NotImplementedError

    def result(self) -> Arrays:
        """The aggregated arrays (a mean update, never new weights)."""
        raise NotImplementedError


class MeanAggregator(Aggregator):
    """The weighted mean of every uplink array: weights n_k (``examples``) or 1 (``uniform``), in float64."""

    def __init__(self, names: Sequence[str], weighting: str = "examples") -> None:
        self.names = tuple(names)
        self.weighting = weighting
        self._means = {name: WeightedMean() for name in self.names}
        self._count = 0

    def add(self, result: TrainResult, arrays: Arrays) -> None:
        weight = float(result.num_examples) if self.weighting == "examples" else 1.0
        for name in self.names:
            self._means[name].add(arrays[name], weight)
        self._count += 1

    def add_sum(self, sums: Arrays, total_weight: float, count: int, extras: Mapping[str, int]) -> None:
        weight = total_weight if self.weighting == "examples" else float(count)
        for name in self.names:
            self._means[name].add_sum(sums[name], weight, count)
        self._count += count

    @property
    def count(self) -> int:
        return self._count

    def result(self) -> Arrays:
        return {name: mean.mean() for name, mean in self._means.items()}


# ----- the strategy ------------------------------------------------------------------------------
class Strategy:
    """A federated algorithm assembled from parts; subclasses set what differs (hooks, arrays, apply).

    ``uplink`` names the arrays every client returns and the aggregator averages; ``weighting`` is
    how they are weighted (``None``: the strategy needs individual updates, so secure aggregation
    and HE refuse it); ``secure_extras`` are per-client 0/1 metrics summed alongside.
    """

    name: ClassVar[str] = "strategy"
    Config: ClassVar[type] = NoConfig
    default_optimizer: ClassVar[str] = "sgd"
    mode: ClassVar[str] = "delta"
    uplink: tuple[str, ...] = ("update",)
    weighting: str | None = "examples"
    secure_extras: tuple[str, ...] = ()
    # Why this strategy cannot run on a hidden sum (secure aggregation, HE), or None when it can.
    secure_refusal: ClassVar[str | None] = None
    # DP-FedAvg must release a (noised) update even when few or no sampled clients answered,
    # or the number of answers would leak through whether the model changed.
    aggregates_empty_rounds: ClassVar[bool] = False

    def __init__(self, *, config: Any = None, local: LocalConfig | None = None, sampler: Sampler | None = None,
                 optimizer: ServerOptimizer | None = None) -> None:
        self.config = config if config is not None else self.Config()
        validate = getattr(self.config, "validate", None)
        if validate is not None:  # a config built directly (FedProx(config=...)) is checked too
            validate()
        self.local = replace(local or LocalConfig(), mode=self.mode)
        self.sampler = sampler or Sampler()
        self.optimizer = optimizer or ServerSGD(ServerSGD.Config())
        self.transforms: list[UpdateTransform] = []

    @classmethod
    def from_values(cls, values: Mapping[str, Any], *, local: LocalConfig, sampler: Sampler,
                    config: Any = None) -> Strategy:
        """Build with the server optimizer named by ``server_optimizer`` (or this algorithm's default)."""
        name = values.get("server_optimizer") or cls.default_optimizer
        return cls(config=config, local=local, sampler=sampler, optimizer=build("optimizer", name, values))

    # --- what clients are asked to do ---
    def hooks(self) -> dict[str, dict[str, Any]]:
        """Client hooks to request, by name with settings."""
        return {}

    def round_config(self) -> dict[str, Any]:
        """The plain config every task of a round shares: local training, uplink arrays, hook and transform requests."""
        config: dict[str, Any] = self.local.to_dict()
        config["uplink"] = list(self.uplink)
        hooks = self.hooks()
        if hooks:
            config["hooks"] = hooks
        if self.transforms:
            config["transforms"] = [t.request() for t in self.transforms]
        return config

    def client_config(self, rnd: int, client_id: str) -> dict[str, Any]:
        """What one client's task adds to the round's config (nothing by default)."""
        return {}

    def task_config(self, rnd: int, client_id: str, seed: int) -> dict[str, Any]:
        """One task's config: the round's, with this (round, client)'s seed and additions."""
        return {**self.round_config(), "seed": derive_seed(seed, rnd, client_id), **self.client_config(rnd, client_id)}

    def task_arrays(self, state: ServerState) -> Arrays:
        """The named arrays every task of the round carries (shared tensors: no copies)."""
        return {"weights": state.weights}

    def configure_train(self, rnd: int, state: ServerState, client_ids: Sequence[str], seed: int) -> list[TrainTask]:
        arrays = self.task_arrays(state)
        shared = self.round_config()  # built once per round; each task adds only its own seed
        return [TrainTask(rnd, cid, arrays, {**shared, "seed": derive_seed(seed, rnd, cid),
                                             **self.client_config(rnd, cid)}, state.version) for cid in client_ids]

    def hidden_sum_encoding(self, rnd: int, client_ids: Sequence[str], length: int, *, bits: int, threshold: int,
                            corrupt: float) -> Any | None:
        """How clients encode into a secure sum when the strategy needs more than SecAgg's fixed point (distributed
        DP's noise shares), or None for the fixed point."""
        return None

    def expected_arrays(self, state: ServerState) -> dict[str, int]:
        """Each uplink array's length, for validating results and sizing uploads."""
        return {name: state.weights.numel() for name in self.uplink}

    # --- what the server does with the answers ---
    def aggregator(self, rnd: int, state: ServerState) -> Aggregator:
        if self.weighting is None:
            raise ConfigError(f"{self.name} must define its own aggregator")
        return MeanAggregator(self.uplink, self.weighting)

    def apply(self, state: ServerState, aggregate: Arrays, count: int) -> ServerState:
        """New server state from the round's aggregate of ``count`` clients: the optimizer's step on the mean update."""
        return ServerState(self.optimizer.step(state.weights, aggregate["update"]), state.extras, state.version + 1)

    def configure_evaluate(self, rnd: int, state: ServerState, client_ids: Sequence[str]) -> list[EvalTask]:
        config = {"eval_batch_size": self.local.eval_batch_size}
        arrays = {"weights": state.weights}
        return [EvalTask(rnd, cid, arrays, config, state.version) for cid in client_ids]

    def aggregate_evaluate(self, results: Sequence[EvalResult]) -> dict[str, float | None]:
        """Sample-weighted means of the clients' metrics; binary tasks' counts and histograms summed exactly."""
        results = [r for r in results if r.num_examples > 0]
        n = sum(r.num_examples for r in results)
        if n == 0:
            return {}
        keys = set.intersection(*(set(r.metrics) for r in results)) & {"loss", "accuracy", "mse", "mae", "auc"}
        out: dict[str, Any] = {k: sum(r.metrics[k] * r.num_examples for r in results) / n for k in sorted(keys)}
        out["num_examples"] = n
        out.update({k: v for k, v in pool_task_sums(r.metrics for r in results).items() if v is not None})
        out.update(pool_federated(r.metrics for r in results))
        return out

    def round_metrics(self) -> dict[str, Any]:
        """Extra fields for this round's metrics row (e.g. the privacy spent so far)."""
        return {}

    def can_continue(self, next_round: int) -> bool:
        """False when running ``next_round`` would break a limit the strategy keeps (a privacy budget)."""
        return True

    def set_local(self, **changes: Any) -> None:
        """Change the local hyper-parameters for the following rounds (e.g. lr decay)."""
        known = LocalConfig.__dataclass_fields__
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ConfigError(f"unknown local setting {unknown[0]!r}; known: {', '.join(known)}")
        self.local = replace(self.local, **{**changes, "mode": self.mode})  # the algorithm fixes the mode
        self.local.check()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume this strategy after a restart."""
        return {"local": self.local.to_dict(), "optimizer": self.optimizer.state_dict(),
                "config": asdict(self.config)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.local = LocalConfig.from_dict(state["local"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"strategy state is damaged ({exc}); start a new run") from None


def check_arrays(result: TrainResult, expected: Mapping[str, int], *, finite: bool = True) -> Arrays:
    """The result's uplink arrays, each a finite flat float vector of the declared length, or InvalidUpdateError.

    ``finite=False`` leaves the NaN/Inf scan to a caller that reads every value anyway (the influence bound's
    norm refuses a non-finite array), so the update is read once, not twice.
    """
    arrays = result.arrays
    if not isinstance(arrays, dict) or set(arrays) != set(expected):
        got = sorted(arrays) if isinstance(arrays, dict) else type(arrays).__name__
        raise InvalidUpdateError(f"result from {result.client_id} carries arrays {got}; the round expects "
                                 f"{sorted(expected)}")
    for name, length in expected.items():
        value = arrays[name]
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            raise InvalidUpdateError(f"array {name!r} from {result.client_id} is not a float32 vector")
        if value.dim() != 1 or value.numel() != length:
            raise InvalidUpdateError(f"array {name!r} from {result.client_id} has shape {tuple(value.shape)} but "
                                     f"the model needs a flat vector of {length} values")
        if finite:
            check_finite(result.client_id, name, value)
    return arrays


def check_finite(client_id: str, name: str, value: torch.Tensor) -> None:
    """InvalidUpdateError when the array holds NaN or Inf."""
    low, high = torch.aminmax(value)  # NaN propagates; ~20x cheaper than isfinite().all()
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise InvalidUpdateError(f"array {name!r} from {client_id} contains NaN or Inf")
