"""The run configuration: one validated dataclass, from YAML and command-line flags alike."""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from fedlearn.errors import ConfigError
from fedlearn.protocol.local import TrainingKeys
from fedlearn.protocol.messages import MAX_EXAMPLES_PER_CLIENT
from fedlearn.server.influence import DEFAULT_FACTOR

EVALUATIONS = ("centralized", "federated", "both")
DP_MODES = ("none", "central", "local", "dpsgd", "distributed")
ACCOUNTANTS = ("rdp", "pld")
TARGET_MODES = ("calibrate", "stop")
SECURE_MODES = ("none", "secagg", "secagg+")
HE_MODES = ("none", "ckks")


LOSSES = {"cross-entropy": "classification", "bce": "multilabel", "mse": "regression"}
DEFAULT_CLIENTS = 10  # --clients when not given, except under --partition natural (one client per group)
DEFAULT_CLIENT_TEST_FRACTION = 0.2  # with federated evaluation, when --client-test-fraction is not given
MAX_CLIENTS = 1_000_000  # more than any simulation here holds in memory, or any deployment waits for
MAX_THREADS = 1024
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few hundred bytes; a bigger one is the wrong file


@dataclass(frozen=True)
class Bound:
    """The allowed range of a numeric setting: ``low``/``high`` (None: unbounded), each end open or closed."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def allows(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self, integer: bool) -> str:
        """The range in words: 'a positive integer', '> 0', 'in (0, 1]', 'an integer from 1 to 8'."""
        if integer and self.low == 1 and self.high is None:
            text = "a positive integer"
        elif self.high is None:
            text = f"{'>' if self.open_low else '>='} {self.low:g}"
        elif integer:
            text = f"an integer from {_number(self.low)} to {_number(self.high)}"
        else:
            text = f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}{')' if self.open_high else ']'}"
        return text + (f" ({self.note})" if self.note else "")

    def check(self, name: str, value: float | None, *, integer: bool = False) -> None:
        """Refuse ``value`` (None passes: optional settings) outside the range, naming its flag."""
        if value is not None and not self.allows(value):
            raise ConfigError(f"{_flag(name)} must be {self.describe(integer)}; got {value}")


def _number(value: float) -> str:
    """A bound as people write it: 2**53 and 2**63 - 1 rather than their sixteen digits."""
    if isinstance(value, int) and value > 10**6:
        if value & (value - 1) == 0:
            return f"2**{value.bit_length() - 1}"
        if value & (value + 1) == 0:
            return f"2**{value.bit_length()} - 1"
    return str(value)


def max_threads() -> int:
    """The most torch threads a run may ask for: 4 x this machine's cores, never above 1024 (more only thrash)."""
    return min(MAX_THREADS, 4 * (os.cpu_count() or 1))


def bounds() -> dict[str, Bound]:
    """Every numeric field's range, in one table (a type's finiteness is ``registry.check_value``'s rule)."""
    positive, non_negative, above_zero = Bound(1), Bound(0), Bound(0, open_low=True)
    cores = os.cpu_count() or 1
    return {
        "clients": Bound(1, MAX_CLIENTS), "rounds": positive, "local_epochs": positive, "batch_size": positive,
        "shards_per_client": positive, "min_clients": positive,
        "threads": Bound(1, max_threads(), note=f"4 x this machine's {cores} cores, at most {MAX_THREADS}"),
        "min_partition_size": Bound(0, note="0: clients may hold no data and are never sampled"),
        "seed": Bound(0, 2**63 - 1),
        "lr": above_zero, "mu": non_negative, "momentum": non_negative, "weight_decay": non_negative,
        "fraction": Bound(0, 1, open_low=True), "min_fit_fraction": Bound(0, 1),
        "alpha": Bound(0, open_low=True, note="smaller is more skewed"),
        "round_timeout": Bound(0, open_low=True, note="seconds"),
        "update_bound": Bound(0, note="0 turns the bound off"),
        "max_examples_per_client": Bound(1, 2**53),
        "client_test_fraction": Bound(0, 1, open_high=True),
        "noise_multiplier": non_negative, "clip_norm": above_zero, "clip_learning_rate": non_negative,
        "delta": Bound(0, 1, open_low=True, open_high=True), "target_epsilon": above_zero, "client_budget": above_zero,
        "adaptive_clip_quantile": Bound(0, 1, open_low=True, open_high=True),
        "secagg_bits": Bound(8, 64), "secagg_clip": above_zero, "secagg_neighbours": Bound(2),
        "secagg_max_weight": positive,
        "secagg_corrupt_fraction": Bound(0, 0.5, open_high=True),
        "secagg_dropout_fraction": Bound(0, 0.5, open_high=True),
    }


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
    clients: int | None = None  # None: DEFAULT_CLIENTS, or one per writer under --partition natural (resolve_clients)
    fraction: float = 1.0
    min_clients: int = 1
    min_fit_fraction: float = 0.0
    round_timeout: float = 300.0
    update_bound: float = DEFAULT_FACTOR  # plain rounds hold each update to this x last round's median norm; 0: off
    max_examples_per_client: int = MAX_EXAMPLES_PER_CLIENT  # the ceiling on the counts a client declares
    rounds: int = 20
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    min_partition_size: int = 1
    client_test_fraction: float | None = None  # None: 0.2 when clients evaluate, 0 under centralized evaluation
    evaluation: str = "centralized"
    dp: str = "none"
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0
    delta: float | None = None
    target_epsilon: float | None = None
    client_budget: float | None = None  # each client's own epsilon budget under --dp local or dpsgd
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
    secagg_corrupt_fraction: float = 1 / 3
    secagg_dropout_fraction: float = 0.1
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
        """Check every field; raise ConfigError naming the first bad one and what is allowed.

        Two generic rules cover every field before the particular ones: the type rule of
        ``registry.check_value`` (finite floats, 64-bit ints, ...) and the ranges of ``bounds()``.
        """
        from fedlearn.data import DATASETS, PARTITIONS
        from fedlearn.models import MODELS
        from fedlearn.registry import check_value, lookup, make_config
        from fedlearn.tasks import TASKS

        for name, annotation in _field_types().items():
            check_value(name, getattr(self, name), annotation)
        for name, bound in bounds().items():
            bound.check(name, getattr(self, name), integer=_field_types()[name] in (int, int | None))
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
        if self.clients is not None and self.min_clients > self.clients:
            raise ConfigError(f"--min-clients ({self.min_clients}) cannot exceed --clients ({self.clients})")
        if self.evaluation != "centralized" and self.client_test_fraction == 0:
            raise ConfigError("--evaluation federated needs client test data; set --client-test-fraction > 0")
        return self

    def _validate_dp(self) -> None:
        if self.client_budget is not None and self.dp not in ("local", "dpsgd", "distributed"):
            raise ConfigError("--client-budget is a client's own epsilon budget under --dp local, dpsgd or "
                              "distributed; under "
                              f"--dp {self.dp} use --target-epsilon")
        if self.dp == "none":
            return
        if self.algorithm == "fedsgd":
            raise ConfigError("--dp works with algorithms whose clients send model updates; --algorithm fedsgd "
                              "sends gradients, whose clipping this DP accounting does not cover")
        stops = self.target_epsilon is not None and self.target_mode == "stop"
        if self.dp in ("local", "dpsgd", "distributed") and (stops or self.adaptive_clip_quantile is not None):
            raise ConfigError(f"--dp {self.dp} supports --target-mode calibrate only, without --adaptive-clip-quantile")
        if self.evaluation != "centralized":
            raise ConfigError(f"--dp {self.dp} with --evaluation {self.evaluation}: each client would send its test "
                              "loss, accuracy and count unnoised, which epsilon does not cover; use --evaluation "
                              "centralized")

    def _validate_secure(self) -> None:
        _one_of("secure_aggregation", self.secure_aggregation, SECURE_MODES)
        _one_of("he", self.he, HE_MODES)
        if self.secure_aggregation != "none" and self.he != "none":
            raise ConfigError("choose one of --secure-aggregation and --he: both hide individual updates")
        if (self.secure_aggregation != "none" or self.he != "none") and self.dp == "dpsgd":
            raise ConfigError("--dp dpsgd keeps a per-client accountant from each client's sample count, which "
                              "secure aggregation hides; use --dp central or local with it")
        if self.dp == "distributed" and (self.secure_aggregation == "none" or self.he != "none"):
            raise ConfigError("--dp distributed adds each client's noise share inside a secure sum: give it "
                              "--secure-aggregation secagg or secagg+ (not --he)")
        if self.secure_aggregation != "none":
            if not (0.5 < self.secagg_threshold < 1 or (self.secagg_threshold >= 2 and
                                                         float(self.secagg_threshold).is_integer())):
                raise ConfigError("--secagg-threshold must be a fraction in (0.5, 1) of the sampled clients (at or "
                                  "below half, the server can learn a client's input from two disjoint sets of "
                                  f"holders) or a count >= 2; got {self.secagg_threshold}")
        if (self.secure_aggregation != "none" or self.he != "none") and self.evaluation != "centralized":
            raise ConfigError(f"--evaluation {self.evaluation} with secure aggregation or --he: each client would "
                              "send its test loss, accuracy and count in the clear, which the secure sum exists to "
                              "hide; use --evaluation centralized")
        if self.he != "none" and not self.he_keys:
            raise ConfigError("--he ckks needs --he-keys DIR made by `fedlearn he keygen --dir DIR`")

    def to_dict(self) -> dict[str, Any]:
        """Every key as YAML writes it: the fields, then the components' keys, flat."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "components"}
        out.update(self.components)
        return out

    @property
    def effective_client_test_fraction(self) -> float:
        """The share of each client's data it holds back as a local test set.

        ``--client-test-fraction`` when given; unset, 0.2 when clients evaluate (federated or both) and 0 under
        centralized evaluation, where no one would use a client's test set and its training would lose it.
        """
        if self.client_test_fraction is not None:
            return self.client_test_fraction
        return 0.0 if self.evaluation == "centralized" else DEFAULT_CLIENT_TEST_FRACTION

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
            from fedlearn.registry import shown

            raise ConfigError(f"{source}: unknown key {shown(unknown[0])}; known keys: "
                              f"{', '.join(sorted(known | set(settings)))}")
        components = {**self.components, **{k: v for k, v in changes.items() if k in settings and k not in known}}
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if k in known}, components=components)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping of config keys (dashes in keys are accepted and turned into underscores)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"--config {path}: {path.stat().st_size} bytes is too big for a config file (at most "
                              f"{MAX_CONFIG_BYTES}); check the path")
        raw = path.read_bytes()
    except (OSError, ValueError) as exc:  # unreadable, or a name no file can have
        raise ConfigError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc}); give a "
                          "readable YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x}); give a "
                          "YAML file of config keys") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}: not valid YAML{where}; fix the file") from None
    except RecursionError:
        raise ConfigError(f"--config {path}: nested too deeply to be a config; fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        from fedlearn.registry import shown

        raise ConfigError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {shown(value)}")


@functools.cache
def _field_types() -> dict[str, Any]:
    """RunConfig's field annotations, resolved (``int``, ``float | None``, ...), without ``components``."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in fields(RunConfig) if f.name != "components"}
