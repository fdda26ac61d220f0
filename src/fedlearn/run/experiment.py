"""Builds a runnable experiment (data, clients, model, strategy, runtime, round loop) from a RunConfig."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from fedlearn.client.app import UNNOISED_METRICS, ClientApp, ClientPolicy
from fedlearn.client.budget import ClientBudget
from fedlearn.client.data import ClientData
from fedlearn.client.secure import SecureClients
from fedlearn.client.state import ClientStateStore
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data import DatasetBundle, label_counts, load_dataset, partition_indices, split_train_test
from fedlearn.data.datasets import partition_labels
from fedlearn.data.partition import natural_group_count
from fedlearn.errors import ConfigError
from fedlearn.models import build_model
from fedlearn.privacy.distributed import SharePolicy
from fedlearn.privacy.dpsgd import DPSGDHook
from fedlearn.protocol.local import LocalConfig, TrainingKeys
from fedlearn.protocol.params import ModelVector, ParamSpec
from fedlearn.registry import lookup
from fedlearn.run.config import DEFAULT_CLIENTS, RunConfig
from fedlearn.runtime.base import Runtime
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.seeding import derive_seed
from fedlearn.server.evaluation import CentralEvaluator
from fedlearn.server.influence import InfluenceBound
from fedlearn.server.loop import RoundCallback, RoundLoop
from fedlearn.server.secure import HE_BITS, HomomorphicRound, SecAggSettings, SecureAggregationRound, require_sum_only
from fedlearn.strategies import Strategy
from fedlearn.strategies.base import Sampler
from fedlearn.strategies.dp import DPSGD, CentralDP, LocalDP
from fedlearn.tasks import get_task
from fedlearn.transforms import Clip, GaussianNoise


@dataclass
class Experiment:
    """A configured run: ``loop.run(config.rounds)`` trains it."""

    config: RunConfig
    bundle: DatasetBundle
    clients: dict[str, ClientData]
    partition: list[dict[str, Any]]
    loop: RoundLoop
    model: torch.nn.Module  # the server's copy, holding the global weights after ``load_global``
    task: str = "classification"

    @property
    def final_metric(self) -> str:
        """The metric summary.json reports first: accuracy, AUC (multilabel) or MSE (regression)."""
        return get_task(self.task).primary_metric

    def load_global(self) -> torch.nn.Module:
        """The server's model with the current global weights loaded."""
        ModelVector(self.model, personal_patterns(self.config)).load(self.loop.weights)
        return self.model


def build_clients(config: RunConfig, bundle: DatasetBundle) -> tuple[dict[str, ClientData], list[dict[str, Any]]]:
    """Partition the training split over clients and give each its own train/test share."""
    labels, classes = partition_labels(bundle, "train")
    shares = partition_indices(
        labels, config.clients, config.partition, seed=config.seed, alpha=config.alpha,
        shards_per_client=config.shards_per_client, groups=bundle.train_groups, min_size=config.min_partition_size,
    )
    natural = config.partition == "natural" and bundle.test_groups is not None
    test_labels, _ = partition_labels(bundle, "test")
    clients: dict[str, ClientData] = {}
    info: list[dict[str, Any]] = []
    for i, share in enumerate(shares):
        if natural:
            group = int(bundle.train_groups[share[0]])
            client_id = bundle.group_names[group] if bundle.group_names else f"writer-{group}"
            train_idx, test_idx = share, np.flatnonzero(bundle.test_groups == group)
            test_base, test_lab = bundle.test, test_labels
        else:
            client_id = f"client-{i}"
            split_seed = derive_seed(config.seed, "split", i)
            train_idx, test_idx = split_train_test(share, config.effective_client_test_fraction, split_seed)
            test_base, test_lab = bundle.train, labels
        train = Subset(bundle.train, torch.as_tensor(train_idx, dtype=torch.long))
        test = Subset(test_base, torch.as_tensor(test_idx, dtype=torch.long)) if len(test_idx) else None
        clients[client_id] = ClientData(train, test)
        info.append({
            "client_id": client_id,
            "num_train": int(len(train_idx)),
            "num_test": int(len(test_idx)),
            "label_counts": label_counts(labels, train_idx, classes),
            "test_label_counts": label_counts(test_lab, test_idx, classes),
        })
    return clients, info


def initial_model(config: RunConfig, bundle: DatasetBundle) -> torch.nn.Module:
    """The run's starting model: the same weights for the same seed in every process."""
    torch.manual_seed(config.seed)
    return build_model(config.model, bundle.input_shape, bundle.num_classes)


def local_config(config: RunConfig) -> LocalConfig:
    """The task's local config: the run's training keys (both extend TrainingKeys)."""
    return LocalConfig(**{f.name: getattr(config, f.name) for f in fields(TrainingKeys)})


log = logging.getLogger(__name__)

RuntimeFactory = Callable[[RunConfig, ParamSpec], Runtime]


def resolve_clients(config: RunConfig, bundle: DatasetBundle | None = None) -> RunConfig:
    """``--clients`` when given; without it DEFAULT_CLIENTS, or under ``--partition natural`` one client per group
    (writer) of the dataset, which is loaded for the count when ``bundle`` is None."""
    if config.clients is not None:
        return config
    if config.partition != "natural":
        return config.updated({"clients": DEFAULT_CLIENTS})
    if bundle is None:
        bundle = load_dataset(config.dataset, config.data_dir, download=config.download)
    count = natural_group_count(bundle.train_groups)
    if count is None:
        raise ConfigError(f"partition 'natural' needs a dataset with natural owners such as femnist, and "
                          f"{config.dataset} has none; choose another partition")
    return config.updated({"clients": count})


def protected_units(config: RunConfig, examples: int | None = None) -> tuple[int, str]:
    """What DP protects and how many of them: clients under central and local DP, training examples under DP-SGD
    (``examples``, the training split's size when known, else the clients as a lower bound)."""
    if config.dp == "dpsgd" and examples:
        return examples, "training examples"
    return config.clients, "clients"


def resolve_privacy(config: RunConfig, examples: int | None = None) -> RunConfig:
    """Fill in what DP derives: delta's default (min(1e-5, 1/n^1.1) for n protected units), and the noise
    multiplier calibrated to a target epsilon. Warns when a given delta is at least 1/n."""
    if config.dp == "none":
        return config
    from fedlearn.privacy.accountant import calibrate_noise_multiplier, default_delta, delta_warning  # scipy

    changes: dict = {}
    units, unit = protected_units(config, examples)
    delta = config.delta if config.delta is not None else default_delta(units)
    warning = delta_warning(delta, units, unit)
    if warning:
        log.warning("%s", warning)
    changes["delta"] = delta
    if config.target_epsilon is not None and config.target_mode == "calibrate" and config.dp == "local":
        # every round counts for a client, with sensitivity 2C: calibrate z / 2 without sampling
        changes["noise_multiplier"] = 2 * calibrate_noise_multiplier(
            config.target_epsilon, sampling_rate=1.0, steps=config.rounds, delta=delta, kind=config.accountant)
    elif config.target_epsilon is not None and config.dp == "dpsgd":
        pass  # each client calibrates its own noise from its own data size (DPSGDHook.noise_for)
    elif config.target_epsilon is not None and config.dp == "distributed":
        from fedlearn.privacy.distributed import calibrate  # its own accountant: the discrete sum's zCDP bound

        changes["noise_multiplier"] = calibrate(config.target_epsilon, config.fraction, config.rounds, delta)
    elif config.target_epsilon is not None and config.target_mode == "calibrate":
        changes["noise_multiplier"] = calibrate_noise_multiplier(
            config.target_epsilon, sampling_rate=config.fraction, steps=config.rounds, delta=delta,
            kind=config.accountant, clipped_count_stddev=clipped_count_stddev(config))
    elif config.target_epsilon is not None and config.dp == "central":  # --target-mode stop
        from fedlearn.privacy.accountant import PrivacyAccountant

        first = PrivacyAccountant(noise_multiplier=config.noise_multiplier, sampling_rate=config.fraction,
                                  delta=delta, kind=config.accountant,
                                  clipped_count_stddev=clipped_count_stddev(config)).epsilon_after(1)
        if first > config.target_epsilon:
            raise ConfigError(f"--target-epsilon {config.target_epsilon:g} is below one round's epsilon "
                              f"({first:.3g} at --noise-multiplier {config.noise_multiplier:g}, --fraction "
                              f"{config.fraction:g}, delta {delta:.3g}), so no round could run; raise "
                              "--noise-multiplier or --target-epsilon")
    return config.updated(changes)


def local_noise_warning(noise_multiplier: float, numel: int, clients_per_round: float) -> str | None:
    """Under local DP every client noises its own clipped update, so a round's mean carries noise of norm about
    z C sqrt(d / K) against at most C of signal: a warning when that ratio is past 3 (the model will not learn)."""
    ratio = noise_multiplier * math.sqrt(numel / max(clients_per_round, 1.0))
    if ratio <= 3:
        return None
    needed = (noise_multiplier ** 2) * numel
    return (f"--dp local: each round's mean update carries noise about {ratio:.3g}x the largest possible signal "
            f"(noise multiplier {noise_multiplier:.3g}, {numel:,} parameters, ~{clients_per_round:.0f} clients a "
            f"round), so the model will not learn; noise equal to the signal needs ~{needed:,.0f} clients a round: "
            "use a much smaller model or far more clients, or --dp central (or secure aggregation with --dp central) "
            "where a server may be trusted with the sum")


def clipped_count_stddev(config: RunConfig) -> float | None:
    """Noise on adaptive clipping's count (Andrew et al.'s m/20 for m expected clients), or None."""
    if config.adaptive_clip_quantile is None:
        return None
    return config.fraction * config.clients / 20


def strategy_for(config: RunConfig, clients: Mapping[str, ClientData] | None = None) -> Strategy:
    """The configured algorithm (through the registry), wrapped by the DP mode ``config.dp`` asks for."""
    cls = lookup("strategy", config.algorithm)
    values = config.to_dict()
    from fedlearn.registry import make_config

    strategy = cls.from_values(values, local=local_config(config),
                               sampler=Sampler(config.fraction, config.min_clients),
                               config=make_config("strategy", cls, values))
    if config.dp == "none":
        return strategy
    config = resolve_privacy(config)
    if config.dp == "dpsgd":  # a simulation knows its clients' counts; a server over gRPC does not
        counts = None if not clients else {cid: (len(c.train), c.batch_size or config.batch_size)
                                           for cid, c in clients.items()}
        return DPSGD(strategy, clip_norm=config.clip_norm, noise_multiplier=config.noise_multiplier,
                     delta=config.delta, accountant=config.accountant, counts=counts,
                     target_epsilon=config.target_epsilon, rounds=config.rounds)
    if config.dp == "distributed":
        from fedlearn.strategies.distributed_dp import DistributedDP

        return DistributedDP(strategy, clip_norm=config.clip_norm, noise_multiplier=config.noise_multiplier,
                             delta=config.delta, population=config.clients,
                             seeded=privacy_seed(config, "distributed-dp"))
    if config.dp == "local":
        return LocalDP(strategy, clip_norm=config.clip_norm, noise_multiplier=config.noise_multiplier,
                       delta=config.delta, accountant=config.accountant)
    return CentralDP(strategy, clip_norm=config.clip_norm, noise_multiplier=config.noise_multiplier,
                     delta=config.delta, accountant=config.accountant, target_epsilon=config.target_epsilon,
                     stop_at_budget=config.target_mode == "stop", noise_seed=privacy_seed(config, "central-noise"),
                     adaptive_quantile=config.adaptive_clip_quantile, clip_learning_rate=config.clip_learning_rate,
                     population=config.clients)


def personal_patterns(config: RunConfig) -> tuple[str, ...]:
    """``--personal-layers`` as a tuple of name patterns (comma-separated)."""
    return tuple(p.strip() for p in (config.personal_layers or "").split(",") if p.strip())


def privacy_seed(config: RunConfig, purpose: str) -> int | None:
    """The seed privacy randomness comes from under the simulation-only seeded-privacy switch, else None."""
    return derive_seed(config.seed, purpose) if config.seeded_privacy else None


def client_policy(config: RunConfig) -> ClientPolicy:
    """What this run's clients require of every task, whatever the server asks (their own privacy policy):
    under local DP and DP-SGD, where the server is the party the noise protects against, their own clip and
    noise and budget, and they keep their train loss."""
    if config.dp == "local":
        config = resolve_privacy(config)
        return ClientPolicy([Clip(Clip.Config(config.clip_norm)),
                             GaussianNoise(GaussianNoise.Config(config.noise_multiplier * config.clip_norm))],
                            withheld=UNNOISED_METRICS, budget=client_budget(config))
    if config.dp == "dpsgd":
        config = resolve_privacy(config)
        hook = DPSGDHook(DPSGDHook.Config(clip=config.clip_norm, noise_multiplier=config.noise_multiplier,
                                          delta=config.delta, accountant=config.accountant,
                                          target_epsilon=config.target_epsilon, rounds=config.rounds))
        return ClientPolicy(hooks={"dpsgd": hook}, withheld=UNNOISED_METRICS, budget=client_budget(config),
                            count_withheld=True)
    if config.dp == "distributed":
        config = resolve_privacy(config)
        share = SharePolicy(config.clip_norm, min_share_noise(config))
        return ClientPolicy([Clip(Clip.Config(config.clip_norm))], withheld=UNNOISED_METRICS, share=share,
                            budget=client_budget(config))
    return ClientPolicy()  # central DP trusts the server, which clips again (adaptively, when asked) and noises


def min_share_noise(config: RunConfig) -> float:
    """The least noise share (over the integer sensitivity) a distributed-DP client accepts: its part of the total
    noise z were twice the expected clients of a round (fraction x clients) honest, so that Poisson sampling's
    larger rounds are not refused."""
    return config.noise_multiplier / math.sqrt(2 * max(1.0, config.fraction * config.clients))


def client_budget(config: RunConfig) -> ClientBudget | None:
    """The client's own budget from its own (privacy-resolved) config, or None without --client-budget."""
    if config.client_budget is None:
        return None
    noise = min_share_noise(config) if config.dp == "distributed" else config.noise_multiplier
    return ClientBudget(config.client_budget, config.delta, config.dp, noise, config.accountant,
                        target_epsilon=config.target_epsilon if config.dp == "dpsgd" else None, rounds=config.rounds)


def client_app(config: RunConfig, model: torch.nn.Module, clients: dict[str, ClientData], task: str, *,
               state: ClientStateStore | None = None, commit_state: bool = False) -> ClientApp:
    """The ClientApp every runtime calls for this run's clients (all of them in simulation, one in a deployment)."""
    trainer = LocalTrainer(model, config.device, task=task, personal=personal_patterns(config))
    return ClientApp(trainer, clients, state=state, secure=SecureClients(config.he_keys),
                     policy=client_policy(config),
                     seeded_privacy=derive_seed(config.seed, "client-privacy") if config.seeded_privacy else None,
                     commit_state=commit_state)


def secure_round(config: RunConfig, strategy: Strategy,
                 clients: dict[str, ClientData]) -> SecureAggregationRound | HomomorphicRound | None:
    """The secure-aggregation or HE exchange ``config`` asks for, checked against the strategy; None without one."""
    if config.he == "none" and config.secure_aggregation == "none":
        return None
    require_sum_only(strategy)
    max_weight = config.secagg_max_weight
    if max_weight is None:
        if not clients:
            raise ConfigError("--secure-aggregation or --he with remote clients needs --secagg-max-weight: the "
                              "largest sample count any client may hold")
        max_weight = max(len(c.train) for c in clients.values())
    clip = config.secagg_clip or (config.clip_norm if config.dp in ("central", "local", "distributed") else 1.0)
    if config.he == "ckks":
        return HomomorphicRound(str(Path(config.he_keys) / "public.ctx"), config.he_key_holder, clip=clip,
                                max_weight=max_weight, bits=min(config.secagg_bits, HE_BITS))
    settings = SecAggSettings(config.secure_aggregation, config.secagg_threshold, config.secagg_bits, clip,
                              config.secagg_neighbours, max_weight, seeded=config.seeded_privacy,
                              corrupt=config.secagg_corrupt_fraction, dropout=config.secagg_dropout_fraction)
    settings.check(strategy)
    return SecureAggregationRound(settings)


def build_experiment(
    config: RunConfig,
    *,
    runtime: RuntimeFactory | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    callbacks: Iterable[RoundCallback] = (),
    before_round: Callable[[int], None] | None = None,
) -> Experiment:
    """Everything for ``config``. Without ``runtime`` the clients are simulated in this process
    (one model for all of them, one for the server's evaluation); with it, clients live wherever
    that runtime reaches (e.g. gRPC) and this process only runs the server.
    """
    config.validate()
    torch.set_num_threads(config.threads)
    bundle = load_dataset(config.dataset, config.data_dir, download=config.download)
    config = resolve_clients(config, bundle).validate()
    model = initial_model(config, bundle)
    task = config.task_name or bundle.task
    server_model = copy.deepcopy(model)
    vector = ModelVector(server_model, personal_patterns(config))
    state: ClientStateStore | None = None
    if runtime is None:
        clients, info = build_clients(config, bundle)
        state = ClientStateStore(Path(checkpoint_path).parent / "client_state" if checkpoint_path else None)
        app = client_app(config, model, clients, task, state=state)
        if checkpoint_path and config.he != "none":  # the simulated clients' HE keys serve this run only
            from fedlearn.run.rundir import RunDir

            app.secure.bind_run(RunDir(Path(checkpoint_path).parent).run_id)
        client_runtime: Runtime = InProcessRuntime(app)
    else:
        clients, info = {}, []
        client_runtime = runtime(config, vector.spec)
    evaluator = None
    if config.evaluation in ("centralized", "both"):
        evaluator = CentralEvaluator(server_model, bundle.test, config.device, task=task,
                                     personal=personal_patterns(config))
    strategy = strategy_for(config, clients)
    if config.dp == "local":
        warning = local_noise_warning(resolve_privacy(config).noise_multiplier, vector.spec.numel,
                                      config.fraction * config.clients)
        if warning:
            log.warning("%s", warning)
    loop = RoundLoop(
        strategy, client_runtime, vector.spec, vector.read(), min_clients=config.min_clients,
        min_fit_fraction=config.min_fit_fraction, seed=config.seed,
        evaluator=evaluator, federated_eval=config.evaluation in ("federated", "both"),
        checkpoint_path=checkpoint_path, callbacks=callbacks,
        sums=secure_round(config, strategy, clients), client_state=state,
        before_round=before_round, reported=get_task(task).reported,
        influence=InfluenceBound(config.update_bound) if config.update_bound > 0 else None,
        max_examples=config.max_examples_per_client,
        binary=task == "classification" and bundle.num_classes == 2,
    )
    return Experiment(config, bundle, clients, info, loop, server_model, task)
