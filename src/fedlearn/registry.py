"""Components by name: each registers itself with its own config dataclass, from which its YAML keys,
command-line flags (with defaults) and validation derive, so adding one edits no central list.

A component is a class with a ``Config`` dataclass attribute (no fields is fine) and a constructor
taking that config. ``build(kind, name, values)`` turns flat values (YAML keys or flags) into it.

Flag names follow one rule: ``--<prefix>-<field>`` with the prefix of the component's kind
(``server`` for server optimizers, ``client`` for client hooks, ``aggregator``, ``transform``,
``runtime``, ``scheduler``); a field may name its own flag in ``metadata={"flag": ...}`` when an
older, documented flag exists (FedProx's ``--mu``). Fields of one kind that share a name share a flag.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any, TypeVar

from fedlearn.errors import ConfigError

KINDS = ("strategy", "hook", "transform", "aggregator", "optimizer", "runtime", "scheduler")
PREFIXES = {"strategy": "", "hook": "client", "transform": "transform", "aggregator": "aggregator",
            "optimizer": "server", "runtime": "runtime", "scheduler": "scheduler"}

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}
_version = 0  # bumped by every registration: ``settings()`` is cached per version
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class NoConfig:
    """The config of a component without settings."""


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` buildable as ``build(kind, name)``; ``cls.Config`` holds its settings."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; one of {', '.join(KINDS)}")

    def decorate(cls: T) -> T:
        global _version
        existing = _REGISTRY[kind].get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"{kind} {name!r} is registered twice ({existing.__qualname__}, {cls.__qualname__})")
        if not hasattr(cls, "Config"):
            cls.Config = NoConfig
        cls.registered_name = name
        _REGISTRY[kind][name] = cls
        _version += 1
        return cls

    return decorate


_BUILTIN_PACKAGES = ("fedlearn.strategies", "fedlearn.transforms", "fedlearn.compression")
_BUILTIN_MODULES = ("fedlearn.client.hooks", "fedlearn.privacy.dpsgd")
_loaded = False


def _load_builtin() -> None:
    """Import every module of the component packages, so a new component file registers itself with no
    edit anywhere else (once; a no-op after the first call)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib
    import pkgutil

    for name in _BUILTIN_MODULES:
        importlib.import_module(name)
    for package_name in _BUILTIN_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError as exc:
            if exc.name == package_name:
                continue  # a package of the map that does not exist yet (compression)
            raise
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")


def names(kind: str) -> tuple[str, ...]:
    """The registered names of ``kind``, sorted."""
    _load_builtin()
    return tuple(sorted(_REGISTRY[kind]))


def lookup(kind: str, name: str) -> type:
    """The class registered as ``name``; a ConfigError lists the known names otherwise."""
    _load_builtin()
    cls = _REGISTRY[kind].get(name)
    if cls is None:
        flag = {"strategy": "--algorithm", "optimizer": "--server-optimizer"}.get(kind, f"--{kind}")
        raise ConfigError(f"{flag} must be one of {', '.join(names(kind))}; got {shown(name)}")
    return cls


def flag_name(kind: str, f: dataclasses.Field) -> str:
    """The config key (underscores) a component field is set by."""
    own = f.metadata.get("flag")
    if own:
        return own
    prefix = PREFIXES[kind]
    return f"{prefix}_{f.name}" if prefix else f.name


@dataclass(frozen=True)
class Setting:
    """One config key a component declares: its key, type, default and help text."""

    key: str
    type: Any
    default: Any
    help: str
    kind: str
    owners: tuple[str, ...]


_settings_cache: tuple[int, dict[str, Setting]] | None = None


def settings() -> dict[str, Setting]:
    """Every config key declared by a registered component, by key (shared keys merged).

    Built once per registry state (every config attribute lookup reads it; building resolves type hints).
    """
    global _settings_cache
    _load_builtin()
    if _settings_cache is None or _settings_cache[0] != _version:
        _settings_cache = (_version, _collect_settings())
    return dict(_settings_cache[1])


def _collect_settings() -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for kind, table in _REGISTRY.items():
        if kind == "transform":  # built by the algorithms that use them (DP), not set one by one
            continue
        for name, cls in sorted(table.items()):
            hints = typing.get_type_hints(cls.Config)
            for f in fields(cls.Config):
                if f.metadata.get("internal"):
                    continue
                key = flag_name(kind, f)
                default = f.default if f.default is not MISSING else None
                if key in out:
                    prior = out[key]
                    if prior.type != hints[f.name]:
                        raise ValueError(f"config key {key} has two types ({prior.type}, {hints[f.name]})")
                    out[key] = dataclasses.replace(prior, owners=(*prior.owners, name))
                    continue
                out[key] = Setting(key, hints[f.name], default, f.metadata.get("help", ""), kind, (name,))
    return out


def build(kind: str, name: str, values: Mapping[str, Any] | None = None, **extra: Any) -> Any:
    """The component ``name`` of ``kind``, its Config filled from flat ``values`` (keys as in ``settings``).

    Keys in ``values`` that belong to other components are ignored; ``extra`` goes to the constructor.
    """
    cls = lookup(kind, name)
    config = make_config(kind, cls, values or {})
    return cls(config, **extra)


def make_config(kind: str, cls: type, values: Mapping[str, Any]) -> Any:
    """``cls.Config`` from flat values, each checked against its field's type; then its own ``validate``."""
    hints = typing.get_type_hints(cls.Config)
    kwargs: dict[str, Any] = {}
    for f in fields(cls.Config):
        key = flag_name(kind, f)
        if key in values and values[key] is not None:
            kwargs[f.name] = check_value(key, values[key], hints[f.name])
    config = cls.Config(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def config_from_fields(kind: str, cls: type, settings: Mapping[str, Any]) -> Any:
    """``cls.Config`` from settings named by *field* (as a task carries them), unknown names refused."""
    by_field = {f.name: flag_name(kind, f) for f in fields(cls.Config)}
    unknown = set(settings) - set(by_field)
    if unknown:
        from fedlearn.errors import InvalidUpdateError

        raise InvalidUpdateError(f"{kind} {cls.registered_name!r} has no setting {sorted(unknown)[0]!r}; server and "
                                 "client run different fedlearn releases")
    return make_config(kind, cls, {by_field[k]: v for k, v in settings.items()})


def flag(key: str) -> str:
    """A config key as the command-line flag that sets it."""
    return "--" + key.replace("_", "-")


INT_LIMIT = 2**63  # an integer setting must fit a signed 64-bit integer (torch, numpy and the wire hold no more)


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` if it has the declared type, else ConfigError: the one type rule of every setting.

    Ints pass as floats; floats must be finite (NaN and inf never configure anything); ints must fit 64 bits;
    strings may not hold NUL (no path or name can). The value is quoted shortened, so a hostile one stays one line.
    """
    args = typing.get_args(annotation)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag(key)} needs a value")
    if base is bool:
        ok = isinstance(value, bool)
        kind = "true or false"
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT <= value < INT_LIMIT
        kind = "an integer" if not isinstance(value, int) or isinstance(value, bool) else "a 64-bit integer"
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
        kind = "a finite number"
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str) and "\x00" not in value
        kind = "a string" if not isinstance(value, str) else "a string without NUL characters"
    else:
        ok, kind = True, str(base)
    if not ok:
        raise ConfigError(f"{flag(key)} must be {kind}; got {shown(value)}")
    return value


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters (without building a huge repr first)."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = limit
    short.maxlevel, short.maxlist, short.maxdict, short.maxlong = 2, 4, 4, limit
    return short.repr(value)


def positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    """Refuse a negative (or zero) setting with a one-line message naming its flag."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{flag(key)} must be {'>= 0' if allow_zero else '> 0'}; got {value}")


def in_range(key: str, value: float, low: float, high: float, *, closed: bool = False) -> None:
    """Refuse ``value`` outside (low, high) (or [low, high] when ``closed``)."""
    ok = low <= value <= high if closed else low < value < high
    if not ok:
        brackets = f"[{low}, {high}]" if closed else f"({low}, {high})"
        raise ConfigError(f"{flag(key)} must be in {brackets}; got {value}")
