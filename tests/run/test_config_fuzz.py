"""Hostile-input fuzzing of the YAML/CLI config: for every RunConfig field and every registered component setting,
boundary and random values (NaN, +-inf, huge ints, negatives, empty and very long strings, wrong types, nested
lists and dicts, non-UTF-8 bytes) go through the real config loader and through `fedlearn run --dry-run` (the
parser, the loader, validation, DP's calibration and the output check; it trains nothing). The only outcomes
allowed: a config that is sane (finite, in range, and read back from its own YAML unchanged), or a one-line
FedLearnError (exit 2 and one `fedlearn: error:` line; argparse adds its one usage line). Seeded and bounded:
a few seconds in all."""

from __future__ import annotations

import datetime
import math
import random
import typing
from pathlib import Path
from typing import Any

import yaml

from fedlearn.cli import main
from fedlearn.errors import FedLearnError
from fedlearn.registry import settings
from fedlearn.run.config import RunConfig, bounds, load_config_file
from fedlearn.run.runner import check_run

SEED = 20261211
DEFAULTS = RunConfig().to_dict()
FIELDS = {name: hint for name, hint in typing.get_type_hints(RunConfig).items() if name != "components"}
COMPONENTS = {key: s.type for key, s in settings().items() if key not in FIELDS}
KEYS = sorted({**FIELDS, **COMPONENTS})

BOUNDARY: list[Any] = [
    None, True, False, 0, 1, -1, 2, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63) - 1, 10**400,
    0.0, -0.0, 0.5, 1.0, -1e-300, 5e-324, 1e308, -1e308, float("nan"), float("inf"), float("-inf"),
    "", " ", "nan", "-1", "x" * 10_000, "a\x00b", "line\nbreak", "\u202e\udcff", "../../etc",
    [], [1, 2], {}, {"k": [1, {"n": None}]}, [[[[[[]]]]]], datetime.date(2026, 12, 1), b"\xff\xfe",
]
VALID_CHOICES = {"dataset": ["digits"], "model": ["seed-cnn", "mcmahan-2nn"], "algorithm": ["fedavg", "fedprox",
                 "fedadam", "scaffold"], "partition": ["iid", "dirichlet", "shards"], "evaluation": ["centralized",
                 "federated", "both"], "dp": ["none", "central", "local"], "secure_aggregation": ["none", "secagg"],
                 "server_optimizer": ["sgd", "adam", "momentum"]}
FLAG_TEXTS = ["nan", "inf", "-inf", "1e400", "-1", "0", "1", "0.5", "", "x" * 5000, "\udcff", "1e-400", "12abc",
              str(2**64), "true", "[1, 2]"]


def _type_of(key: str) -> Any:
    hint = FIELDS.get(key, COMPONENTS.get(key))
    return next((a for a in typing.get_args(hint) if a is not type(None)), hint)


def _random_value(rng: random.Random, key: str) -> Any:
    """Half the time a value of the right type (often in range), else a hostile one."""
    kind = _type_of(key)
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(BOUNDARY)
    if key in VALID_CHOICES:
        return rng.choice(VALID_CHOICES[key])
    if kind is bool:
        return rng.random() < 0.5
    if kind is int:
        return rng.choice([rng.randint(-3, 12), rng.randint(0, 2**70) - 2**69, 2 ** rng.randint(0, 70)])
    if kind is float:
        return rng.choice([rng.uniform(-2, 2), rng.random(), float(f"1e{rng.randint(-330, 330)}")])
    return "".join(rng.choice("ab-_./\\ \t\u00e9\u4e2d\x7f") for _ in range(rng.randint(0, 40)))


def _assert_sane(config: RunConfig) -> None:
    """What validation let through: finite numbers, in range, and read back from its own YAML unchanged."""
    for key, value in config.to_dict().items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)
        if _type_of(key) is int and value is not None:
            assert -(2**63) <= value < 2**63, (key, value)
    for name, bound in bounds().items():
        value = getattr(config, name)
        assert value is None or bound.allows(value), (name, value)
    changed = {k: v for k, v in config.to_dict().items() if k not in DEFAULTS or v != DEFAULTS[k]}
    again = RunConfig().updated(yaml.safe_load(yaml.safe_dump(changed))).validate()
    assert again == config


def _assert_one_line(exc: FedLearnError) -> None:
    text = str(exc)
    assert text and "\n" not in text and "\r" not in text and len(text) < 2000, text[:300]


def _through_loader(path: Path) -> None:
    try:
        config = check_run(RunConfig().updated(load_config_file(path), source=str(path)))
    except FedLearnError as exc:
        _assert_one_line(exc)
    else:
        _assert_sane(config)


def test_every_setting_with_every_boundary_value_through_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    cases = 0
    for key in KEYS:
        for value in BOUNDARY:
            path.write_text(yaml.safe_dump({key: value}))
            _through_loader(path)
            cases += 1
    assert cases == len(KEYS) * len(BOUNDARY) > 2000
    path.write_text(yaml.safe_dump({"personal_layers": "p" * 200_000}))  # one very long value
    _through_loader(path)


def test_random_mixtures_and_raw_bytes_through_the_loader(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    path = tmp_path / "run.yaml"
    for case in range(400):
        if case % 6 == 0:  # raw bytes: binary, truncated UTF-8, YAML-ish garbage
            noise = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200)))
            path.write_bytes(rng.choice([noise, b"lr: " + noise, b"rounds: 2\n" + noise[:3], b"{" + noise]))
        else:
            keys = rng.sample(KEYS, rng.randint(1, 6))
            if rng.random() < 0.1:
                keys.append(rng.choice(["learning_rate", "lr-", "", "x" * 300, "1"]))
            path.write_text(yaml.safe_dump({k: _random_value(rng, k) for k in keys}))
        _through_loader(path)


def _run_dry(argv: list[str], capsys) -> None:
    code = main(["run", "--dry-run", *argv])
    captured = capsys.readouterr()
    assert code in (0, 2), (code, argv[:6])
    if code == 0:
        _assert_sane(RunConfig().updated(yaml.safe_load(captured.out)))
        assert not captured.err.strip(), captured.err[:300]
        return
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert lines and lines[-1].startswith("fedlearn: error: "), lines[:3]
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("usage: fedlearn run ")), lines[:3]


def test_random_configs_through_fedlearn_run_dry_run(tmp_path: Path, capsys) -> None:
    """The real command: a YAML file and flags, hostile both, through parse, load, validate and the output check."""
    rng = random.Random(SEED + 1)
    flags = {f"--{k.replace('_', '-')}": k for k in KEYS if k not in ("download",)}
    for case in range(150):
        argv: list[str] = []
        if case % 3:
            config = tmp_path / f"c{case}.yaml"
            if case % 10 == 1:
                config.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
            else:
                keys = rng.sample(KEYS, rng.randint(1, 5))
                config.write_text(yaml.safe_dump({k: _random_value(rng, k) for k in keys}))
            argv += ["--config", str(config)]
        for flag in rng.sample(sorted(flags), rng.randint(0, 3)):
            value = rng.choice(FLAG_TEXTS) if rng.random() < 0.6 else str(_random_value(rng, flags[flag]))
            argv.append(f"{flag}={value}")
        if rng.random() < 0.3:
            argv.append(rng.choice(["--output=" + str(tmp_path / "out"), "--output=" + str(tmp_path / "c1.yaml"),
                                    "--output=" + "y" * 5000, "--bogus", "--rounds"]))
        _run_dry(argv, capsys)
    assert not (tmp_path / "out").exists()  # a dry run makes no folder
