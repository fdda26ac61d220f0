"""The run configuration: one validated dataclass, from YAML and command-line flags alike."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedlearn.errors import ConfigError
from fedlearn.protocol.local import TrainingKeys

EVALUATIONS = ("centralized", "federated", "both")
DP_MODES = ("none", "central", "local", "dpsgd")
ACCOUNTANTS = ("rdp", "pld")
TARGET_MODES = ("calibrate", "stop")
SECURE_MODES = ("none", "secagg", "secagg+")
HE_MODES = ("none", "ckks")


LOSSES = {"cross-entropy": "classification", "bce": "multilabel", "mse": "regression"}


def component_settings() -> dict[str, Any]:
    """Config keys declared by registered components (server optimizers, client hooks, ...), by key."""
    from fedlearn.registry import settings

    return settings()


@dataclass(frozen=True)
class RunConfig(TrainingKeys):
    """Everything a run needs. YAML keys are these names; flags are the same with dashes.

    Keys that a registered component declares (``server_lr``, ``server_optimizer``, ...) live in
    ``components`` and read like fields; the registry validates them, so a new component edits nothing here.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str = "seed-cnn"
    algorithm: str = "fedavg"
    mu: float = 0.01
    clients: int = 10
    fraction: float = 1.0
    min_clients: int = 1
    min_fit_fraction: float = 0.0
    round_timeout: float = 300.0
    rounds: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    min_partition_size: int = 1
    client_test_fraction: float = 0.2
    evaluation: str = "centralized"
    dp: str = "none"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float | None = None
    target_epsilon: float | None = None
    target_mode: str = "calibrate"
    accountant: str = "rdp"
    adaptive_clip_quantile: float | None = None
    clip_learning_rate: float = 0.2
    seeded_privacy: bool = False
    secure_aggregation: str = "none"
    secagg_threshold: float = 0.67
    secagg_bits: int = 32
    secagg_clip: float | None = None
    secagg_neighbours: int | None = None
    secagg_max_weight: int | None = None
    he: str = "none"
    he_keys: str | None = None
    he_key_holder: str | None = None
    task: str | None = None
    loss: str | None = None
    personal_layers: str | None = None
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    download: bool = True
    output: str | None = None
    components: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "components":
            raise AttributeError(name)
        settings = component_settings()
        if name in settings:
            return self.components.get(name, settings[name].default)
        raise AttributeError(f"RunConfig has no setting {name!r}")

    def validate(self) -> RunConfig:
        """Check every field; raise ConfigError naming the first bad one and what is allowed."""
        for f in fields(self):
            if f.name != "components":
                _check_type(f.name, getattr(self, f.name), f.type)
        from fedlearn.data import DATASETS, PARTITIONS
        from fedlearn.models import MODELS
        from fedlearn.registry import check_value, lookup, make_config
        from fedlearn.tasks import TASKS

        _one_of("dataset", self.dataset, DATASETS)
        _one_of("model", self.model, MODELS)
        settings = component_settings()
        for key, value in self.components.items():
            check_value(key, value, settings[key].type)
        strategy = lookup("strategy", self.algorithm)
        make_config("strategy", strategy, self.to_dict())
        optimizer = self.server_optimizer or getattr(strategy, "default_optimizer", None)
        if optimizer is not None:  # the algorithm's default optimizer checks --server-lr etc. too
            make_config("optimizer", lookup("optimizer", optimizer), self.to_dict())
        if self.task is not None:
            _one_of("task", self.task, TASKS)
        if self.loss is not None:
            _one_of("loss", self.loss, tuple(LOSSES))
            if self.task is not None and LOSSES[self.loss] != self.task:
                raise ConfigError(f"--loss {self.loss} is the {LOSSES[self.loss]} loss, but --task is {self.task}")
        _one_of("partition", self.partition, PARTITIONS)
        _one_of("evaluation", self.evaluation, EVALUATIONS)
        _one_of("dp", self.dp, DP_MODES)
        _one_of("accountant", self.accountant, ACCOUNTANTS)
        _one_of("target_mode", self.target_mode, TARGET_MODES)
        self._validate_dp()
        self._validate_secure()
        for name in ("clients", "rounds", "local_epochs", "batch_size", "shards_per_client", "threads", "min_clients"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{_flag(name)} must be a positive integer; got {getattr(self, name)}")
        if self.min_partition_size < 0:
            raise ConfigError(f"--min-partition-size must be >= 0 (0: clients may hold no data and are never "
                              f"sampled); got {self.min_partition_size}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1]; got {self.fraction}")
        if self.alpha <= 0:
            raise ConfigError(f"--alpha must be > 0 (smaller is more skewed); got {self.alpha}")
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0; got {self.lr}")
        for name in ("mu", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_flag(name)} must be >= 0; got {getattr(self, name)}")
        if not 0 <= self.min_fit_fraction <= 1:
            raise ConfigError(f"--min-fit-fraction must be in [0, 1]; got {self.min_fit_fraction}")
        if self.round_timeout <= 0:
            raise ConfigError(f"--round-timeout must be > 0 seconds; got {self.round_timeout}")
        if not 0 <= self.client_test_fraction < 1:
            raise ConfigError(f"--client-test-fraction must be in [0, 1); got {self.client_test_fraction}")
        if self.min_clients > self.clients:
            raise ConfigError(f"--min-clients ({self.min_clients}) cannot exceed --clients ({self.clients})")
        if self.evaluation != "centralized" and self.client_test_fraction == 0:
            raise ConfigError("--evaluation federated needs client test data; set --client-test-fraction > 0")
        return self

    def _validate_dp(self) -> None:
        if self.dp == "none":
            return
        if self.algorithm == "fedsgd":
            raise ConfigError("--dp works with algorithms whose clients send model updates; --algorithm fedsgd "
                              "sends gradients, whose clipping this DP accounting does not cover")
        if self.dp in ("local", "dpsgd") and (self.target_epsilon is not None and self.target_mode == "stop"
                                              or self.adaptive_clip_quantile is not None):
            raise ConfigError(f"--dp {self.dp} supports --target-mode calibrate only, without --adaptive-clip-quantile")
        if self.dp == "dpsgd" and self.target_epsilon is not None:
            raise ConfigError("--dp dpsgd: give --noise-multiplier (calibrating to --target-epsilon needs each "
                              "client's data size, which the server does not know before training)")
        if self.clip_norm <= 0:
            raise ConfigError(f"--clip-norm must be > 0 with --dp; got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"--noise-multiplier must be >= 0; got {self.noise_multiplier}")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigError(f"--delta must be in (0, 1); got {self.delta}")
        if self.adaptive_clip_quantile is not None and not 0 < self.adaptive_clip_quantile < 1:
            raise ConfigError(f"--adaptive-clip-quantile must be in (0, 1); got {self.adaptive_clip_quantile}")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ConfigError(f"--target-epsilon must be > 0; got {self.target_epsilon}")

    def _validate_secure(self) -> None:
        _one_of("secure_aggregation", self.secure_aggregation, SECURE_MODES)
        _one_of("he", self.he, HE_MODES)
        if self.secure_aggregation != "none" and self.he != "none":
            raise ConfigError("choose one of --secure-aggregation and --he: both hide individual updates")
        if (self.secure_aggregation != "none" or self.he != "none") and self.dp == "dpsgd":
            raise ConfigError("--dp dpsgd keeps a per-client accountant from each client's sample count, which "
                              "secure aggregation hides; use --dp central or local with it")
        if self.secure_aggregation != "none":
            if not (0 < self.secagg_threshold < 1 or (self.secagg_threshold >= 2 and
                                                       float(self.secagg_threshold).is_integer())):
                raise ConfigError("--secagg-threshold must be a fraction in (0, 1) of the sampled clients or a "
                                  f"count >= 2; got {self.secagg_threshold}")
            if not 8 <= self.secagg_bits <= 64:
                raise ConfigError(f"--secagg-bits must be between 8 and 64; got {self.secagg_bits}")
            if self.secagg_clip is not None and self.secagg_clip <= 0:
                raise ConfigError(f"--secagg-clip must be > 0; got {self.secagg_clip}")
            if self.secagg_neighbours is not None and self.secagg_neighbours < 2:
                raise ConfigError(f"--secagg-neighbours must be >= 2; got {self.secagg_neighbours}")
            if self.secagg_max_weight is not None and self.secagg_max_weight < 1:
                raise ConfigError(f"--secagg-max-weight must be >= 1; got {self.secagg_max_weight}")
        if self.he != "none" and not self.he_keys:
            raise ConfigError("--he ckks needs --he-keys DIR made by `fedlearn he keygen --dir DIR`")

    def to_dict(self) -> dict[str, Any]:
        """Every key as YAML writes it: the fields, then the components' keys, flat."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "components"}
        out.update(self.components)
        return out

    @property
    def task_name(self) -> str | None:
        """The task the run trains: --task, or the one --loss implies, or None (the dataset's)."""
        return self.task or (LOSSES[self.loss] if self.loss else None)

    def updated(self, changes: dict[str, Any], source: str = "flags") -> RunConfig:
        """A copy with ``changes`` applied; unknown keys are refused with the list of known ones."""
        known = {f.name for f in fields(self)} - {"components"}
        settings = component_settings()
        unknown = sorted(set(changes) - known - set(settings))
        if unknown:
            raise ConfigError(f"{source}: unknown key {unknown[0]!r}; known keys: "
                              f"{', '.join(sorted(known | set(settings)))}")
        components = {**self.components, **{k: v for k, v in changes.items() if k in settings and k not in known}}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k in known}, components=components)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of config keys (dashes in keys are accepted and turned into underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}")


def _check_type(name: str, value: Any, annotation: Any) -> None:
    text = str(annotation)
    optional = "None" in text
    if value is None:
        if not optional:
            raise ConfigError(f"{_flag(name)} needs a value")
        return
    if text.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif text.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind = "a number"
    elif text.startswith("bool"):
        ok = isinstance(value, bool)
        kind = "true or false"
    else:
        ok = isinstance(value, str)
        kind = "a string"
    if not ok:
        raise ConfigError(f"{_flag(name)} must be {kind}; got {value!r}")
